# In-context retrieval beside the kNN-LM (workflow_scripts/incontext.py, tasks/incontext.py; docs/incontext.md):
# per datastore listed in incontext.datastores, its corpus cut into passages with a BM25 index (once), then each eval
# set and each of its tasks scored with the top passage(s) before the text; tables and a figure of the three.


# Makes a datastore's passages (its corpus cut in order) and their BM25 index, leaving out passages that share an
# n-gram of incontext.leak_ngram tokens with an eval set's text.
rule passages:
    input:
        tokens=lambda w: ds_tokens(w.ds),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        eval_tokens=lambda w: [eval_tokens(e, w.ds) for e in EVAL_SETS],
    output:
        meta="results/incontext/{ds}/passages/meta.json",
        passages="results/incontext/{ds}/passages/passages.npy",
        bm25=directory("results/incontext/{ds}/passages/bm25"),
    log:
        "results/logs/passages/{ds}.log",
    benchmark:
        "results/benchmarks/passages/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        p=as_json({k: INCONTEXT[k] for k in ("passage_tokens", "leak_ngram")}),
        names=",".join(EVAL_SETS),
    shell:
        "python -m workflow_scripts passages --params {params.p:q} --tokens {input.tokens}"
        " --model-json {input.model_json} --eval-tokens {input.eval_tokens} --eval-names {params.names:q}"
        " --meta {output.meta} 2> {log}"


# Scores an eval set with in-context retrieval, beside the base LM and the kNN-LM at the chosen point (per token).
rule incontext_perplexity:
    input:
        cache=rules.retrieve.output.meta,
        arrays=rules.retrieve.output,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
        passages=rules.passages.output.meta,
        ds_tokens=lambda w: ds_tokens(w.ds),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        summary="results/sweeps/summary.csv",
    output:
        csv="results/incontext/{ds}/perplexity/{evalset}.csv",
        parquet="results/incontext/{ds}/perplexity/{evalset}.parquet",
        record="results/incontext/{ds}/perplexity/{evalset}.json",
    log:
        "results/logs/incontext_perplexity/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/incontext_perplexity/{evalset}/{ds}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPU,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            IC_PARAMS
            | {
                "eval_set": w.evalset,
                "datastore": w.ds,
                "block_size": config["extraction"]["block_size"],
                "batch_size": config["extraction"]["batch_size"],
                "device": config["extraction"]["device"],
                "dtype": config["extraction"]["dtype"],
            }
            | ({"point": TASK_POINTS[w.ds]} if w.ds in TASK_POINTS else {})
        ),
    shell:
        "python -m workflow_scripts incontext-perplexity --params {params.p:q} --threads {params.threads}"
        " --cache {input.cache} --manifest {input.manifest} --tokens {input.tokens} --passages {input.passages}"
        " --ds-tokens {input.ds_tokens} --model-json {input.model_json} --summary {input.summary}"
        " --csv {output.csv} --parquet {output.parquet} --record {output.record} 2> {log}"


# Makes the perplexity table: base LM, kNN-LM and in-context retrieval per (eval set, datastore), with intervals.
rule incontext_perplexity_table:
    input:
        records=[
            f"results/incontext/{d}/perplexity/{e}.json"
            for d in IC_DATASTORES
            for e in EVAL_SETS
        ],
        tables=[
            f"results/incontext/{d}/perplexity/{e}.parquet"
            for d in IC_DATASTORES
            for e in EVAL_SETS
        ],
    output:
        csv=report(
            "results/tables/incontext_perplexity.csv",
            caption="../report/incontext_perplexity.rst",
            category="In-context retrieval",
        ),
        parquet="results/tables/incontext_perplexity.parquet",
    log:
        "results/logs/incontext_perplexity_table/incontext_perplexity_table.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        p=as_json(
            {
                "block_size": config["extraction"]["block_size"],
                "n_boot": INCONTEXT["n_boot"],
                "seed": config["seed"],
            }
        ),
    shell:
        "python -m workflow_scripts incontext-perplexity-table --params {params.p:q} --records {input.records}"
        " --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Scores a task with the top passage(s) before each prompt (base LM), beside the base LM and the kNN-LM per item.
rule incontext_task:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        passages=rules.passages.output.meta,
        ds_tokens=lambda w: ds_tokens(w.ds),
        task_items="results/task_data/{task}.parquet",
        predictions="results/tasks/{ds}/{task}/predictions.parquet",
    output:
        npz="results/incontext/{ds}/tasks/{task}/scored.npz",
        scored_json="results/incontext/{ds}/tasks/{task}/scored.json",
        csv="results/incontext/{ds}/tasks/{task}/predictions.csv",
        parquet="results/incontext/{ds}/tasks/{task}/predictions.parquet",
        record="results/incontext/{ds}/tasks/{task}/predictions.json",
    log:
        "results/logs/incontext_task/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/incontext_task/{ds}/{task}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=GPU,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            json.loads(task_score_params(w))
            | {
                "model": DATASTORES[w.ds]["model"],
                "passages": INCONTEXT["passages"],
                "max_items": INCONTEXT["max_items"],
            }
        ),
    shell:
        "python -m workflow_scripts incontext-task --params {params.p:q} --threads {params.threads}"
        " --model-json {input.model_json} --passages {input.passages} --ds-tokens {input.ds_tokens}"
        " --items {input.task_items} --predictions {input.predictions} --npz {output.npz}"
        " --scored-json {output.scored_json} --csv {output.csv} --parquet {output.parquet}"
        " --record {output.record} 2> {log}"


# Makes the task table: base LM, kNN-LM and in-context retrieval per task and per category, Δ with intervals.
rule incontext_task_table:
    input:
        records=[
            f"results/incontext/{d}/tasks/{t}/predictions.json"
            for d, t in IC_TASK_RUNS
        ],
        tables=[
            f"results/incontext/{d}/tasks/{t}/predictions.parquet"
            for d, t in IC_TASK_RUNS
        ],
    output:
        csv=report(
            "results/tables/incontext_tasks.csv",
            caption="../report/incontext_tasks.rst",
            category="In-context retrieval",
        ),
        parquet="results/tables/incontext_tasks.parquet",
    log:
        "results/logs/incontext_task_table/incontext_task_table.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        p=as_json({"seed": config["seed"], "n_boot": INCONTEXT["n_boot"]}),
    shell:
        "python -m workflow_scripts incontext-task-table --params {params.p:q} --records {input.records}"
        " --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Draws a datastore's figure: perplexity of the three per eval set, and task Δ per category, with intervals.
rule figure_incontext:
    input:
        perplexity="results/tables/incontext_perplexity.parquet",
        tasks=lambda w: (
            ["results/tables/incontext_tasks.parquet"] if IC_TASK_RUNS else []
        ),
    output:
        png=report(
            "results/figures/incontext/{ds}.png",
            caption="../report/incontext_figure.rst",
            category="In-context retrieval",
        ),
        pdf="results/figures/incontext/{ds}.pdf",
    log:
        "results/logs/figure_incontext/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"datastore": w.ds}),
    shell:
        "python -m workflow_scripts figure-incontext --params {params.p:q} --perplexity {input.perplexity}"
        " --tasks {input.tasks} --png {output.png} --pdf {output.pdf} 2> {log}"
