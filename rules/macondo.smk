# Paper 2, §4 (workflow_scripts/analyses/macondo_data.py, macondo.py): one Macondo dataset per seed, the model
# fine-tuned on it, its datastore and MLP, the LM / kNN-LM / MLP-LM scores of the children's names, the table.


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


# Makes the fine-tuned model's datastore over the training sentences, with a Flat index.
rule macondo_datastore:
    input:
        model_json="results/macondo/{model}/seed{seed}/{at}/lm/model.json",
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
    output:
        manifest="results/macondo/{model}/seed{seed}/{at}/datastore/manifest.json",
        index="results/macondo/{model}/seed{seed}/{at}/datastore/index.faiss",
        index_meta="results/macondo/{model}/seed{seed}/{at}/datastore/index.json",
    log:
        "results/logs/macondo_datastore/{model}/{seed}/{at}.log",
    benchmark:
        "results/benchmarks/macondo_datastore/{model}/{seed}/{at}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    shell:
        "python -m workflow_scripts macondo-datastore --threads {threads} --model-json {input.model_json}"
        " --train {input.train} --manifest {output.manifest} --index {output.index} --index-meta {output.index_meta}"
        " 2> {log}"


# Trains the MLP that maps the Macondo datastore's keys to its values (paper 2, App. D).
rule macondo_mlp:
    input:
        model_json="results/macondo/{model}/seed{seed}/{at}/lm/model.json",
        manifest="results/macondo/{model}/seed{seed}/{at}/datastore/manifest.json",
    output:
        pt="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.pt",
        meta="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.json",
        loss="results/macondo/{model}/seed{seed}/{at}/mlp/loss.csv",
        loss_parquet="results/macondo/{model}/seed{seed}/{at}/mlp/loss.parquet",
    log:
        "results/logs/macondo_mlp/{model}/{seed}/{at}.log",
    benchmark:
        "results/benchmarks/macondo_mlp/{model}/{seed}/{at}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        p=lambda w: as_json({"mlp": MACONDO["mlp"], "seed": int(w.seed)}),
    shell:
        "python -m workflow_scripts train-mlp --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --mlp {output.pt} --mlp-json {output.meta} --loss-csv {output.loss}"
        " --loss-parquet {output.loss_parquet} 2> {log}"


# Scores the children's names on the test sentences with the LM, the kNN-LM and the MLP-LM.
rule macondo_eval:
    input:
        model_json="results/macondo/{model}/seed{seed}/{at}/lm/model.json",
        manifest="results/macondo/{model}/seed{seed}/{at}/datastore/manifest.json",
        index="results/macondo/{model}/seed{seed}/{at}/datastore/index.faiss",
        index_meta="results/macondo/{model}/seed{seed}/{at}/datastore/index.json",
        test="results/macondo/{model}/seed{seed}/data/test.parquet",
        pt="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.pt",
        meta="results/macondo/{model}/seed{seed}/{at}/mlp/mlp.json",
    output:
        parquet="results/macondo/{model}/seed{seed}/{at}/scores.parquet",
        csv="results/macondo/{model}/seed{seed}/{at}/scores.csv",
    log:
        "results/logs/macondo_eval/{model}/{seed}/{at}.log",
    benchmark:
        "results/benchmarks/macondo_eval/{model}/{seed}/{at}.tsv"
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
                "at": w.at,
            }
        ),
    shell:
        "python -m workflow_scripts macondo-eval --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --index {input.index} --index-meta {input.index_meta} --test {input.test}"
        " --mlp {input.pt} --mlp-json {input.meta} --csv {output.csv} --parquet {output.parquet} 2> {log}"


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
