# Helpers of rules/scaling.smk: the params and inputs its rules compute from the config.


SCALING = config.get("scaling") or {}


SCALING_DATASTORES = SCALING.get("datastores", [])


# fractions as they appear in paths and tables (workflow_scripts/scaling.py fraction_name)
SCALING_FRACTIONS = [f"{float(f):g}" for f in sorted(SCALING.get("fractions", []))]


SCALING_TABLES = ["perplexity", "grid", "fits", "frequency"]


def scaling_tasks_of(ds):
    """The tasks of a scaling datastore whose caches can be subsampled (teacher-forced kinds, not generate)."""
    if ds not in SCALING_DATASTORES:
        return []
    return [
        t for d, t in TASK_RUNS if d == ds and TASK_REGISTRY[t]["kind"] != "generate"
    ]


def scaling_outputs():
    out = []
    for d in SCALING_DATASTORES:
        out += [f"results/tables/scaling/{d}/{t}.csv" for t in SCALING_TABLES]
        out += [
            f"results/figures/scaling/{d}/{f}.png" for f in ("perplexity", "frequency")
        ]
        if scaling_tasks_of(d):
            out += [
                f"results/tables/scaling/{d}/task_delta.csv",
                f"results/figures/scaling/{d}/tasks.png",
            ]
    return out


SCALING_RUNS = [(e, f) for e in sorted(EVAL_SETS) for f in SCALING_FRACTIONS]


SCALING_DIR = (
    "results/scaling/{evalset}/{ds}/{fraction}"  # one (eval set, datastore, fraction)
)


SCALING_OUT = "results/tables/scaling/{ds}"  # a datastore's scaling tables


def scaling_files(name):
    """The file `name` of every (eval set, fraction) of the job's datastore."""
    return [f"results/scaling/{e}/{{ds}}/{f}/{name}" for e, f in SCALING_RUNS]


def scaling_task_files(name):
    """An input function: the file `name` of each task of the job's datastore in the scaling study."""
    return lambda w: [name.format(ds=w.ds, task=t) for t in scaling_tasks_of(w.ds)]


def scaling_figure(name, caption, label):
    labels = {"figure": label, "datastore": "{ds}"}
    return figure(f"scaling/{{ds}}/{name}", caption, "Scaling", None, labels)


def scaling_sweep_params(wildcards):
    p = {"fraction": float(wildcards.fraction), "seed": SCALING["seed"], "grid": GRID}
    return as_json(p | search_params())


def scaling_summary_params(wildcards):
    return as_json(
        {
            "keys": SCALING_RUNS,
            "datastore": wildcards.ds,
            "select_on": select_on(wildcards.ds),
            "seed": config["seed"],
            "n_boot": SCALING["n_boot"],
            "block_size": config["extraction"]["block_size"],
        }
    )


def scaling_tasks_params(wildcards):
    ds = wildcards.ds
    return as_json(
        {
            "datastore": ds,
            "model": DATASTORES[ds]["model"],
            "entries": {t: task_entry(t) for t in scaling_tasks_of(ds)},
            "point": TASK_POINTS.get(ds),
            "seed": config["seed"],
            "scaling_seed": SCALING["seed"],
            "n_boot": SCALING["n_boot"],
            **search_params(),
        }
    )
