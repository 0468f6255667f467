# Helpers of rules/macondo.smk: the params and inputs its rules compute from the config.


MACONDO_CHECKPOINTS = sorted((MACONDO or {}).get("checkpoints", []))


# what each Macondo seed is evaluated at: the fine-tuned model, and the checkpoints along its fine-tuning
MACONDO_AT = ["final", *[f"step{s}" for s in MACONDO_CHECKPOINTS]]


def macondo_dir(seed):
    return f"results/macondo/{MACONDO['model']}/seed{seed}"


MACONDO_SEED = "results/macondo/{model}/seed{seed}"  # one seed's dataset, fine-tuned model and memories


def macondo_eval_params(wildcards):
    p = {k: MACONDO[k] for k in ("knn", "mlp_lambda")}
    return as_json(p | {"seed": int(wildcards.seed), "at": MACONDO_AT})


def macondo_seeds(rel):
    """An input function: the file `rel` of every Macondo seed (with {at}: at every point of MACONDO_AT)."""
    return lambda w: [
        f"{macondo_dir(s)}/{rel}".format(at=at)
        for s in MACONDO["seeds"]
        for at in (MACONDO_AT if "{at}" in rel else [None])
    ]


def macondo_at(rel):
    """A Macondo seed's file ``rel`` at the fine-tuned model and at every checkpoint, in MACONDO_AT's order
    ({model} and {seed} left as wildcards)."""
    return [f"{MACONDO_SEED}/{at}/{rel}" for at in MACONDO_AT]
