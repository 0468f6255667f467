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
        **table(
            "results/tables/projection", "projection", "Paper 2", "Projection (Eq. 2)"
        ),
        meta="results/tables/projection.json",
    log:
        "results/logs/projection/projection.log",
    benchmark:
        "results/benchmarks/projection/projection.tsv"
    threads: 1  # the default run's tables are the same on 1 thread as on 2; a one-thread job fills a free core
    params:
        p=lambda w: as_json(
            PROJECTION
            | {k: config["extraction"][k] for k in ("block_size", "batch_size")}
        ),
    shell:
        step("projection")
