# In-context retrieval beside the kNN-LM (workflow_scripts/incontext.py, tasks/incontext.py; docs/incontext.md):
# per datastore listed in incontext.datastores, its corpus cut into passages with a BM25 index (once), then each eval
# set and each of its tasks scored with the top passage(s) before the text; tables and a figure of the three.


# Makes a datastore's passages (its corpus cut in order) and their BM25 index, leaving out passages that share an
# n-gram of incontext.leak_ngram tokens with an eval set's text.
rule passages:
    input:
        tokens=lambda w: ds_tokens(w.ds),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        eval_tokens=lambda w: [eval_tokens(e, w.ds) for e in sorted(EVAL_SETS)],
    output:
        meta="results/incontext/{ds}/passages/meta.json",
        passages="results/incontext/{ds}/passages/passages.npy",
        bm25=directory("results/incontext/{ds}/passages/bm25"),
    log:
        "results/logs/passages/{ds}.log",
    benchmark:
        "results/benchmarks/passages/{ds}.tsv"
    params:
        p=as_json({k: INCONTEXT[k] for k in ("passage_tokens", "leak_ngram")}),
        names=",".join(sorted(EVAL_SETS)),
    shell:
        step("passages", "--eval-names {params.names:q}")


# Scores an eval set with in-context retrieval, beside the base LM and the kNN-LM at the chosen point (per token).
# One thread, as incontext_task: their forward passes over short windows used 1.0-1.1 cores when given two, so a
# second core claimed from the scheduler sat idle.
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
        **table("results/incontext/{ds}/perplexity/{evalset}"),
        record="results/incontext/{ds}/perplexity/{evalset}.json",
    log:
        "results/logs/incontext_perplexity/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/incontext_perplexity/{evalset}/{ds}.tsv"
    resources:
        gpu=GPU,
    params:
        p=incontext_perplexity_params,
    shell:
        step("incontext-perplexity")


# Makes the perplexity table: base LM, kNN-LM and in-context retrieval per (eval set, datastore), with intervals.
rule incontext_perplexity_table:
    input:
        records=[f"{x}.json" for x in IC_PERPLEXITY],
        tables=[f"{x}.parquet" for x in IC_PERPLEXITY],
    output:
        **table(
            "results/tables/incontext_perplexity", "incontext_perplexity", IC_REPORT
        ),
    log:
        "results/logs/incontext_perplexity_table/incontext_perplexity_table.log",
    params:
        p=as_json(IC_BOOT | {"block_size": config["extraction"]["block_size"]}),
    shell:
        step("incontext-perplexity-table")


# Scores a task with the top passage(s) before each prompt (base LM), beside the base LM and the kNN-LM per item.
rule incontext_task:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        passages=rules.passages.output.meta,
        ds_tokens=lambda w: ds_tokens(w.ds),
        task_items="results/task_data/{task}.parquet",
        predictions=f"{TASK}/predictions.parquet",
    output:
        **table("results/incontext/{ds}/tasks/{task}/predictions"),
        npz="results/incontext/{ds}/tasks/{task}/scored.npz",
        scored_json="results/incontext/{ds}/tasks/{task}/scored.json",
        record="results/incontext/{ds}/tasks/{task}/predictions.json",
    log:
        "results/logs/incontext_task/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/incontext_task/{ds}/{task}.tsv"
    resources:
        gpu=GPU,
    params:
        p=incontext_task_params,
    shell:
        step("incontext-task")


# Makes the task table: base LM, kNN-LM and in-context retrieval per task and per category, Δ with intervals.
rule incontext_task_table:
    input:
        records=[f"{x}.json" for x in IC_TASKS],
        tables=[f"{x}.parquet" for x in IC_TASKS],
    output:
        **table("results/tables/incontext_tasks", "incontext_tasks", IC_REPORT),
    log:
        "results/logs/incontext_task_table/incontext_task_table.log",
    params:
        p=as_json(IC_BOOT),
    shell:
        step("incontext-task-table")


# Draws a datastore's figure: perplexity of the three per eval set, and task Δ per category, with intervals.
rule figure_incontext:
    input:
        perplexity="results/tables/incontext_perplexity.parquet",
        tasks=IC_TASK_TABLE,
    output:
        **figure("incontext/{ds}", "incontext_figure", IC_REPORT),
    log:
        "results/logs/figure_incontext/{ds}.log",
    params:
        p=lambda w: as_json({"datastore": w.ds}),
    shell:
        step("figure-incontext")
