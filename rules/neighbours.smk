# What the datastore returned (workflow_scripts/neighbours.py, tasks/neighbours.py): eval positions and task items
# with their nearest neighbours, each neighbour mapped back to its position in the datastore corpus.


# Makes the table of the eval positions where the kNN-LM gains and loses most, with their neighbours.
rule eval_neighbours:
    input:
        cache=lambda w: [
            f"results/retrieval/{e}/{w.ds}/meta.json" for e in sorted(EVAL_SETS)
        ],
        eval_tokens=lambda w: [eval_tokens(e, w.ds) for e in sorted(EVAL_SETS)],
        manifest="results/datastores/{ds}/manifest.json",
        ds_tokens=lambda w: ds_tokens(w.ds),
        parents=neighbour_parents,
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        summary="results/sweeps/summary.csv",
    output:
        **table("results/tables/eval_neighbours/{ds}", "eval_neighbours", "Perplexity"),
    log:
        "results/logs/eval_neighbours/{ds}.log",
    benchmark:
        "results/benchmarks/eval_neighbours/{ds}.tsv"
    params:
        p=lambda w: neighbour_params(w, eval_sets=sorted(EVAL_SETS)),
    shell:
        step("eval-neighbours")


# Makes the table of the task items task_examples picks (kNN-LM right, base LM wrong) and the reverse, with their
# neighbours, and the table of how often the neighbours' values are the gold token, by its datastore frequency.
rule task_neighbours:
    input:
        npz=neighbour_task_files(f"{TASK}/scored.npz"),
        scored_json=neighbour_task_files(f"{TASK}/scored.json"),
        task_items=neighbour_task_files("results/task_data/{task}.parquet"),
        summary=neighbour_task_files(f"{TASK}/summary.json"),
        predictions=neighbour_task_files(f"{TASK}/predictions.parquet"),
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: ds_tokens(w.ds),
        parents=neighbour_parents,
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
    output:
        **table(
            "results/tables/task_neighbours/{ds}", "task_neighbours", "Tasks (paper 1)"
        ),
        **table("results/tables/neighbour_gold/{ds}", name="gold"),
    log:
        "results/logs/task_neighbours/{ds}.log",
    benchmark:
        "results/benchmarks/task_neighbours/{ds}.tsv"
    params:
        p=lambda w: neighbour_params(w, seed=config["seed"]),
    shell:
        step("task-neighbours")


# Draws how often the neighbours' values are the gold token against its frequency in the datastore, memory vs
# reasoning tasks (paper 1's failure analysis).
rule figure_neighbour_gold:
    input:
        table="results/tables/neighbour_gold/{ds}.parquet",
    output:
        **figure("neighbour_gold/{ds}", "neighbour_gold", "Tasks (paper 1)"),
    log:
        "results/logs/figure_neighbour_gold/{ds}.log",
    params:
        p=lambda w: title(f"datastore {w.ds} (model {DATASTORES[w.ds]['model']})"),
    shell:
        step("figure-neighbour-gold")
