# Paper 2, §3 (workflow_scripts/analyses/projection.py): the Eq. 2 projection on a backbone retrieval cache.


# Solves Eq. 2 (projection of p_knnlm onto the output space of f and of f∘g) at the eval positions.
rule projection:
    input:
        model_json=lambda w: model_json(DATASTORES[PROJECTION["datastore"]]["model"]),
        manifest=lambda w: f"results/datastores/{PROJECTION['datastore']}/manifest.json",
        tokens=lambda w: eval_tokens(PROJECTION["eval_set"], PROJECTION["datastore"]),
        cache=lambda w: f"results/retrieval/{PROJECTION['eval_set']}/{PROJECTION['datastore']}/meta.json",
        summary="results/sweeps/summary.csv",
    output:
        csv=report(
            "results/tables/projection.csv",
            caption="../report/projection.rst",
            category="Paper 2",
            subcategory="Projection (Eq. 2)",
        ),
        parquet="results/tables/projection.parquet",
        meta="results/tables/projection.json",
    log:
        "results/logs/projection/projection.log",
    benchmark:
        "results/benchmarks/projection/projection.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=120,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            {
                **PROJECTION,
                "block_size": config["extraction"]["block_size"],
                "batch_size": config["extraction"]["batch_size"],
            }
        ),
    shell:
        "python -m workflow_scripts projection --params {params.p:q} --threads {params.threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --tokens {input.tokens} --cache {input.cache} --summary {input.summary}"
        " --csv {output.csv} --parquet {output.parquet} --meta {output.meta} 2> {log}"
