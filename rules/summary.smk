# What a run produces (rule all's targets, every figure, the table of job times), and the wildcard constraints
# and local rules of the whole workflow: after the wings' rule files, whose outputs it lists.


# Redraws every figure from the cached tables.
rule figures:
    input:
        [p for p in all_outputs() if p.startswith("results/figures/")],


# Makes the per-stage time and memory table from every job's benchmark file (run last).
rule stage_times:
    input:
        summary="results/tables/perplexity_summary.csv",
        figures=[f"results/figures/perplexity_vs_lambda/{e}/{d}.png" for e, d in SWEEPS],
        tasks=task_outputs(),
        analyses=analyses_outputs(),
        scaling=scaling_outputs(),
        incontext=incontext_outputs(),
        neighbours=neighbour_outputs(),
    output:
        **table("results/tables/stage_times", "stage_times", "Pipeline"),
    log:
        "results/logs/stage_times/stage_times.log",
    params:
        benchmarks=BENCHMARKS,
    shell:
        step("stage-times", "--benchmarks {params.benchmarks:q}")


wildcard_constraints:
    ds=names_regex(DATASTORES),
    seed=r"\d+",
    at=r"final|step\d+",
    evalset=names_regex(EVAL_SETS),
    split="train|valid|test",
    shard=r"\d{3}",
    chunk=r"\d{3}",
    task=names_regex(TASK_NAMES),
    fraction=names_regex(SCALING_FRACTIONS),


# Cheap aggregation jobs, and the checks of a retrieval or task cache before its sweep (verify_*), run on the
# submitting host, not as cluster jobs.
localrules:
    all,
    figures,
    summarize,
    perplexity_summary,
    figure_sweep,
    stage_times,
    task_summary,
    figure_tasks,
    macondo_table,
    macondo_curve,
    figure_macondo_curve,
    hurdle_table,
    figure_projection,
    figure_mlp,
    figure_macondo,
    figure_hurdle,
    task_delta,
    paper2_comparison,
    verify_retrieval,
    verify_task_cache,
    verify_sweeps,
    scaling_summary,
    figure_scaling_perplexity,
    figure_scaling_tasks,
    figure_scaling_frequency,
