# Helpers of rules/hurdle.smk: the params and inputs its rules compute from the config.


HURDLE_VARIANTS = ["full", "no_last_mlp"]


# what a hurdle run logs, and the figure's title, by data kind
HURDLE_COLUMNS = {"macondo": "children_loglik", "corpus": "train_loss"}


HURDLE_TITLES = {
    "macondo": "Macondo test set: children's log-likelihood while training from scratch",
    "corpus": "Default corpus: training loss from scratch",
}


# the scores of one run
HURDLE_RUN = "results/analyses/hurdle/{data}/{variant}_seed{seed}"


def hurdle_variants(ext):
    """The scores of one seed's runs, one per variant in HURDLE_VARIANTS' order ({data} and {seed} as wildcards)."""
    return [
        HURDLE_RUN.format(data="{data}", variant=v, seed="{seed}") + f".{ext}"
        for v in HURDLE_VARIANTS
    ]


def hurdle_params(wildcards):
    """What one seed's hurdle runs depend on: the data kind, the variants, the seed, the model's shape, the run
    config."""
    shape = MODELS[HURDLE["model"]]["train"]
    return as_json(
        {
            "data": wildcards.data,
            "variants": HURDLE_VARIANTS,
            "seed": int(wildcards.seed),
            "shape": {k: shape[k] for k in ("n_layer", "n_embd", "n_head")},
            "run": HURDLE[wildcards.data],
        }
    )


def hurdle_runs(wildcards):
    """The scores of every run (variant, seed) of one data kind."""
    return expand(
        f"{HURDLE_RUN}.parquet",
        data=wildcards.data,
        variant=HURDLE_VARIANTS,
        seed=HURDLE["seeds"],
    )


def hurdle_data(wildcards):
    m = HURDLE["model"]
    # each seed its own Macondo dataset (and its own initialisation)
    if wildcards.data == "macondo":
        return {"test": f"results/macondo/{m}/seed{wildcards.seed}/data/test.parquet"}
    return {"tokens": f"results/tokens/{m}/{MODELS[m]['train']['corpus']}/train.npy"}
