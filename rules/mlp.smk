# Paper 2, §5 (workflow_scripts/analyses/mlp.py): an MLP trained on a backbone datastore in place of retrieval.


# Trains the MLP that replaces kNN retrieval on a backbone datastore (paper 2, §5).
rule train_mlp:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
    output:
        **table("results/analyses/mlp/{ds}/loss", name="loss"),
        mlp="results/analyses/mlp/{ds}/mlp.pt",
        mlp_json="results/analyses/mlp/{ds}/mlp.json",
    log:
        "results/logs/train_mlp/{ds}.log",
    benchmark:
        "results/benchmarks/train_mlp/{ds}.tsv"
    threads: 2
    params:
        p=lambda w: as_json({"mlp": MLP["train"], "seed": config["seed"]}),
    shell:
        step("train-mlp")


# Perplexity of the MLP-LM at every λ beside the LM and the kNN-LM (λ chosen on the selection set, select_on).
rule mlp_eval:
    input:
        model_json=lambda w: model_json(DATASTORES[MLP["datastore"]]["model"]),
        mlp=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.pt",
        mlp_json=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.json",
        caches=lambda w: [
            f"results/retrieval/{e}/{MLP['datastore']}/meta.json"
            for e in sorted(EVAL_SETS)
        ],
        tokens=lambda w: [eval_tokens(e, MLP["datastore"]) for e in sorted(EVAL_SETS)],
        summary="results/sweeps/summary.csv",
    output:
        **table("results/tables/mlp_lm", "mlp_lm", "Paper 2", "MLP replacement"),
    log:
        "results/logs/mlp_eval/mlp_eval.log",
    params:
        # the job asks for one thread; its arithmetic runs on these
        threads=RULE_THREADS.get("mlp_eval", ARITHMETIC_THREADS),
        p=mlp_eval_params,
    shell:
        step("mlp-eval")
