# Helpers of rules/datastore.smk: the params and inputs its rules compute from the config.


def shard_ids(ds):
    """A datastore's shards: `shards` equal ranges, or with `shard_tokens` as many as its plan (checkpoint
    plan_shards) cuts, known once the tokens exist."""
    spec = DATASTORES[ds]
    n = len(shard_plan(ds)["shards"]) if "shard_tokens" in spec else spec["shards"]
    if n > 1000:  # the shard wildcard has three digits
        cut = (
            f"shard_tokens {spec['shard_tokens']}"
            if "shard_tokens" in spec
            else f"shards {n}"
        )
        raise WorkflowError(
            f"datastore {ds}: {n} shards ({cut}), more than the 1000 a datastore can have; "
            f"set datastores.{plan_of(ds)}.shard_tokens or shards to make at most 1000"
        )
    return [f"{i:03d}" for i in range(n)]


def plan_of(ds):
    """The datastore whose shard plan `ds` uses: its own, or a subsample's parent's."""
    return DATASTORES[ds]["subsample"]["of"] if "subsample" in DATASTORES[ds] else ds


def plan_path(ds):
    """A shard_tokens datastore's plan.json (its parent's for a subsample), once plan_shards has run; until then
    Snakemake's checkpoint exception, which defers the jobs that need it."""
    return checkpoints.plan_shards.get(ds=plan_of(ds)).output.out


def shard_plan(ds):
    with open(plan_path(ds)) as f:
        return json.load(f)


def plan_input(wildcards):
    """extract_keys' plan of a shard_tokens datastore, ancient(): a rewritten plan reruns only the shards whose
    range or token slice changed (their params)."""
    if "shard_tokens" not in DATASTORES[wildcards.ds]:
        return []
    return ancient(plan_path(wildcards.ds))


def extract_tokens(wildcards):
    """extract_keys' tokens: ancient() for a shard_tokens datastore, whose shards rerun on their slice (params)."""
    t = ds_tokens(wildcards.ds)
    return ancient(t) if "shard_tokens" in DATASTORES[wildcards.ds] else t


def extraction_params(wildcards):
    """What a shard's keys depend on. `shards: N`: its index of N equal ranges. `shard_tokens`: its range and the
    sha256 of its token slice from the plan, and not the stream's length: a grown stream reruns only the shards
    whose range or slice changed."""
    ex = config["extraction"]
    spec, i = DATASTORES[wildcards.ds], int(wildcards.shard)
    if "shard_tokens" in spec:
        shards = shard_plan(wildcards.ds)["shards"]
        if i >= len(shards):
            raise WorkflowError(
                f"datastore {wildcards.ds}: shard {wildcards.shard} is not in its plan "
                f"({len(shards)} shards of {spec['shard_tokens']} positions, {plan_path(wildcards.ds)})"
            )
        cut = {"shard_tokens": spec["shard_tokens"], "span": shards[i]}
    else:
        cut = {"shards": spec["shards"]}
    return as_json(
        {
            "shard": i,
            **cut,
            **stride_param(spec),
            "block_size": ex["block_size"],
            "batch_size": ex["batch_size"],
            "device": ex["device"],
            "dtype": ex["dtype"],
        }
    )


def plan_params(wildcards):
    return as_json(
        {
            "shard_tokens": DATASTORES[wildcards.ds]["shard_tokens"],
            "block_size": config["extraction"]["block_size"],
            **stride_param(DATASTORES[wildcards.ds]),
        }
    )


# datastores extracted from a model (extract_keys), and those copied from another's rows (subsample_datastore)
SUBSAMPLED = [d for d, spec in DATASTORES.items() if "subsample" in spec]


EXTRACTED = [d for d in DATASTORES if d not in SUBSAMPLED]


# extracted datastores cut into shards of shard_tokens positions: their shard plan is checkpoint plan_shards
PLANNED = [d for d in EXTRACTED if "shard_tokens" in DATASTORES[d]]


def warn_missing_shards():
    """Shard files a datastore's manifest lists that are gone: an interrupted `--forcerun extract_keys` removes
    them, and a plain rerun then has nothing to do (Snakemake rebuilds a missing file only when something
    downstream is out of date), while the next job that reads the datastore fails. Warned about, with the command
    that rebuilds them, whenever the DAG is built."""
    for ds in DATASTORES:
        manifest = Path(f"results/datastores/{ds}/manifest.json")
        try:
            shards = json.loads(manifest.read_text())["shards"]
            listed = [
                manifest.parent / s[k] for s in shards for k in ("keys", "values")
            ]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not built yet, or unreadable: its own readers say so
        gone = [str(f) for f in listed if not f.exists()]
        if gone:
            logger.warning(
                f"datastores.{ds}: {len(gone)} shard files that {manifest} lists are missing ({', '.join(gone[:4])}"
                f"{', ...' if len(gone) > 4 else ''}), e.g. after an interrupted --forcerun of extract_keys; "
                f"Snakemake does not rebuild them by itself: rerun the forced command, or snakemake --forcerun "
                + " ".join(shlex.quote(f) for f in gone)
            )


warn_missing_shards()


# every shard's keys, values and meta, as datastore_manifest reads them
SHARD_FILES = {
    "key_shards": lambda w: shard_files(w, "keys_{shard}.npy"),
    "vals": lambda w: shard_files(w, "vals_{shard}.npy"),
    "meta": lambda w: shard_files(w, "shard_{shard}.json"),
}


def shard_files(wildcards, name):
    """One file of every shard of a datastore (`name` with {shard}), as datastore_manifest reads them."""
    return expand(
        f"results/datastores/{wildcards.ds}/shards/{name}",
        shard=shard_ids(wildcards.ds),
    )
