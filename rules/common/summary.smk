# Helpers of rules/summary.smk: the params and inputs its rules compute from the config.


def all_outputs():
    return [
        "results/tables/perplexity_summary.csv",
        "results/tables/stage_times.csv",
        *[f"results/figures/perplexity_vs_lambda/{e}/{d}.png" for e, d in SWEEPS],
        *expand("results/models/{model}/loss.csv", model=TRAINED_AND_USED),
        *task_outputs(),
        *analyses_outputs(),
        *scaling_outputs(),
        *incontext_outputs(),
        *neighbour_outputs(),
    ]
