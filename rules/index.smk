# Index: a FAISS index over a datastore's keys (Flat exact, or IVFPQ trained on a sample).


# Makes the FAISS index of a datastore, adding keys shard by shard.
rule build_index:
    input:
        manifest="results/datastores/{ds}/manifest.json",
    output:
        index="results/datastores/{ds}/index.faiss",
        meta="results/datastores/{ds}/index.json",
    params:
        p=lambda w: as_json({"index": config["index"], "seed": config["seed"]}),
    log:
        "results/logs/build_index/{ds}.log",
    benchmark:
        "results/benchmarks/build_index/{ds}.tsv"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    conda:
        "../envs/pipeline.yaml"
    shell:
        "{PY} build-index --params {params.p:q} --threads {threads} --manifest {input.manifest}"
        " --index {output.index} --index-meta {output.meta} 2> {log}"
