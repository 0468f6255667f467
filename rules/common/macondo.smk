# Helpers of rules/macondo.smk: the params and inputs its rules compute from the config.


MACONDO_CHECKPOINTS = sorted((MACONDO or {}).get("checkpoints", []))


# what each Macondo seed is evaluated at: the fine-tuned model, and the checkpoints along its fine-tuning
MACONDO_AT = ["final", *[f"step{s}" for s in MACONDO_CHECKPOINTS]]


# the points that get an MLP beside their datastore (macondo_memory); the others a datastore only
MACONDO_MLP_AT = MACONDO_AT if (MACONDO or {}).get("checkpoint_mlp") else ["final"]


def macondo_dir(seed):
    return f"results/macondo/{MACONDO['model']}/seed{seed}"


MACONDO_SEED = "results/macondo/{model}/seed{seed}"  # one seed's dataset, fine-tuned model and memories


def macondo_eval_params(wildcards):
    p = {k: MACONDO[k] for k in ("knn", "mlp_lambda")}
    return as_json(
        p | {"seed": int(wildcards.seed), "at": MACONDO_AT, "mlp_at": MACONDO_MLP_AT}
    )


def macondo_seeds(rel):
    """An input function: the file `rel` of every Macondo seed (with {at}: at every point of MACONDO_AT)."""
    return lambda w: [
        f"{macondo_dir(s)}/{rel}".format(at=at)
        for s in MACONDO["seeds"]
        for at in (MACONDO_AT if "{at}" in rel else [None])
    ]


def macondo_at(rel, at=None):
    """A Macondo seed's file ``rel`` at each point of ``at`` (default MACONDO_AT: the fine-tuned model and every
    checkpoint), in that order ({model} and {seed} left as wildcards)."""
    return [f"{MACONDO_SEED}/{a}/{rel}" for a in (MACONDO_AT if at is None else at)]
