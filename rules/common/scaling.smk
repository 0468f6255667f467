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
