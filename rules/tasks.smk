# Tasks (paper 1): memory- vs reasoning-intensive tasks, base LM vs kNN-LM. Entries in
# workflow_scripts/tasks/registry.yaml (+ tasks.custom); one scoring job per (datastore, task), the datastore
# naming its model; every (λ, k, σ) is a rescoring of the task's retrieval cache.


# Makes the offline synthetic task suite from the world and training split of the synthetic corpus.
rule task_suite:
    input:
        train=lambda w: f"results/corpus/{TASKS['synthetic']['corpus']}/train.parquet",
        world=lambda w: f"results/corpus/{TASKS['synthetic']['corpus']}/world.json",
    output:
        out=[f"results/task_suite/{t}.jsonl" for t in SYNTHETIC],
    log:
        "results/logs/task_suite/task_suite.log",
    benchmark:
        "results/benchmarks/task_suite/task_suite.tsv"
    params:
        p=task_suite_params,
    shell:
        step("task-suite")


# Makes a task's items (the entry applied to its dataset rows) from the hub, a local file or the suite.
rule load_task:
    input:
        unpack(task_source),
    output:
        out="results/task_data/{task}.parquet",
    log:
        "results/logs/load_task/{task}.log",
    benchmark:
        "results/benchmarks/load_task/{task}.tsv"
    params:
        p=load_task_params,
    shell:
        step("load-task")


# Makes one chunk of a task's scoring (tasks.chunks > 1): a temporary partial cache of whole blocks of its items.
rule score_task_chunk:
    input:
        unpack(task_summary_input),
        **SCORE_INPUTS,
    output:
        **chunk_outputs(TASK_CACHE, TASK),
    log:
        "results/logs/score_task_chunk/{ds}/{task}/{chunk}.log",
    benchmark:
        "results/benchmarks/score_task_chunk/{ds}/{task}/{chunk}.tsv"
    threads: SEARCH_THREADS
    resources:
        mem_mb=task_plan_mb,
        gpu=task_chunk_gpu,
    params:
        p=lambda w: task_score_params(w, chunk=[int(w.chunk), TASK_CHUNKS]),
    shell:
        step("score-task-chunk")


# Makes a task's retrieval cache (teacher-forced kinds) or its decoded answers (generate) on a datastore: in one
# job, or (tasks.chunks > 1) by joining its chunks, a cheap job.
rule score_task:
    input:
        unpack(task_summary_input),
        unpack(chunk_inputs(TASK_CHUNKS, TASK, "scored.json", ["scored.npz"])),
        **SCORE_INPUTS,
    output:
        **TASK_CACHE,
    log:
        "results/logs/score_task/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/score_task/{ds}/{task}.tsv"
    threads: SEARCH_THREADS
    resources:
        mem_mb=task_plan_mb,
        gpu=lambda w: GPU if TASK_CHUNKS == 1 else 0,
    params:
        p=task_score_params,
    shell:
        step("score-task")


# Checks a task cache as the task sweep does (the npz's sha256, its task, datastore manifest and items) before
# task_sweep starts, so that a failed check keeps the task sweep's previous outputs; temp(), so it runs whenever
# task_sweep does.
rule verify_task_cache:
    input:
        **TASK_CACHE_INPUTS,
    output:
        out=temp(f"{TASK}/verified.json"),
    log:
        "results/logs/verify_task_cache/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/verify_task_cache/{ds}/{task}.tsv"
    params:
        p=lambda w: as_json({"task": w.task}),
    shell:
        step("verify-task-cache")


# Makes a task's metric over the λ/k/σ grid, its per-item predictions and its one-row summary.
rule task_sweep:
    input:
        **TASK_CACHE_INPUTS,
        verified=rules.verify_task_cache.output.out,
        summary="results/sweeps/summary.csv",
    output:
        **table(f"{TASK}/sweep", "task_sweep", "Tasks (paper 1)", "Sweeps"),
        predictions=f"{TASK}/predictions.parquet",
        summary_json=f"{TASK}/summary.json",
    log:
        "results/logs/task_sweep/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/task_sweep/{ds}/{task}.tsv"
    params:
        p=task_sweep_params,
    shell:
        step("task-sweep")


# Makes the task table: base LM vs kNN-LM per (datastore, task), at the perplexity-chosen and the best point, and
# in-context retrieval beside them where it ran (incontext.datastores).
rule task_summary:
    input:
        summaries=[f"results/tasks/{d}/{t}/summary.json" for d, t in TASK_RUNS],
        incontext=(["results/tables/incontext_tasks.parquet"] if IC_TASK_RUNS else []),
    output:
        **table("results/tables/task_summary", "task_summary", "Tasks (paper 1)"),
    log:
        "results/logs/task_summary/task_summary.log",
    shell:
        step("task-summary")


# Makes the table of Δ = kNN-LM − base LM per task, with 95% bootstrap intervals over items.
rule task_delta:
    input:
        predictions=task_files(f"{TASK}/predictions.parquet"),
    output:
        **table("results/tables/task_delta/{ds}", "task_delta", "Tasks (paper 1)"),
    log:
        "results/logs/task_delta/{ds}.log",
    params:
        p=as_json({"seed": config["seed"]}),
    shell:
        step("task-delta")


# Makes the table of Δ = kNN-LM − base LM by subtask (BBH's 27), task and category, with stratified 95% bootstrap
# intervals over items.
rule task_subtask_delta:
    input:
        predictions=task_files(f"{TASK}/predictions.parquet"),
        task_items=task_files("results/task_data/{task}.parquet"),
    output:
        **table("results/tables/task_subtasks/{ds}", "task_subtasks", "Tasks (paper 1)"),
    log:
        "results/logs/task_subtask_delta/{ds}.log",
    benchmark:
        "results/benchmarks/task_subtask_delta/{ds}.tsv"
    params:
        p=as_json({"seed": config["seed"]}),
    shell:
        step("task-subtask-delta")


# Makes the qualitative table: reasoning items the kNN-LM got right and the base LM did not, with neighbours.
rule task_examples:
    input:
        predictions=task_files(f"{TASK}/predictions.parquet", "reasoning"),
        tokens=lambda w: ds_tokens(w.ds),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
    output:
        **table("results/tables/task_examples/{ds}", "task_examples", "Tasks (paper 1)"),
    log:
        "results/logs/task_examples/{ds}.log",
    params:
        p=as_json({"window": 24, "items_per_task": 5, "neighbours": 4}),
    shell:
        step("task-examples")
