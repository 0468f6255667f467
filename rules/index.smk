# Index: a FAISS index over a datastore's keys (Flat exact, or IVFPQ trained on a sample).


# Makes the FAISS index of a datastore, adding keys shard by shard.
rule build_index:
    input:
        manifest="results/datastores/{ds}/manifest.json",
        verified="results/datastores/{ds}/verified.json",  # rule verify_datastore
    output:
        index="results/datastores/{ds}/index.faiss",
        meta="results/datastores/{ds}/index.json",
    log:
        "results/logs/build_index/{ds}.log",
    benchmark:
        "results/benchmarks/build_index/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=23 * 60,  # paper 1: about 12 h with 32 threads (docs/cluster.md); 2 threads by default
    params:
        p=lambda w: as_json({"index": index_params(), "seed": config["seed"]}),
    shell:
        "python -m workflow_scripts build-index --params {params.p:q} --threads {threads} --manifest {input.manifest}"
        " --index {output.index} --index-meta {output.meta} 2> {log}"
