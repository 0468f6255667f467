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


def incontext_outputs():
    if not IC_DATASTORES:
        return []
    return [
        "results/tables/incontext_perplexity.csv",
        *(["results/tables/incontext_tasks.csv"] if IC_TASK_RUNS else []),
        *[f"results/figures/incontext/{d}.png" for d in IC_DATASTORES],
    ]
