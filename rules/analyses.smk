# Paper 2's analyses: Macondo (fine-tune, datastore, LM / kNN-LM / MLP-LM scores), the Eq. 2 projection,
# the MLP replacement of kNN retrieval, and the MLP hurdle. Each block of `analyses` in the config is optional.


# Makes one seed's Macondo dataset, children's names checked to be single tokens for the model's tokenizer.
rule macondo_data:
    input:
        model_json=lambda w: model_json(w.model),
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
        code=code("macondo"),
        p=lambda w: as_json({"generate": MACONDO["generate"], "seed": int(w.seed)}),
    shell:
        "python -m workflow_scripts macondo-data --params {params.p:q} --model-json {input.model_json}"
        " --outdir results/macondo/{wildcards.model}/seed{wildcards.seed}/data 2> {log}"


# Fine-tunes the model on one seed's training sentences (over-specified: with a description).
rule macondo_finetune:
    input:
        model_json=lambda w: model_json(w.model),
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
    output:
        hf=directory("results/macondo/{model}/seed{seed}/lm/hf"),
        model_json="results/macondo/{model}/seed{seed}/lm/model.json",
        loss="results/macondo/{model}/seed{seed}/lm/loss.csv",
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
        gpu=GPU,
    params:
        code=code("macondo_lm", "lm"),
        p=lambda w: as_json({"finetune": MACONDO["finetune"], "seed": int(w.seed)}),
    shell:
        "python -m workflow_scripts macondo-finetune --params {params.p:q} --threads {threads}"
        " --model-json {input.model_json} --train {input.train} --outdir {output.hf} --out {output.model_json}"
        " --out-stem results/macondo/{wildcards.model}/seed{wildcards.seed}/lm/loss 2> {log}"


# Makes the fine-tuned model's datastore over the training sentences, with a Flat index.
rule macondo_datastore:
    input:
        model_json="results/macondo/{model}/seed{seed}/lm/model.json",
        train="results/macondo/{model}/seed{seed}/data/train.parquet",
    output:
        manifest="results/macondo/{model}/seed{seed}/datastore/manifest.json",
        index="results/macondo/{model}/seed{seed}/datastore/index.faiss",
        index_meta="results/macondo/{model}/seed{seed}/datastore/index.json",
    log:
        "results/logs/macondo_datastore/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_datastore/{model}/{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        code=code("macondo_lm", "datastore", "index", "lm", "scoring"),
    shell:
        "python -m workflow_scripts macondo-datastore --threads {threads} --model-json {input.model_json}"
        " --train {input.train} --outdir results/macondo/{wildcards.model}/seed{wildcards.seed}/datastore 2> {log}"


# Trains the MLP that maps the Macondo datastore's keys to its values (paper 2, App. D).
rule macondo_mlp:
    input:
        model_json="results/macondo/{model}/seed{seed}/lm/model.json",
        manifest="results/macondo/{model}/seed{seed}/datastore/manifest.json",
    output:
        pt="results/macondo/{model}/seed{seed}/mlp/mlp.pt",
        meta="results/macondo/{model}/seed{seed}/mlp/mlp.json",
    log:
        "results/logs/macondo_mlp/{model}/{seed}.log",
    benchmark:
        "results/benchmarks/macondo_mlp/{model}/{seed}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=GPU,
    params:
        code=code("mlp_lm", "lm"),
        p=lambda w: as_json({"mlp": MACONDO["mlp"], "seed": int(w.seed)}),
    shell:
        "python -m workflow_scripts train-mlp --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --out {output.pt} --out-json {output.meta}"
        " --out-stem results/macondo/{wildcards.model}/seed{wildcards.seed}/mlp/loss 2> {log}"


# Scores the children's names on the test sentences with the LM, the kNN-LM and the MLP-LM.
rule macondo_eval:
    input:
        model_json="results/macondo/{model}/seed{seed}/lm/model.json",
        manifest="results/macondo/{model}/seed{seed}/datastore/manifest.json",
        index="results/macondo/{model}/seed{seed}/datastore/index.faiss",
        test="results/macondo/{model}/seed{seed}/data/test.parquet",
        pt="results/macondo/{model}/seed{seed}/mlp/mlp.pt",
        meta="results/macondo/{model}/seed{seed}/mlp/mlp.json",
    output:
        "results/macondo/{model}/seed{seed}/scores.parquet",
        "results/macondo/{model}/seed{seed}/scores.csv",
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
        code=code("macondo_lm", "mlp_lm", "knnlm", "scoring", "retrieval"),
        p=as_json({k: MACONDO[k] for k in ("knn", "mlp_lambda")} if MACONDO else {}),
    shell:
        "python -m workflow_scripts macondo-eval --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --parquet {input.test} --mlp {input.pt} --out-json {input.meta}"
        " --out-stem results/macondo/{wildcards.model}/seed{wildcards.seed}/scores 2> {log}"


# Makes the Table 5 / Figure 1 analogue: log-likelihood by number of children, over seeds.
rule macondo_table:
    input:
        scores=lambda w: [f"{macondo_dir(s)}/scores.parquet" for s in MACONDO["seeds"]],
    output:
        csv=report(
            "results/tables/macondo.csv",
            caption="../report/macondo.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        parquet="results/tables/macondo.parquet",
        png=report(
            "results/figures/macondo.png",
            caption="../report/macondo.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        pdf="results/figures/macondo.pdf",
    log:
        "results/logs/macondo_table/macondo.log",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("paper2", "figures"),
    shell:
        "python -m workflow_scripts macondo-table --scores {input.scores} --out-stem results/tables/macondo"
        " --png {output.png} --pdf {output.pdf} 2> {log}"


# Solves Eq. 2 (projection of p_knnlm onto the output space of f and of f∘g) at the eval positions.
rule projection:
    input:
        model_json=lambda w: model_json(DATASTORES[PROJECTION["datastore"]]["model"]),
        manifest=lambda w: f"results/datastores/{PROJECTION['datastore']}/manifest.json",
        tokens=lambda w: eval_tokens(PROJECTION["eval_set"], PROJECTION["datastore"]),
        cache=lambda w: f"results/retrieval/{PROJECTION['eval_set']}/{PROJECTION['datastore']}/meta.json",
        summary="results/tables/perplexity_summary.csv",
    output:
        csv=report(
            "results/tables/projection.csv",
            caption="../report/projection.rst",
            category="Paper 2",
            subcategory="Projection (Eq. 2)",
        ),
        parquet="results/tables/projection.parquet",
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
        code=code("projection", "knnlm", "datastore", "lm"),
        p=lambda w: as_json(
            {
                **PROJECTION,
                "block_size": config["extraction"]["block_size"],
                "batch_size": config["extraction"]["batch_size"],
            }
        ),
    shell:
        "python -m workflow_scripts projection --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --tokens {input.tokens} --cache $(dirname {input.cache}) --sweep {input.summary}"
        " --out-stem results/tables/projection 2> {log}"


# Trains the MLP that replaces kNN retrieval on a backbone datastore (paper 2, §5).
rule train_mlp:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
    output:
        pt="results/analyses/mlp/{ds}/mlp.pt",
        meta="results/analyses/mlp/{ds}/mlp.json",
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
        gpu=GPU,
    params:
        code=code("mlp_lm", "lm"),
        p=lambda w: as_json({"mlp": MLP["train"], "seed": config["seed"]}),
    shell:
        "python -m workflow_scripts train-mlp --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --out {output.pt} --out-json {output.meta}"
        " --out-stem results/analyses/mlp/{wildcards.ds}/loss 2> {log}"


# Perplexity of the MLP-LM at every λ beside the LM and the kNN-LM (λ chosen on the first eval set).
rule mlp_eval:
    input:
        model_json=lambda w: model_json(DATASTORES[MLP["datastore"]]["model"]),
        pt=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.pt",
        meta=lambda w: f"results/analyses/mlp/{MLP['datastore']}/mlp.json",
        caches=lambda w: [
            f"results/retrieval/{e}/{MLP['datastore']}/meta.json" for e in EVAL_SETS
        ],
        summary="results/tables/perplexity_summary.csv",
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
        code=code("mlp_lm", "knnlm", "retrieval"),
        p=lambda w: as_json(
            {
                "datastore": MLP["datastore"],
                "eval_sets": list(EVAL_SETS),
                "choose_on": select_on() or list(EVAL_SETS)[0],
                "lambdas": MLP["lambdas"],
            }
        ),
        caches=lambda w: " ".join(
            f"results/retrieval/{e}/{MLP['datastore']}" for e in EVAL_SETS
        ),
    shell:
        "python -m workflow_scripts mlp-eval --params {params.p:q} --model-json {input.model_json} --out {input.pt}"
        " --out-json {input.meta} --caches {params.caches} --sweep {input.summary} --out-stem results/tables/mlp_lm 2> {log}"


# Trains one randomly initialised LM, with or without its last MLP, logging children's log-likelihood
# (Macondo) or the training loss (corpus) at fixed step intervals (paper 2, App. E).
rule hurdle:
    input:
        unpack(hurdle_data),
        tokenizer_dir=lambda w: f"results/models/{HURDLE['model']}/tokenizer",
    output:
        "results/analyses/hurdle/{data}/{variant}_seed{seed}.parquet",
        "results/analyses/hurdle/{data}/{variant}_seed{seed}.csv",
    log:
        "results/logs/hurdle/{data}/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/hurdle/{data}/{variant}_seed{seed}.tsv"
    wildcard_constraints:
        data="macondo|corpus",
        variant="full|no_last_mlp",
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=GPU,
    params:
        code=code("hurdle", "lm", "macondo_lm", "scoring"),
        p=hurdle_params,
        data=lambda w, input: (
            f"--parquet {input.parquet}"
            if w.data == "macondo"
            else f"--tokens {input.tokens}"
        ),
    shell:
        "python -m workflow_scripts hurdle --params {params.p:q} --threads {threads} --tokenizer-dir {input.tokenizer_dir}"
        " {params.data} --out-stem results/analyses/hurdle/{wildcards.data}/{wildcards.variant}_seed{wildcards.seed} 2> {log}"


# Makes the hurdle curves (Fig. 4 / Fig. 5 analogues) and their table.
rule hurdle_table:
    input:
        scores=lambda w: expand(
            "results/analyses/hurdle/{data}/{variant}_seed{seed}.parquet",
            data=w.data,
            variant=HURDLE_VARIANTS,
            seed=HURDLE["seeds"],
        ),
    output:
        csv=report(
            "results/tables/hurdle_{data}.csv",
            caption="../report/hurdle.rst",
            category="Paper 2",
            subcategory="MLP hurdle",
        ),
        parquet="results/tables/hurdle_{data}.parquet",
        png=report(
            "results/figures/hurdle_{data}.png",
            caption="../report/hurdle.rst",
            category="Paper 2",
            subcategory="MLP hurdle",
        ),
        pdf="results/figures/hurdle_{data}.pdf",
    log:
        "results/logs/hurdle_table/{data}.log",
    wildcard_constraints:
        data="macondo|corpus",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("paper2", "figures"),
        p=lambda w: as_json(
            {
                "kind": "hurdle",
                "column": "children_loglik" if w.data == "macondo" else "train_loss",
                "title": (
                    "Macondo test set: children's log-likelihood while training from scratch"
                    if w.data == "macondo"
                    else "Default corpus: training loss from scratch"
                ),
            }
        ),
    shell:
        "python -m workflow_scripts paper2-figure --params {params.p:q} --scores {input.scores}"
        " --out-stem results/tables/hurdle_{wildcards.data} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws the projection and MLP-LM figures from their tables.
rule paper2_figure:
    input:
        "results/tables/{name}.parquet",
    output:
        png=report(
            "results/figures/{name}.png",
            caption="../report/paper2_figures.rst",
            category="Paper 2",
            subcategory="Figures",
        ),
        pdf="results/figures/{name}.pdf",
    log:
        "results/logs/paper2_figure/{name}.log",
    wildcard_constraints:
        name="projection|mlp_lm",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("paper2", "figures"),
        p=lambda w: as_json({"kind": "mlp" if w.name == "mlp_lm" else w.name}),
    shell:
        "python -m workflow_scripts paper2-figure --params {params.p:q} --parquet {input} --png {output.png} --pdf {output.pdf} 2> {log}"


# Makes the side-by-side table: every number of ours beside the paper's, with the setup of each.
rule paper2_comparison:
    input:
        **paper2_inputs(),
    output:
        csv=report(
            "results/tables/paper2_comparison.csv",
            caption="../report/paper2_comparison.rst",
            category="Paper 2",
        ),
        parquet="results/tables/paper2_comparison.parquet",
    log:
        "results/logs/paper2_comparison/paper2_comparison.log",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("paper2"),
        p=as_json({"inputs": list(paper2_inputs()), "setups": paper2_setups()}),
    shell:
        "python -m workflow_scripts paper2-comparison --params {params.p:q} --scores {input}"
        " --out-stem results/tables/paper2_comparison 2> {log}"
