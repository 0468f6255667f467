# Helpers of rules/docs.smk: the params and inputs its rules compute from the config.


def configfile_names():
    """The config files of this run, relative to the working directory, once each."""
    return list(dict.fromkeys(os.path.relpath(c) for c in workflow.configfiles))


def results_doc_inputs(wildcards):
    """The tables docs/results.md shows, those this config makes, by the results-doc step's argument names."""
    out = {"perplexity": "results/tables/perplexity_summary.csv"}
    if TASK_RUNS:
        out["tasks"] = "results/tables/task_summary.csv"
    tables = {"macondo": "macondo", "projection": "projection", "mlp": "mlp_lm"}
    out |= {k: f"results/tables/{t}.csv" for k, t in tables.items() if ANALYSES.get(k)}
    if MACONDO and MACONDO_CHECKPOINTS:
        out["macondo_curve"] = "results/tables/macondo_curve.csv"
    if ANALYSES:
        out["comparison"] = "results/tables/paper2_comparison.csv"
    if SCALING_DATASTORES:
        out["scaling"] = [
            f"results/tables/scaling/{d}/perplexity.csv" for d in SCALING_DATASTORES
        ]
        out["scaling_fits"] = [
            f"results/tables/scaling/{d}/fits.csv" for d in SCALING_DATASTORES
        ]
        with_tasks = [d for d in SCALING_DATASTORES if scaling_tasks_of(d)]
        out["scaling_task_delta"] = [
            f"results/tables/scaling/{d}/task_delta.csv" for d in with_tasks
        ]
        out["scaling_task_fits"] = [
            f"results/tables/scaling/{d}/task_fits.csv" for d in with_tasks
        ]
    return out
