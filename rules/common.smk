# Config validation and the small helpers that turn config entries into rule params and inputs. Building the
# DAG imports no step module (no torch): config, cli (the steps and their code, read with ast) and the task
# registry.
import json
import os
import re
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger

from workflow_scripts import cli as _cli
from workflow_scripts import config as _config
from workflow_scripts import memory as _memory
from workflow_scripts.config import CHUNK_KEYS, training_chunks
from workflow_scripts.tasks import registry as _tasks

# Snakemake keeps the last of a key given twice in a config file: refuse that first
for _file in workflow.configfiles:
    _config.read_yaml(_file)
_config.validate(config)
_tasks.check_config(config)

# The threads of a step's arithmetic (torch, FAISS), passed as --threads: the config's, whatever --cores gives
# the job (Snakemake lowers a rule's `threads:`, its scheduling, to --cores; sums over another number of threads
# differ in the last bits). Rules asking for one thread run their steps on one.
ARITHMETIC_THREADS = config["arithmetic_threads"]
MODELS = config["models"]
DATASTORES = config["datastores"]
EVAL_SETS = config["eval_sets"]
TRAINED = [m for m, spec in MODELS.items() if spec["source"] == "train"]
ANALYSES = config.get("analyses") or {}
MACONDO = ANALYSES.get("macondo")
HURDLE = ANALYSES.get("hurdle")
PROJECTION = ANALYSES.get("projection")
MLP = ANALYSES.get("mlp")
# The stages that run the model with extraction.device (extract_keys, retrieve, score_task) ask the scheduler
# for a GPU only when the config says cuda, and then run in the GPU conda env (faiss-gpu, CUDA torch).
GPU = 1 if config["extraction"]["device"] == "cuda" else 0
GPU_ENV = "../envs/pipeline-gpu.yaml" if GPU else "../envs/pipeline.yaml"


def refuse_missing_cuda():
    """extraction.device: cuda where jobs run on this machine and torch sees no GPU: refused before any job
    starts, naming the key. Only here: parsing the Snakefile cannot tell where jobs will run, `onstart` can
    (workflow.local_exec, set once the executor is chosen; false for Slurm, whose submitting host often has
    no GPU: there each GPU job refuses at its own start with the same message). Not on dry runs.
    """
    if not (GPU and workflow.local_exec and not workflow.remote_exec):
        return
    if not any(j.resources.get("gpu", 0) for j in workflow.dag.needrun_jobs()):
        return  # nothing to run on a GPU (e.g. only the sweeps)
    from workflow_scripts import devices as _devices

    msg = _devices.cuda_refusal("cuda")
    if msg:
        raise WorkflowError(msg)


def track_code(rules):
    """A `code` param for each of the rules running a step (`python -m workflow_scripts <step>`), the hash of
    the step's import closure (workflow_scripts/cli.py). With the `params` rerun trigger, editing a module
    reruns exactly the rules whose step imports it, directly or not."""
    for r in rules:
        m = re.search(r"python -m workflow_scripts (\S+)", r.shellcmd or "")
        if m:
            r.set_params(code=_cli.code_hash(m[1]))


BENCHMARKS = "results/benchmarks"  # every rule's benchmark file lies under it; stage_times reads them all


def names_regex(names):
    """A wildcard constraint that matches exactly these names (or nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


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
    return checkpoints.plan_shards.get(ds=plan_of(ds)).output.plan


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


def shard_file(wildcards, name, ext):
    """One file of a datastore shard: extracted under shards/, or copied under subset/ by subsample_datastore."""
    d = "subset" if wildcards.ds in SUBSAMPLED else "shards"
    return f"results/datastores/{wildcards.ds}/{d}/{name}_{wildcards.shard}.{ext}"


def shard_inputs(wildcards):
    """add_shard's inputs: the shard's keys and meta, or for a subsample datastore the subset/ folder they are in
    (a directory() output: Snakemake cannot name a file inside it as an input)."""
    if wildcards.ds in SUBSAMPLED:
        return [f"results/datastores/{wildcards.ds}/subset"]
    return [
        shard_file(wildcards, "keys", "npy"),
        shard_file(wildcards, "shard", "json"),
    ]


def corpus_files(wildcards):
    """A local corpus's files, as inputs: documents appended to one (or a file added) rebuild the corpus."""
    spec = config["corpora"][wildcards.corpus]
    if spec["source"] != "local":
        return []
    files = spec["local"]["files"]
    out = [
        [f] if isinstance(f, str) else f
        for f in (files[s] for s in ("train", "valid", "test"))
    ]
    return list(dict.fromkeys(f for fs in out for f in fs))


def model_json(model):
    return f"results/models/{model}/model.json"


def tokenizer_inputs(wildcards):
    """A model trained here is tokenized with its trained tokenizer; others with their own."""
    if wildcards.model in TRAINED:
        return {"tokenizer_dir": f"results/models/{wildcards.model}/tokenizer"}
    return {"model_json": model_json(wildcards.model)}


def _flags(named) -> list[str]:
    """`--name PATH` (`--name P1 P2 ...` for a list) for each named file, every path quoted for the shell."""

    def paths(v):
        return " ".join(
            shlex.quote(str(p)) for p in (v if isinstance(v, list | tuple) else [v])
        )

    return [f"--{k.replace('_', '-')} {paths(named[k])}" for k in named.keys()]


def tokenizer_arg(wildcards, input):
    name = "tokenizer_dir" if "tokenizer_dir" in input.keys() else "model_json"
    return " ".join(_flags({name: input[name]}))


def tokenize_args(wildcards, input):
    """The tokenizer, and the corpus's text preparation (corpora.<c>.prepare) unless it is row_eos, the default,
    whose jobs' params are those from before the choice existed."""
    prepare = config["corpora"][wildcards.corpus]["prepare"]
    flag = "" if prepare == "row_eos" else f" --prepare {prepare}"
    return tokenizer_arg(wildcards, input) + flag


def optional_arg(name):
    """A shell argument for an input that only some jobs have (`--name PATH`, quoted), or nothing."""
    return lambda wildcards, input: (
        " ".join(_flags({name: input[name]})) if name in input.keys() else ""
    )


# Training in chunks (models.<m>.train.chunk_steps): chunks 1..n-1 are `train_lm_chunk` jobs, each resuming the
# previous chunk's checkpoint (weights, optimizer and RNG states; temporary files); the last chunk is `train_lm`,
# which writes the same outputs as one uninterrupted run. Every training job asks for train.runtime minutes.


def train_spec(model):
    """The training config as the outputs depend on it: how it is split into jobs is left out."""
    return {k: v for k, v in MODELS[model]["train"].items() if k not in CHUNK_KEYS}


def train_chunks(model):
    t = MODELS[model]["train"]
    return training_chunks(t["steps"], t.get("chunk_steps"))


def chunk_ckpt(model, i):
    return f"results/models/{model}/chunks/chunk_{i:03d}.pt"


def train_inputs(wildcards):
    """Tokenizer and token streams; when resuming, the previous chunk's checkpoint."""
    m = wildcards.model
    corpus = MODELS[m]["train"]["corpus"]
    i = int(wildcards.chunk) if "chunk" in wildcards.keys() else len(train_chunks(m))
    inputs = {
        "tokenizer_dir": f"results/models/{m}/tokenizer",
        "train": f"results/tokens/{m}/{corpus}/train.npy",
        "valid": f"results/tokens/{m}/{corpus}/valid.npy",
    }
    if i > 1:
        inputs["resume"] = chunk_ckpt(m, i - 1)
    return inputs


CHUNKED = [m for m in TRAINED if len(train_chunks(m)) > 1]
# every model trained here is trained, but one only the MLP hurdle names: it gives the hurdle its shape and
# tokenizer (App. E trains its LMs from scratch)
_hurdle_only = (
    {(HURDLE or {}).get("model")}
    - {d["model"] for d in DATASTORES.values()}
    - {(MACONDO or {}).get("model")}
)
TRAINED_AND_USED = [m for m in TRAINED if m not in _hurdle_only]


def ds_tokens(ds):
    spec = DATASTORES[ds]
    return f"results/tokens/{spec['model']}/{spec['corpus']}/{spec['split']}.npy"


def eval_tokens(evalset, ds):
    spec = EVAL_SETS[evalset]
    return (
        f"results/tokens/{DATASTORES[ds]['model']}/{spec['corpus']}/{spec['split']}.npy"
    )


def stride_param(spec):
    """{"stride": s} for a datastore or eval set with sliding windows (stride below extraction.block_size), else {}:
    the params of non-overlapping blocks are those from before strides existed."""
    s = spec.get("stride")
    return {"stride": s} if s and s != config["extraction"]["block_size"] else {}


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


RETRIEVAL_CHUNKS = config["retrieval"]["chunks"]


def retrieval_chunk_inputs(wildcards):
    """The chunks' caches (their meta.json) that the retrieve job joins, when retrieval.chunks > 1."""
    if RETRIEVAL_CHUNKS == 1:
        return {}
    d = f"results/retrieval/{wildcards.evalset}/{wildcards.ds}/chunks"
    ids = [f"{i:03d}" for i in range(RETRIEVAL_CHUNKS)]
    return {
        "chunks": [f"{d}/{i}/meta.json" for i in ids],
        # the arrays too, so that the temporary chunks stay until this job has read them
        "chunk_arrays": [f"{d}/{i}/{name}.npy" for i in ids for name in CACHE],
    }


def eval_queries(evalset, ds):
    """Scored positions of an eval set, for memory planning: read off its token file's header when it exists, else
    max_tokens, else a placeholder of 1M."""
    cap = EVAL_SETS[evalset].get("max_tokens")
    try:
        n = _memory.npy_rows(eval_tokens(evalset, ds)) - 1
    except (OSError, ValueError, SyntaxError, KeyError):
        return cap or 1_000_000
    return min(n, cap) if cap else n


def retrieval_params(wildcards, chunk=None):
    ex = config["extraction"]
    return as_json(
        ({"chunk": chunk} if chunk else {})
        | {
            "k_max": config["sweep"]["k_max"],
            "max_tokens": EVAL_SETS[wildcards.evalset].get("max_tokens"),
            "block_size": ex["block_size"],
            **stride_param(EVAL_SETS[wildcards.evalset]),
            **{
                f"datastore_{k}": v
                for k, v in stride_param(DATASTORES[wildcards.ds]).items()
            },
            "batch_size": ex["batch_size"],
            "device": ex["device"],
            "dtype": ex["dtype"],
            **search_params(),
            "gpu_shard_above_gb": config["index"]["gpu_shard_above_gb"],
        }
        | (
            {"allow_datastore_overlap": True}
            if EVAL_SETS[wildcards.evalset]["allow_datastore_overlap"]
            else {}
        )
    )


def search_params():
    """What a search depends on beyond the index: IVFPQ's nprobe and distances ('exact', recomputed from the keys,
    or 'pq', FAISS's own); None for a Flat index, whose search is exact."""
    return {k: config["index"][k] if IVF else None for k in ("nprobe", "distances")}


def index_params():
    """What the index itself depends on: index.distances and index.gpu_shard_above_gb only concern retrieval and
    scoring, index.retrain only when training reruns."""
    return {
        k: v
        for k, v in config["index"].items()
        if k not in ("distances", "gpu_shard_above_gb", "retrain")
    }


def train_params():
    """What the trained (empty) index depends on: not nprobe, which only the search uses."""
    return {k: v for k, v in index_params().items() if k != "nprobe"}


IVF = config["index"]["type"] != "Flat"


def index_outputs(prefix):
    """merge_index's outputs: index.faiss and index.json, and the on-disk inverted lists of an IVF index."""
    out = {"index": f"{prefix}/index.faiss", "meta": f"{prefix}/index.json"}
    if IVF:
        out["ivfdata"] = f"{prefix}/index.ivfdata"
    return out


def index_data(wildcards):
    """The on-disk inverted lists a search reads beside index.faiss (IVFPQ), as an input; none for Flat."""
    return [f"results/datastores/{wildcards.ds}/index.ivfdata"] if IVF else []


def merge_inputs(wildcards):
    """IVFPQ: the trained index and every shard's part; Flat: nothing beyond the manifest."""
    if not IVF:
        return {}
    d = f"results/datastores/{wildcards.ds}/index"
    return {
        "trained": f"{d}/trained.faiss",
        "trained_meta": f"{d}/trained.json",
        "parts": expand(f"{d}/part_{{shard}}.faiss", shard=shard_ids(wildcards.ds)),
        "part_metas": expand(f"{d}/part_{{shard}}.json", shard=shard_ids(wildcards.ds)),
    }


def chunk_queries(wildcards):
    """Queries of one retrieval job: its chunk's, cut as the step cuts it (memory.chunk_bounds), so that the plan
    asked for is the plan the job checks; 0 for the job that joins chunks (it copies them part by part).
    """
    n = eval_queries(wildcards.evalset, wildcards.ds)
    if "chunk" not in wildcards.keys():
        return n if RETRIEVAL_CHUNKS == 1 else 0
    cfg = json.loads(retrieval_params(wildcards))
    a, b = _memory.chunk_bounds(n, RETRIEVAL_CHUNKS, _memory.chunk_unit(cfg))[
        int(wildcards.chunk)
    ]
    return b - a


def plan_mb(job, wildcards, input=None, n_queries=0):
    """A job's mem_mb from its datastore's manifest (workflow_scripts/memory.py); a placeholder while the manifest
    does not exist yet (Snakemake evaluates resources again right before it schedules the job).
    """
    manifest = _memory.read_manifest(f"results/datastores/{wildcards.ds}/manifest.json")
    mb, _ = _memory.estimate_mb(
        job, manifest, config["index"], config["sweep"]["k_max"], n_queries
    )
    return mb


def select_on(ds=None):
    """The eval set on which (λ, k, σ) is chosen: the datastore's `select_on` when it has one; else 'valid' when
    it exists, else each set on itself ('')."""
    if ds is not None and "select_on" in DATASTORES[ds]:
        return DATASTORES[ds]["select_on"]
    return "valid" if "valid" in EVAL_SETS else ""


# every (eval set, datastore) pair: one retrieval cache, one sweep, one figure each
SWEEPS = sorted((e, d) for d in DATASTORES for e in EVAL_SETS)
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


# ----------------------------------------------------------------------------- tasks (paper 1)
if not config.get("tasks"):  # the synthetic suite on the generated corpora; the schema fills in the rest
    config["tasks"] = _tasks.default_tasks_config(config)
    _config.validate(config)
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
            p["grid"] = {k: sw[k] for k in ("lambdas", "ks", "sigmas")}
    return as_json(p)


TASK_CHUNKS = TASKS["chunks"]


def task_chunk_inputs(wildcards):
    """The chunks' caches (their scored.json) that the score_task job joins, when tasks.chunks > 1."""
    if TASK_CHUNKS == 1:
        return {}
    d = f"results/tasks/{wildcards.ds}/{wildcards.task}/chunks"
    ids = [f"{i:03d}" for i in range(TASK_CHUNKS)]
    return {
        "chunks": [f"{d}/{i}/scored.json" for i in ids],
        # the npz too, so that the temporary chunks stay until this job has read them
        "chunk_npz": [f"{d}/{i}/scored.npz" for i in ids],
    }


def task_items(wildcards):
    """The items a task-scoring job scores (those of its chunk, cut as the step cuts them: memory.chunk_bounds on
    whole blocks), or None before load_task has written them."""
    try:
        items = _tasks.read_items(f"results/task_data/{wildcards.task}.parquet")
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
        "grid": {k: config["sweep"][k] for k in ("lambdas", "ks", "sigmas")},
    }
    if wildcards.ds in TASK_POINTS:
        p["point"] = TASK_POINTS[wildcards.ds]
    return as_json(p)


def task_summary_input(wildcards):
    """Generate tasks decode at the point chosen on perplexity, so they wait for the perplexity summary."""
    if TASK_REGISTRY[wildcards.task]["kind"] == "generate":
        return {"summary": "results/tables/perplexity_summary.csv"}
    return {}


# ----------------------------------------------------------------------------- the datastore-size scaling study
SCALING = config.get("scaling") or {}
SCALING_DATASTORES = SCALING.get("datastores", [])
# fractions as they appear in paths and tables (workflow_scripts/scaling.py fraction_name)
SCALING_FRACTIONS = [f"{float(f):g}" for f in sorted(SCALING.get("fractions", []))]
SCALING_TABLES = ["perplexity", "grid", "fits", "frequency"]


def scaling_tasks_of(ds):
    """The tasks of a scaling datastore whose caches can be subsampled (teacher-forced kinds, not generate)."""
    if ds not in SCALING_DATASTORES:
        return []
    return [
        t for d, t in TASK_RUNS if d == ds and TASK_REGISTRY[t]["kind"] != "generate"
    ]


def scaling_outputs():
    out = []
    for d in SCALING_DATASTORES:
        out += [f"results/tables/scaling/{d}/{t}.csv" for t in SCALING_TABLES]
        out += [
            f"results/figures/scaling/{d}/{f}.png" for f in ("perplexity", "frequency")
        ]
        if scaling_tasks_of(d):
            out += [
                f"results/tables/scaling/{d}/task_delta.csv",
                f"results/figures/scaling/{d}/tasks.png",
            ]
    return out


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


# ----------------------------------------------------------------------------- what the datastore returned
def neighbour_params(wildcards, **extra):
    """The neighbour views' params: config neighbours, the datastore, the keys' block (extraction.block_size)."""
    return as_json(
        {
            **config["neighbours"],
            "datastore": wildcards.ds,
            "block_size": config["extraction"]["block_size"],
            **extra,
        }
    )


def neighbour_parents(wildcards):
    """A subsample's parent manifest, read to map its rows to corpus positions (none for an extracted one)."""
    sub = DATASTORES[wildcards.ds].get("subsample")
    return [f"results/datastores/{sub['of']}/manifest.json"] if sub else []


def neighbour_tasks(ds):
    """The tasks of a datastore whose items have a query (teacher-forced kinds, not generate)."""
    return [
        t for d, t in TASK_RUNS if d == ds and TASK_REGISTRY[t]["kind"] != "generate"
    ]


def neighbour_outputs():
    out = [f"results/tables/eval_neighbours/{d}.csv" for d in DATASTORES]
    out += [
        f"results/{x}/{d}.{e}"
        for d in TASK_DATASTORES
        for x, e in (("tables/task_subtasks", "csv"), ("figures/neighbour_gold", "png"))
        if x.endswith("subtasks") or neighbour_tasks(d)
    ]
    return out


# ----------------------------------------------------------------------------- in-context retrieval
# rules/incontext.smk: the datastores whose corpus is retrieved from in context, and their tasks
INCONTEXT = config["incontext"]
IC_DATASTORES = INCONTEXT["datastores"]
IC_TASK_RUNS = [
    (d, t) for d, t in TASK_RUNS if d in IC_DATASTORES and INCONTEXT["tasks"]
]
IC_PARAMS = {
    k: INCONTEXT[k]
    for k in ("passage_tokens", "passages", "query_tokens", "stride", "max_tokens")
}


def incontext_outputs():
    if not IC_DATASTORES:
        return []
    return [
        "results/tables/incontext_perplexity.csv",
        *(["results/tables/incontext_tasks.csv"] if IC_TASK_RUNS else []),
        *[f"results/figures/incontext/{d}.png" for d in IC_DATASTORES],
    ]


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


# ----------------------------------------------------------------------------- analyses (paper 2)
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


MACONDO_CHECKPOINTS = sorted((MACONDO or {}).get("checkpoints", []))
# what each Macondo seed is evaluated at: the fine-tuned model, and the checkpoints along its fine-tuning
MACONDO_AT = ["final", *[f"step{s}" for s in MACONDO_CHECKPOINTS]]


def macondo_dir(seed):
    return f"results/macondo/{MACONDO['model']}/seed{seed}"


def macondo_at(rel):
    """A Macondo seed's file ``rel`` at the fine-tuned model and at every checkpoint, in MACONDO_AT's order
    ({model} and {seed} left as wildcards)."""
    return [f"results/macondo/{{model}}/seed{{seed}}/{at}/{rel}" for at in MACONDO_AT]


HURDLE_VARIANTS = ["full", "no_last_mlp"]
# what a hurdle run logs, and the figure's title, by data kind
HURDLE_COLUMNS = {"macondo": "children_loglik", "corpus": "train_loss"}
HURDLE_TITLES = {
    "macondo": "Macondo test set: children's log-likelihood while training from scratch",
    "corpus": "Default corpus: training loss from scratch",
}


def hurdle_params(wildcards):
    """What one hurdle run depends on: the data kind, the variant, the seed, the model's shape, the run config."""
    shape = MODELS[HURDLE["model"]]["train"]
    return as_json(
        {
            "data": wildcards.data,
            "variant": wildcards.variant,
            "seed": int(wildcards.seed),
            "shape": {k: shape[k] for k in ("n_layer", "n_embd", "n_head")},
            "run": HURDLE[wildcards.data],
        }
    )


def hurdle_data(wildcards):
    m = HURDLE["model"]
    # each seed its own Macondo dataset (and its own initialisation)
    if wildcards.data == "macondo":
        return {"test": f"results/macondo/{m}/seed{wildcards.seed}/data/test.parquet"}
    return {"tokens": f"results/tokens/{m}/{MODELS[m]['train']['corpus']}/train.npy"}


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


def input_args(wildcards, input):
    """Every named input as `--name PATH`, for a step whose arguments are named like the rule's inputs."""
    return " ".join(_flags(input))


def step_args(input, output):
    """Every named input and output as `--name PATH`, for a step whose arguments are named like the rule's inputs
    and outputs: each path is written once, in the rule's declarations."""
    return " ".join(_flags(input) + _flags(output))


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
