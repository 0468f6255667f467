# Tasks (paper 1): memory- vs reasoning-intensive tasks, base LM vs kNN-LM. Entries in
# workflow_scripts/tasks/registry.yaml (+ tasks.custom); one scoring job per (datastore, task), the datastore
# naming its model; every (λ, k, σ) is a rescoring of the task's retrieval cache.


# Makes the offline synthetic task suite from the world and training split of the synthetic corpus.
rule task_suite:
    input:
        train=lambda w: f"results/corpus/{TASKS['synthetic']['corpus']}/train.parquet",
        world=lambda w: f"results/corpus/{TASKS['synthetic']['corpus']}/world.json",
    output:
        [f"results/task_suite/{t}.jsonl" for t in SYNTHETIC],
    log:
        "results/logs/task_suite/task_suite.log",
    benchmark:
        "results/benchmarks/task_suite/task_suite.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        p=lambda w: as_json(
            {
                "generators": {
                    t: TASK_REGISTRY[t]["source"]["generator"] for t in SYNTHETIC
                },
                "n_items": TASKS["synthetic"]["n_items"],
                "seed": config["seed"],
            }
        ),
    shell:
        "python -m workflow_scripts task-suite --params {params.p:q} --train {input.train} --world {input.world} --out {output}"
        " 2> {log}"


# Makes a task's items (the entry applied to its dataset rows) from the hub, a local file or the suite.
rule load_task:
    input:
        unpack(task_source),
    output:
        "results/task_data/{task}.parquet",
    log:
        "results/logs/load_task/{task}.log",
    benchmark:
        "results/benchmarks/load_task/{task}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        source=optional_arg("source"),
        p=lambda w: as_json(
            {
                "entry": task_entry(w.task),
                "max_items": TASKS.get("max_items"),
                "seed": config["seed"],
            }
        ),
    shell:
        "python -m workflow_scripts load-task --params {params.p:q} {params.source} --out {output} 2> {log}"


# Makes one chunk of a task's scoring (tasks.chunks > 1): a temporary partial cache of whole blocks of its items.
rule score_task_chunk:
    input:
        unpack(task_summary_input),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        index_data=index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
        task_items="results/task_data/{task}.parquet",
    output:
        npz=temp("results/tasks/{ds}/{task}/chunks/{chunk}/scored.npz"),
        json=temp("results/tasks/{ds}/{task}/chunks/{chunk}/scored.json"),
    log:
        "results/logs/score_task_chunk/{ds}/{task}/{chunk}.log",
    benchmark:
        "results/benchmarks/score_task_chunk/{ds}/{task}/{chunk}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=task_plan_mb,
        runtime=20 * 60,  # paper 1: up to about 12 h (HellaSwag) per task in one job (docs/cluster.md)
        gpu=task_chunk_gpu,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: task_score_params(w, chunk=[int(w.chunk), TASK_CHUNKS]),
        summary=optional_arg("summary"),
    shell:
        "python -m workflow_scripts score-task-chunk --params {params.p:q} --threads {params.threads}"
        " --model-json {input.model_json} --manifest {input.manifest} --index {input.index}"
        " --index-meta {input.index_meta} --items {input.task_items} {params.summary} --npz {output.npz}"
        " --scored-json {output.json} 2> {log}"


# Makes a task's retrieval cache (teacher-forced kinds) or its decoded answers (generate) on a datastore: in one
# job, or (tasks.chunks > 1) by joining its chunks, a cheap job.
rule score_task:
    input:
        unpack(task_summary_input),
        unpack(task_chunk_inputs),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        index_data=index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
        task_items="results/task_data/{task}.parquet",
    output:
        npz="results/tasks/{ds}/{task}/scored.npz",
        json="results/tasks/{ds}/{task}/scored.json",
    log:
        "results/logs/score_task/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/score_task/{ds}/{task}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=task_plan_mb,
        runtime=20 * 60,  # paper 1: up to about 12 h (HellaSwag) per task (docs/cluster.md)
        gpu=lambda w: GPU if TASK_CHUNKS == 1 else 0,
    params:
        threads=ARITHMETIC_THREADS,
        p=task_score_params,
        summary=optional_arg("summary"),
        chunks=optional_arg("chunks"),
    shell:
        "python -m workflow_scripts score-task --params {params.p:q} --threads {params.threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --index {input.index} --index-meta {input.index_meta} --items {input.task_items}"
        " {params.summary} {params.chunks} --npz {output.npz} --scored-json {output.json} 2> {log}"


# Checks a task cache as the task sweep does (the npz's sha256, its task, datastore manifest and items) before
# task_sweep starts, so that a failed check keeps the task sweep's previous outputs; temp(), so it runs whenever
# task_sweep does.
rule verify_task_cache:
    input:
        npz=rules.score_task.output.npz,
        scored_json=rules.score_task.output.json,
        task_items="results/task_data/{task}.parquet",
        manifest="results/datastores/{ds}/manifest.json",
    output:
        temp("results/tasks/{ds}/{task}/verified.json"),
    log:
        "results/logs/verify_task_cache/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/verify_task_cache/{ds}/{task}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    params:
        p=lambda w: as_json({"task": w.task}),
    shell:
        "python -m workflow_scripts verify-task-cache --params {params.p:q} --npz {input.npz}"
        " --scored-json {input.scored_json} --items {input.task_items} --manifest {input.manifest}"
        " --out {output} 2> {log}"


# Makes a task's metric over the λ/k/σ grid, its per-item predictions and its one-row summary.
rule task_sweep:
    input:
        npz=rules.score_task.output.npz,
        scored_json=rules.score_task.output.json,
        task_items="results/task_data/{task}.parquet",
        manifest="results/datastores/{ds}/manifest.json",
        verified=rules.verify_task_cache.output[0],
        summary="results/sweeps/summary.csv",
    output:
        csv=report(
            "results/tasks/{ds}/{task}/sweep.csv",
            caption="../report/task_sweep.rst",
            category="Tasks (paper 1)",
            subcategory="Sweeps",
        ),
        parquet="results/tasks/{ds}/{task}/sweep.parquet",
        predictions="results/tasks/{ds}/{task}/predictions.parquet",
        summary="results/tasks/{ds}/{task}/summary.json",
    log:
        "results/logs/task_sweep/{ds}/{task}.log",
    benchmark:
        "results/benchmarks/task_sweep/{ds}/{task}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        p=task_sweep_params,
    shell:
        "python -m workflow_scripts task-sweep --params {params.p:q} --npz {input.npz} --scored-json {input.scored_json}"
        " --items {input.task_items} --manifest {input.manifest} --summary {input.summary} --csv {output.csv} --parquet {output.parquet}"
        " --predictions {output.predictions} --summary-json {output.summary} 2> {log}"


# Makes the task table: base LM vs kNN-LM per (datastore, task), at the perplexity-chosen and the best point, and
# in-context retrieval beside them where it ran (incontext.datastores).
rule task_summary:
    input:
        summaries=[f"results/tasks/{d}/{t}/summary.json" for d, t in TASK_RUNS],
        incontext=(["results/tables/incontext_tasks.parquet"] if IC_TASK_RUNS else []),
    output:
        csv=report(
            "results/tables/task_summary.csv",
            caption="../report/task_summary.rst",
            category="Tasks (paper 1)",
        ),
        parquet="results/tables/task_summary.parquet",
    log:
        "results/logs/task_summary/task_summary.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts task-summary --summaries {input.summaries} --incontext {input.incontext} --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Makes the table of Δ = kNN-LM − base LM per task, with 95% bootstrap intervals over items.
rule task_delta:
    input:
        lambda w: [
            f"results/tasks/{w.ds}/{t}/predictions.parquet"
            for d, t in TASK_RUNS
            if d == w.ds
        ],
    output:
        csv=report(
            "results/tables/task_delta/{ds}.csv",
            caption="../report/task_delta.rst",
            category="Tasks (paper 1)",
        ),
        parquet="results/tables/task_delta/{ds}.parquet",
    log:
        "results/logs/task_delta/{ds}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        p=as_json({"seed": config["seed"]}),
    shell:
        "python -m workflow_scripts task-delta --params {params.p:q} --predictions {input} --csv {output.csv}"
        " --parquet {output.parquet} 2> {log}"


# Makes the table of Δ = kNN-LM − base LM by subtask (BBH's 27), task and category, with stratified 95% bootstrap
# intervals over items.
rule task_subtask_delta:
    input:
        predictions=lambda w: [
            f"results/tasks/{w.ds}/{t}/predictions.parquet"
            for d, t in TASK_RUNS
            if d == w.ds
        ],
        task_items=lambda w: [
            f"results/task_data/{t}.parquet" for d, t in TASK_RUNS if d == w.ds
        ],
    output:
        csv=report(
            "results/tables/task_subtasks/{ds}.csv",
            caption="../report/task_subtasks.rst",
            category="Tasks (paper 1)",
        ),
        parquet="results/tables/task_subtasks/{ds}.parquet",
    log:
        "results/logs/task_subtask_delta/{ds}.log",
    benchmark:
        "results/benchmarks/task_subtask_delta/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    params:
        p=as_json({"seed": config["seed"]}),
    shell:
        "python -m workflow_scripts task-subtask-delta --params {params.p:q} --predictions {input.predictions}"
        " --items {input.task_items} --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Makes the qualitative table: reasoning items the kNN-LM got right and the base LM did not, with neighbours.
rule task_examples:
    input:
        predictions=lambda w: [
            f"results/tasks/{w.ds}/{t}/predictions.parquet"
            for d, t in TASK_RUNS
            if d == w.ds and TASK_REGISTRY[t]["category"] == "reasoning"
        ],
        tokens=lambda w: ds_tokens(w.ds),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
    output:
        csv=report(
            "results/tables/task_examples/{ds}.csv",
            caption="../report/task_examples.rst",
            category="Tasks (paper 1)",
        ),
        parquet="results/tables/task_examples/{ds}.parquet",
    log:
        "results/logs/task_examples/{ds}.log",
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        p=as_json({"window": 24, "items_per_task": 5, "neighbours": 4}),
    shell:
        "python -m workflow_scripts task-examples --params {params.p:q} --predictions {input.predictions} --tokens {input.tokens}"
        " --model-json {input.model_json} --csv {output.csv} --parquet {output.parquet} 2> {log}"
