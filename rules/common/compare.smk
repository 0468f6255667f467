# Helpers of rules/compare.smk: the params and inputs its rules compute from the config.


def analyses_outputs():
    if not ANALYSES:
        return []
    figs = {
        "projection": "projection",
        "mlp": "mlp_lm",
        "macondo": "macondo",
    }
    out = ["results/tables/paper2_comparison.csv"]
    out += [f"results/figures/{figs[k]}.png" for k in figs if ANALYSES.get(k)]
    if MACONDO and MACONDO_CHECKPOINTS:
        out.append("results/figures/macondo_curve.png")
    if HURDLE:
        out += [f"results/figures/hurdle_{d}.png" for d in ("macondo", "corpus")]
    return out


def paper2_inputs():
    """The analyses' tables that the side-by-side comparison reads, by keyword (its step's argument names)."""
    out = {}
    if PROJECTION:
        out["projection"] = "results/tables/projection.parquet"
    if MLP:
        out["mlp"] = "results/tables/mlp_lm.parquet"
    if MACONDO:
        out["macondo"] = "results/tables/macondo.parquet"
    if (
        MACONDO and MACONDO_CHECKPOINTS
    ):  # Table 5 at the checkpoint nearest the paper's step
        out["macondo_curve"] = "results/tables/macondo_curve.parquet"
    if HURDLE:
        out["hurdle_macondo"] = "results/tables/hurdle_macondo.parquet"
        out["hurdle_corpus"] = "results/tables/hurdle_corpus.parquet"
    return out
