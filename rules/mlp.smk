# Paper 2, §5 (workflow_scripts/analyses/mlp.py): an MLP trained on a backbone datastore in place of retrieval.


# Trains the MLP that replaces kNN retrieval on a backbone datastore (paper 2, §5).
rule train_mlp:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
    output:
        pt="results/analyses/mlp/{ds}/mlp.pt",
        meta="results/analyses/mlp/{ds}/mlp.json",
        loss="results/analyses/mlp/{ds}/loss.csv",
        loss_parquet="results/analyses/mlp/{ds}/loss.parquet",
    log:
        "results/logs/train_mlp/{ds}.log",
    benchmark:
        "results/benchmarks/train_mlp/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json({"mlp": MLP["train"], "seed": config["seed"]}),
    shell:
        "python -m workflow_scripts train-mlp --params {params.p:q} --threads {params.threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --mlp {output.pt} --mlp-json {output.meta} --loss-csv {output.loss}"
        " --loss-parquet {output.loss_parquet} 2> {log}"


# Perplexity of the MLP-LM at every λ beside the LM and the kNN-LM (λ chosen on the first eval set).
rule mlp_eval:
    input:
        model_json=lambda w: model_json(DATASTORES[MLP["datastore"]]["model"]),
        pt=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.pt",
        meta=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.json",
        caches=lambda w: [
            f"results/retrieval/{e}/{MLP['datastore']}/meta.json" for e in EVAL_SETS
        ],
        tokens=lambda w: [eval_tokens(e, MLP["datastore"]) for e in EVAL_SETS],
        summary="results/sweeps/summary.csv",
    output:
        csv=report(
            "results/tables/mlp_lm.csv",
            caption="../report/mlp_lm.rst",
            category="Paper 2",
            subcategory="MLP replacement",
        ),
        parquet="results/tables/mlp_lm.parquet",
    log:
        "results/logs/mlp_eval/mlp_eval.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            {
                "datastore": MLP["datastore"],
                "eval_sets": list(EVAL_SETS),
                "choose_on": select_on(MLP["datastore"]) or list(EVAL_SETS)[0],
                "lambdas": MLP["lambdas"],
            }
        ),
    shell:
        "python -m workflow_scripts mlp-eval --params {params.p:q} --threads {params.threads} --model-json {input.model_json} --mlp {input.pt}"
        " --mlp-json {input.meta} --caches {input.caches} --tokens {input.tokens} --summary {input.summary} --csv {output.csv}"
        " --parquet {output.parquet} 2> {log}"
