# Paper 2, §4 (workflow_scripts/analyses/macondo_data.py, macondo.py, tables.py): one Macondo dataset per seed, the
# model fine-tuned on it, each checkpoint's datastore and MLP, the LM / kNN-LM / MLP-LM scores of the children's
# names, the tables.


# Makes one seed's Macondo dataset, children's names checked to be single tokens for the model's tokenizer.
rule macondo_data:
    input:
        unpack(tokenizer_inputs),
    output:
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
        test="results/macondo/{model}/seed{seed}/data/test.parquet",
        world="results/macondo/{model}/seed{seed}/data/macondo.json",
    log:
        "results/logs/macondo_data/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_data/{model}/{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        p=lambda w: as_json({"generate": MACONDO["generate"], "seed": int(w.seed)}),
        tok=tokenizer_arg,
    shell:
        "python -m workflow_scripts macondo-data --params {params.p:q} {params.tok}"
        " --train {output.train} --test {output.test} --world {output.world} 2> {log}"


# Fine-tunes the model on one seed's training sentences (over-specified: with a description).
rule macondo_finetune:
    input:
        model_json=lambda w: model_json(w.model),
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
    output:
        hf=directory("results/macondo/{model}/seed{seed}/final/lm/hf"),
        model_json="results/macondo/{model}/seed{seed}/final/lm/model.json",
        loss="results/macondo/{model}/seed{seed}/final/lm/loss.csv",
        loss_parquet="results/macondo/{model}/seed{seed}/final/lm/loss.parquet",
        checkpoint_hf=[
            directory(f"results/macondo/{{model}}/seed{{seed}}/step{s}/lm/hf")
            for s in MACONDO_CHECKPOINTS
        ],
        checkpoint_json=[
            f"results/macondo/{{model}}/seed{{seed}}/step{s}/lm/model.json"
            for s in MACONDO_CHECKPOINTS
        ],
    log:
        "results/logs/macondo_finetune/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_finetune/{model}/{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=16000,
        runtime=6 * 60,
    params:
        p=lambda w: as_json(
            {
                "finetune": MACONDO["finetune"],
                "seed": int(w.seed),
                "checkpoints": MACONDO_CHECKPOINTS,
            }
        ),
        checkpoints=lambda w, output: (
            f"--checkpoint-hf {' '.join(output.checkpoint_hf)} --checkpoint-json {' '.join(output.checkpoint_json)}"
            if MACONDO_CHECKPOINTS
            else ""
        ),
    shell:
        "python -m workflow_scripts macondo-finetune --params {params.p:q} --threads {threads}"
        " --model-json {input.model_json} --train {input.train} --hf {output.hf} --out-model-json {output.model_json}"
        " --loss-csv {output.loss} --loss-parquet {output.loss_parquet} {params.checkpoints} 2> {log}"


# Builds one checkpoint's memory: its datastore over the training sentences (Flat index) and the MLP trained on
# the datastore's pairs (paper 2, App. D), in one job (each was too small for a job of its own).
rule macondo_memory:
    input:
        model_json="results/macondo/{model}/seed{seed}/{at}/lm/model.json",
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
    output:
        manifest="results/macondo/{model}/seed{seed}/{at}/datastore/manifest.json",
        index="results/macondo/{model}/seed{seed}/{at}/datastore/index.faiss",
        index_meta="results/macondo/{model}/seed{seed}/{at}/datastore/index.json",
        mlp="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.pt",
        mlp_json="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.json",
        loss_csv="results/macondo/{model}/seed{seed}/{at}/mlp/loss.csv",
        loss_parquet="results/macondo/{model}/seed{seed}/{at}/mlp/loss.parquet",
    log:
        "results/logs/macondo_memory/{model}/{seed}/{at}.log",
    benchmark:
        "results/benchmarks/macondo_memory/{model}/{seed}/{at}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=180,
    params:
        p=lambda w: as_json({"mlp": MACONDO["mlp"], "seed": int(w.seed)}),
        args=lambda w, input, output: step_args(input, output),
    shell:
        "python -m workflow_scripts macondo-memory --params {params.p:q} --threads {threads} {params.args} 2> {log}"


# Scores the children's names on one seed's test sentences with the LM, the kNN-LM and the MLP-LM, at the
# fine-tuned model and at every checkpoint (one job a seed: each checkpoint's scoring takes seconds).
rule macondo_eval:
    input:
        model_json=macondo_at("lm/model.json"),
        manifest=macondo_at("datastore/manifest.json"),
        index=macondo_at("datastore/index.faiss"),
        index_meta=macondo_at("datastore/index.json"),
        mlp=macondo_at("mlp/mlp.pt"),
        mlp_json=macondo_at("mlp/mlp.json"),
        test="results/macondo/{model}/seed{seed}/data/test.parquet",
    output:
        parquet=macondo_at("scores.parquet"),
        csv=macondo_at("scores.csv"),
    log:
        "results/logs/macondo_eval/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_eval/{model}/{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        p=lambda w: as_json(
            {
                "knn": MACONDO["knn"],
                "mlp_lambda": MACONDO["mlp_lambda"],
                "seed": int(w.seed),
                "at": MACONDO_AT,
            }
        ),
        args=lambda w, input, output: step_args(input, output),
    shell:
        "python -m workflow_scripts macondo-eval --params {params.p:q} --threads {threads} {params.args} 2> {log}"


# Makes the Table 5 analogue: log-likelihood of the child's name by number of children, over seeds.
rule macondo_table:
    input:
        scores=lambda w: [
            f"{macondo_dir(s)}/final/scores.parquet" for s in MACONDO["seeds"]
        ],
    output:
        csv=report(
            "results/tables/macondo.csv",
            caption="../report/macondo.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        parquet="results/tables/macondo.parquet",
    log:
        "results/logs/macondo_table/macondo.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts macondo-table --scores {input.scores} --csv {output.csv} --parquet {output.parquet}"
        " 2> {log}"


# Makes the Figure 1 analogue's table: log-likelihood by number of children at each fine-tuning checkpoint.
rule macondo_curve:
    input:
        scores=lambda w: [
            f"{macondo_dir(s)}/{at}/scores.parquet"
            for s in MACONDO["seeds"]
            for at in MACONDO_AT
        ],
        losses=lambda w: [
            f"{macondo_dir(s)}/final/lm/loss.parquet" for s in MACONDO["seeds"]
        ],
    output:
        csv=report(
            "results/tables/macondo_curve.csv",
            caption="../report/macondo_curve.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        parquet="results/tables/macondo_curve.parquet",
    log:
        "results/logs/macondo_curve/macondo_curve.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts macondo-curve --scores {input.scores} --losses {input.losses} --csv {output.csv}"
        " --parquet {output.parquet} 2> {log}"
