# Helpers of rules/neighbours.smk: the params and inputs its rules compute from the config.


def neighbour_params(wildcards, **extra):
    """The neighbour views' params: config neighbours, the datastore, the keys' block (extraction.block_size)."""
    return as_json(
        {
            **config["neighbours"],
            "datastore": wildcards.ds,
            "block_size": config["extraction"]["block_size"],
            **extra,
        }
    )


def neighbour_parents(wildcards):
    """A subsample's parent manifest, read to map its rows to corpus positions (none for an extracted one)."""
    sub = DATASTORES[wildcards.ds].get("subsample")
    return [f"results/datastores/{sub['of']}/manifest.json"] if sub else []


def neighbour_tasks(ds):
    """The tasks of a datastore whose items have a query (teacher-forced kinds, not generate)."""
    return [
        t for d, t in TASK_RUNS if d == ds and TASK_REGISTRY[t]["kind"] != "generate"
    ]


def neighbour_outputs():
    out = [f"results/tables/eval_neighbours/{d}.csv" for d in DATASTORES]
    out += [
        f"results/{x}/{d}.{e}"
        for d in TASK_DATASTORES
        for x, e in (("tables/task_subtasks", "csv"), ("figures/neighbour_gold", "png"))
        if x.endswith("subtasks") or neighbour_tasks(d)
    ]
    return out


def neighbour_task_files(name):
    """An input function: the file `name` of each task of the job's datastore whose items have a query."""
    return lambda w: [name.format(ds=w.ds, task=t) for t in neighbour_tasks(w.ds)]
