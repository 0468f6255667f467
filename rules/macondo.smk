# Paper 2, §4 (workflow_scripts/analyses/macondo_data.py, macondo.py, tables.py): one Macondo dataset per seed, the
# model fine-tuned on it, each checkpoint's datastore (and MLP), the LM / kNN-LM / MLP-LM scores of the children's
# names, the tables.


# Makes one seed's Macondo dataset, children's names checked to be single tokens for the model's tokenizer.
rule macondo_data:
    input:
        unpack(tokenizer_inputs),
    output:
        train=f"{MACONDO_SEED}/data/train.parquet",
        test=f"{MACONDO_SEED}/data/test.parquet",
        world=f"{MACONDO_SEED}/data/macondo.json",
    log:
        "results/logs/macondo_data/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_data/{model}/{seed}.tsv"
    params:
        p=lambda w: as_json({"generate": MACONDO["generate"], "seed": int(w.seed)}),
    shell:
        step("macondo-data")


# Fine-tunes the model on one seed's training sentences (over-specified: with a description).
rule macondo_finetune:
    input:
        model_json=lambda w: model_json(w.model),
        train=f"{MACONDO_SEED}/data/train.parquet",
    output:
        **table(f"{MACONDO_SEED}/final/lm/loss", name="loss"),
        hf=directory(f"{MACONDO_SEED}/final/lm/hf"),
        out_model_json=f"{MACONDO_SEED}/final/lm/model.json",
        checkpoint_hf=[
            directory(f"{MACONDO_SEED}/step{s}/lm/hf") for s in MACONDO_CHECKPOINTS
        ],
        checkpoint_json=[
            f"{MACONDO_SEED}/step{s}/lm/model.json" for s in MACONDO_CHECKPOINTS
        ],
    log:
        "results/logs/macondo_finetune/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_finetune/{model}/{seed}.tsv"
    threads: 1
    params:
        p=lambda w: as_json(
            {
                "finetune": MACONDO["finetune"],
                "seed": int(w.seed),
                "checkpoints": MACONDO_CHECKPOINTS,
            }
        ),
    shell:
        step("macondo-finetune")


# Builds one seed's memories, one point after the other in one job (each takes seconds, less than a job's start):
# at the fine-tuned model and every checkpoint, the datastore over the training sentences (Flat index), and at the
# points of analyses.macondo.checkpoint_mlp (the fine-tuned model only by default) the MLP trained on the datastore's
# pairs (paper 2, App. D).
rule macondo_memory:
    input:
        model_json=macondo_at("lm/model.json"),
        train=f"{MACONDO_SEED}/data/train.parquet",
    output:
        manifest=macondo_at("datastore/manifest.json"),
        index=macondo_at("datastore/index.faiss"),
        index_meta=macondo_at("datastore/index.json"),
        mlp=macondo_at("mlp/mlp.pt", MACONDO_MLP_AT),
        mlp_json=macondo_at("mlp/mlp.json", MACONDO_MLP_AT),
        loss_csv=macondo_at("mlp/loss.csv", MACONDO_MLP_AT),
        loss_parquet=macondo_at("mlp/loss.parquet", MACONDO_MLP_AT),
    log:
        "results/logs/macondo_memory/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_memory/{model}/{seed}.tsv"
    threads: 1
    params:
        p=lambda w: as_json(
            {
                "mlp": MACONDO["mlp"],
                "seed": int(w.seed),
                "at": MACONDO_AT,
                "mlp_at": MACONDO_MLP_AT,
            }
        ),
    shell:
        step("macondo-memory")


# Scores the children's names on one seed's test sentences with the LM, the kNN-LM and (where it has one) the MLP-LM,
# at the fine-tuned model and at every checkpoint (one job a seed: each checkpoint's scoring takes seconds).
rule macondo_eval:
    input:
        model_json=macondo_at("lm/model.json"),
        manifest=macondo_at("datastore/manifest.json"),
        index=macondo_at("datastore/index.faiss"),
        index_meta=macondo_at("datastore/index.json"),
        mlp=macondo_at("mlp/mlp.pt", MACONDO_MLP_AT),
        mlp_json=macondo_at("mlp/mlp.json", MACONDO_MLP_AT),
        test=f"{MACONDO_SEED}/data/test.parquet",
    output:
        parquet=macondo_at("scores.parquet"),
        csv=macondo_at("scores.csv"),
    log:
        "results/logs/macondo_eval/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_eval/{model}/{seed}.tsv"
    threads: 1
    params:
        p=macondo_eval_params,
    shell:
        step("macondo-eval")


# Makes the Table 5 analogue: log-likelihood of the child's name by number of children, over seeds.
rule macondo_table:
    input:
        scores=macondo_seeds("final/scores.parquet"),
    output:
        **table("results/tables/macondo", "macondo", "Paper 2", "Macondo"),
    log:
        "results/logs/macondo_table/macondo.log",
    shell:
        step("macondo-table")


# Makes the Figure 1 analogue's table: log-likelihood by number of children at each fine-tuning checkpoint.
rule macondo_curve:
    input:
        scores=macondo_seeds("{at}/scores.parquet"),
        losses=macondo_seeds("final/lm/loss.parquet"),
    output:
        **table("results/tables/macondo_curve", "macondo_curve", "Paper 2", "Macondo"),
    log:
        "results/logs/macondo_curve/macondo_curve.log",
    shell:
        step("macondo-curve")
