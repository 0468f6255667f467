# Helpers of rules/tasks.smk: the params and inputs its rules compute from the config.


TASKS = config["tasks"]


TASK_REGISTRY = _tasks.registry(TASKS.get("custom"))


# one scoring job per (datastore, task); the datastore names its model
TASK_RUNS = sorted((d, t) for d, names in TASKS["evaluate"].items() for t in names)


TASK_NAMES = sorted({t for _, t in TASK_RUNS})


# each evaluated task's entry as loaded and scored, its paper files and label files read once per DAG build
TASK_ENTRIES = {
    t: _tasks.resolve_entry(TASK_REGISTRY[t], TASKS.get("paper_data"), t)
    for t in TASK_NAMES
}


TASK_DATASTORES = sorted({d for d, _ in TASK_RUNS})


# datastore -> (λ, k, σ) its tasks use, pinned in the config instead of chosen on perplexity
TASK_POINTS = {
    d: [pt["lambda"], pt["k"], pt["sigma"]]
    for d, pt in (TASKS.get("points") or {}).items()
}


SYNTHETIC = [t for t in TASK_NAMES if TASK_REGISTRY[t]["source"]["type"] == "synthetic"]


def task_entry(task):
    """The registry entry as scored: a synthetic source becomes the suite's jsonl file, a local one stays, a
    paper one becomes its file in tasks.paper_data (its label file read into the entry's words).
    """
    e = dict(TASK_ENTRIES[task])
    if e["source"]["type"] == "synthetic":
        e["source"] = {"type": "local", "path": f"results/task_suite/{task}.jsonl"}
    return e


def task_source(wildcards):
    """The local file a task reads (a suite file for synthetic tasks); none for a hub dataset."""
    src = task_entry(wildcards.task)["source"]
    return {"source": src["path"]} if src["type"] == "local" else {}


def task_score_params(wildcards, chunk=None):
    """What a task's scoring depends on: the entry, K_max, the window, and for generate tasks the decoding (and
    the grid, when every grid point is decoded); for a chunk, which one ([i, n])."""
    ex, sw = config["extraction"], config["sweep"]
    e = task_entry(wildcards.task)
    p = ({"chunk": chunk} if chunk else {}) | {
        "task": wildcards.task,
        "entry": e,
        "datastore": wildcards.ds,
        "k_max": sw["k_max"],
        "block_size": ex["block_size"],
        "batch_size": TASKS["batch_size"],
        "device": ex["device"],
        "dtype": ex["dtype"],
        **search_params(),
        "gpu_shard_above_gb": config["index"]["gpu_shard_above_gb"],
    }
    if e["kind"] == "generate":
        if wildcards.ds in TASK_POINTS:
            p["point"] = TASK_POINTS[wildcards.ds]
        p["generate"] = TASKS["generate"]
        if p["generate"]["points"] == "grid":
            p["grid"] = GRID
    return as_json(p)


TASK_CHUNKS = TASKS["chunks"]


TASK = "results/tasks/{ds}/{task}"


TASK_CACHE = {"npz": f"{TASK}/scored.npz", "scored_json": f"{TASK}/scored.json"}


# what the checks of a task cache read: the cache, the task's items, the datastore's manifest
TASK_CACHE_INPUTS = TASK_CACHE | {
    "task_items": "results/task_data/{task}.parquet",
    "manifest": "results/datastores/{ds}/manifest.json",
}


# what every task-scoring job reads: the model, the datastore and its index, the task's items
SCORE_INPUTS = {
    "model_json": lambda w: model_json(DATASTORES[w.ds]["model"]),
    **SEARCH_INPUTS,
    "task_items": "results/task_data/{task}.parquet",
}


def task_files(name, category=None):
    """An input function: the file `name` of each task scored on the job's datastore (of a category)."""
    return lambda w: [
        name.format(ds=w.ds, task=t)
        for d, t in TASK_RUNS
        if d == w.ds and category in (None, TASK_REGISTRY[t]["category"])
    ]


def task_suite_params(wildcards):
    generators = {t: TASK_REGISTRY[t]["source"]["generator"] for t in SYNTHETIC}
    n = TASKS["synthetic"]["n_items"]
    return as_json({"generators": generators, "n_items": n, "seed": config["seed"]})


def load_task_params(wildcards):
    e = task_entry(wildcards.task)
    return as_json(
        {"entry": e, "max_items": TASKS.get("max_items"), "seed": config["seed"]}
    )


def task_items(wildcards):
    """The items a task-scoring job scores (those of its chunk, cut as the step cuts them: memory.chunk_bounds on
    whole blocks), or None before load_task has written them."""
    try:
        items = _items.read_items(f"results/task_data/{wildcards.task}.parquet")
    except OSError:
        return None
    if "chunk" in wildcards.keys():
        p = json.loads(task_score_params(wildcards))
        a, b = _memory.chunk_bounds(len(items), TASK_CHUNKS, _memory.task_block(p))[
            int(wildcards.chunk)
        ]
        items = items[a:b]
    return items


def task_chunk_gpu(wildcards):
    """A chunk with no items (a task of fewer blocks than tasks.chunks) loads no model: no GPU for it."""
    items = task_items(wildcards)
    return GPU if items is None or items else 0


def task_plan_mb(wildcards, input=None, threads=None):
    """A task-scoring job's mem_mb (workflow_scripts/memory.py), planned from its items (task_items) as the step
    plans it, with a bound on their scored tokens (the step counts them and checks its own plan, never above this
    one); for the job joining chunks, the largest chunk's arrays. A placeholder while the manifest or the items
    do not exist yet (Snakemake asks again before it schedules the job)."""
    manifest = _memory.read_manifest(f"results/datastores/{wildcards.ds}/manifest.json")
    items = task_items(wildcards)
    if manifest is None or items is None:
        return _memory.BASE_MB
    p = json.loads(task_score_params(wildcards))
    if "chunk" not in wildcards.keys() and TASK_CHUNKS > 1:
        n = _memory.task_join_rows(items, p, TASK_CHUNKS)
        return _memory.estimate_mb(
            "score_task", manifest, config["index"], p["k_max"], n, {"model": False}
        )[0]
    ident = _memory.read_manifest(model_json(DATASTORES[wildcards.ds]["model"])) or {}
    n, block = _memory.task_queries(items, p)
    plan = {
        "window": p["block_size"],
        "batch": p["batch_size"],
        "vocab": ident.get("vocab_size", 0),
        "device": p["device"],
        "block_queries": block,
    }
    job = "score_task_chunk" if "chunk" in wildcards.keys() else "score_task"
    return _memory.estimate_mb(job, manifest, config["index"], p["k_max"], n, plan)[0]


def task_sweep_params(wildcards):
    """What a task's sweep depends on: the entry, the λ/k/σ grid and the pinned point, if any (a point chosen on
    perplexity is an input file)."""
    p = {
        "task": wildcards.task,
        "entry": task_entry(wildcards.task),
        "datastore": wildcards.ds,
        "model": DATASTORES[wildcards.ds]["model"],
        "grid": GRID,
    }
    if wildcards.ds in TASK_POINTS:
        p["point"] = TASK_POINTS[wildcards.ds]
    return as_json(p)


def task_summary_input(wildcards):
    """Generate tasks decode at the point chosen on perplexity, so they wait for summarize's table of it."""
    if TASK_REGISTRY[wildcards.task]["kind"] == "generate":
        return {"summary": "results/sweeps/summary.csv"}
    return {}


def task_outputs():
    if not TASK_RUNS:
        return []
    return [
        "results/tables/task_summary.csv",
        *[f"results/figures/task_delta/{d}.png" for d in TASK_DATASTORES],
        *[
            f"results/tables/task_examples/{d}.csv"
            for d in TASK_DATASTORES
            if any(
                TASK_REGISTRY[t]["category"] == "reasoning"
                for e, t in TASK_RUNS
                if e == d
            )
        ],
    ]
