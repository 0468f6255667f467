# Helpers of rules/sweep.smk: the params and inputs its rules compute from the config.


def select_on(ds=None):
    """The eval set on which (λ, k, σ) is chosen: the datastore's `select_on` when it has one; else 'valid' when
    it exists, else each set on itself ('')."""
    if ds is not None and "select_on" in DATASTORES[ds]:
        return DATASTORES[ds]["select_on"]
    return "valid" if "valid" in EVAL_SETS else ""


# every (eval set, datastore) pair: one retrieval cache, one sweep, one figure each
SWEEPS = sorted((e, d) for d in DATASTORES for e in EVAL_SETS)


# the perplexity-vs-λ figure of each (eval set, datastore), labelled by both in the report
SWEEP_FIGURE = "perplexity_vs_lambda/{evalset}/{ds}"


SWEEP_LABELS = {"eval set": "{evalset}", "datastore": "{ds}"}


GRID = {k: config["sweep"][k] for k in ("lambdas", "ks", "sigmas")}  # the λ/k/σ grid


def sweep_params(wildcards):
    spec = EVAL_SETS[wildcards.evalset]
    extraction = {"block_size": config["extraction"]["block_size"]}
    return as_json(
        GRID | extraction | {"word_count": spec["word_count"]} | stride_param(spec)
    )
