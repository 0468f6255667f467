# Helpers of rules/incontext.smk: the params and inputs its rules compute from the config.


# rules/incontext.smk: the datastores whose corpus is retrieved from in context, and their tasks
INCONTEXT = config["incontext"]


IC_DATASTORES = INCONTEXT["datastores"]


IC_TASK_RUNS = [
    (d, t) for d, t in TASK_RUNS if d in IC_DATASTORES and INCONTEXT["tasks"]
]


IC_PARAMS = {
    k: INCONTEXT[k]
    for k in ("passage_tokens", "passages", "query_tokens", "stride", "max_tokens")
}


IC_REPORT = "In-context retrieval"  # the report's category of the tables and figures


# the per-token tables of every (datastore, eval set), and the per-item tables of every (datastore, task)
IC_PERPLEXITY = [
    f"results/incontext/{d}/perplexity/{e}" for d in IC_DATASTORES for e in EVAL_SETS
]


IC_TASKS = [f"results/incontext/{d}/tasks/{t}/predictions" for d, t in IC_TASK_RUNS]


IC_BOOT = {
    "seed": config["seed"],
    "n_boot": INCONTEXT["n_boot"],
}  # the tables' bootstrap intervals


# the task table, when there are tasks to score in context
IC_TASK_TABLE = ["results/tables/incontext_tasks.parquet"] if IC_TASK_RUNS else []


def incontext_outputs():
    if not IC_DATASTORES:
        return []
    return [
        "results/tables/incontext_perplexity.csv",
        *(["results/tables/incontext_tasks.csv"] if IC_TASK_RUNS else []),
        *[f"results/figures/incontext/{d}.png" for d in IC_DATASTORES],
    ]


def incontext_perplexity_params(wildcards):
    ex = config["extraction"]
    return as_json(
        IC_PARAMS
        | {"eval_set": wildcards.evalset, "datastore": wildcards.ds}
        | {k: ex[k] for k in ("block_size", "batch_size", "device", "dtype")}
        | ({"point": TASK_POINTS[wildcards.ds]} if wildcards.ds in TASK_POINTS else {})
    )


def incontext_task_params(wildcards):
    p = json.loads(task_score_params(wildcards))
    p |= {"model": DATASTORES[wildcards.ds]["model"]}
    return as_json(p | {k: INCONTEXT[k] for k in ("passages", "max_items")})
