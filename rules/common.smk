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
if not config.get(
    "tasks"
):  # the synthetic suite on the generated corpora; the schema fills in the rest
    config["tasks"] = _tasks.default_tasks_config(config)
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


BENCHMARKS = "results/benchmarks"  # every rule's benchmark file lies under it; stage_times reads them all


def names_regex(names):
    """A wildcard constraint that matches exactly these names (or nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def title(text):
    """A figure's params: its title."""
    return as_json({"title": text})


def model_json(model):
    return f"results/models/{model}/model.json"


# Training in chunks (models.<m>.train.chunk_steps): chunks 1..n-1 are `train_lm_chunk` jobs, each resuming the
# previous chunk's checkpoint (weights, optimizer and RNG states; temporary files); the last chunk is `train_lm`,
# which writes the same outputs as one uninterrupted run. Every training job asks for train.runtime minutes.


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


def search_params():
    """What a search depends on beyond the index: IVFPQ's nprobe and distances ('exact', recomputed from the keys,
    or 'pq', FAISS's own); None for a Flat index, whose search is exact."""
    return {k: config["index"][k] if IVF else None for k in ("nprobe", "distances")}


IVF = config["index"]["type"] != "Flat"


def index_data(wildcards):
    """The on-disk inverted lists a search reads beside index.faiss (IVFPQ), as an input; none for Flat."""
    return [f"results/datastores/{wildcards.ds}/index.ivfdata"] if IVF else []


# what a search of a datastore reads (retrieval and task scoring)
SEARCH_INPUTS = {
    "manifest": "results/datastores/{ds}/manifest.json",
    "index": "results/datastores/{ds}/index.faiss",
    "index_meta": "results/datastores/{ds}/index.json",
    "index_data": index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
}


# A step split into chunks (retrieval.chunks, tasks.chunks > 1): one job per chunk writes its part of the outputs,
# temporary, under <dir>/chunks/<i>/, and the job of the whole joins them (a cheap job); with one chunk, that job
# does all the work itself.
def chunk_outputs(outputs, d):
    """A chunk job's outputs: those of the job of the whole under <d>/ (`outputs`), under <d>/chunks/{chunk}/."""
    return {
        k: temp(v.replace(f"{d}/", f"{d}/chunks/{{chunk}}/", 1))
        for k, v in outputs.items()
    }


def chunk_inputs(n, d, read, keep):
    """For unpack(): what the job of the whole reads from its n chunks under <d> (`chunks`, the file `read` of each
    chunk), and (`chunk_files`) their other files, `keep`, so that the temporary chunks stay until it has read
    them; nothing when n is 1."""

    def inputs(wildcards):
        if n == 1:
            return {}
        dirs = [
            f"{d.format(**dict(wildcards.items()))}/chunks/{i:03d}" for i in range(n)
        ]
        return {
            "chunks": [f"{c}/{read}" for c in dirs],
            "chunk_files": [f"{c}/{k}" for c in dirs for k in keep],
        }

    return inputs


def step(name, *extra):
    """The shell command running step `name`, `python -m workflow_scripts <name>` (workflow_scripts/cli.py), with
    --params from the rule's param p and --threads from its param threads when the step takes them, then `extra`
    (arguments that are no file of the rule), then params.args (wire_steps): every argument of the step that is a
    named input or output of the rule, each path quoted. The step's stderr goes to the rule's log.
    """
    args = _cli.step_arguments(name)
    return " ".join(
        [f"python -m workflow_scripts {name}"]
        + (["--params {params.p:q}"] if "params" in args else [])
        + (["--threads {params.threads}"] if "threads" in args else [])
        + [*extra, "{params.args} 2> {log}"]
    )


# names Snakemake keeps for its own methods, and the names of the inputs and outputs that stand for them
RESERVED = {"keys": "key_shards", "items": "task_items"}


def step_files(rule, name, given=()):
    """The function behind params.args of `rule`, which runs step `name`: `--arg PATH ...` for each path argument
    of the step that is a named output or input of the rule (or its RESERVED stand-in), but those in `given`
    (written in the shell), in the step's order, each path quoted; an optional argument without a file is left
    out. It reads input and output, so Snakemake's params rerun trigger leaves it out (the input trigger compares
    the files)."""
    paths = {
        a: required
        for a, (kind, required) in _cli.step_arguments(name).items()
        if kind in ("path", "paths") and a not in given
    }

    def args(wildcards, input, output):
        flags = []
        for a, required in paths.items():
            named = [
                f[n]
                for f in (input, output)
                for n in (a, RESERVED.get(a))
                if n in f.keys()
            ]
            if len(named) > 1:
                raise WorkflowError(f"Rule {rule}: {a} is both an input and an output")
            files = named[0] if named else []
            files = [files] if isinstance(files, str) else list(files)
            if files:
                flags.append(f"--{a.replace('_', '-')} {shlex.join(map(str, files))}")
            elif required:
                raise WorkflowError(
                    f"Rule {rule}: step {name} needs --{a.replace('_', '-')}, which is no named input or "
                    f"output of the rule"
                )
        return " ".join(flags)

    return args


def table(path, caption=None, category=None, subcategory=None, labels=None, name=""):
    """A table's outputs: <path>.csv, in the report under ../report/<caption>.rst when a caption is given, and
    <path>.parquet; named csv and parquet, or <name>_csv and <name>_parquet."""
    csv = f"{path}.csv"
    if caption:
        csv = report(csv, f"../report/{caption}.rst", category, subcategory, labels)
    key = f"{name}_" if name else ""
    return {f"{key}csv": csv, f"{key}parquet": f"{path}.parquet"}


def figure(path, caption, category, subcategory=None, labels=None):
    """A figure's outputs: <path>.png, in the report under ../report/<caption>.rst, and <path>.pdf."""
    png = report(
        f"{path}.png", f"../report/{caption}.rst", category, subcategory, labels
    )
    return {"png": png, "pdf": f"{path}.pdf"}


# Steps that only read tables and draw or write them: they run in the plotting env (no torch).
PLOTTING_STEPS = ("figure-", "paper2-comparison", "results-doc", "stage-times")


def wire_steps(rules):
    """Adds to each rule running a step (`python -m workflow_scripts <step>`) the param `code`, the hash of the step's
    import closure (workflow_scripts/cli.py), so that with the params rerun trigger editing a module reruns exactly
    the rules whose step imports it, directly or not; the param `args`, its files as the step's arguments
    (step_files); and, unless it names one, its conda env: GPU_ENV for a rule with a `gpu` resource, the plotting
    env for PLOTTING_STEPS, else the pipeline env."""
    for r in rules:
        m = re.search(r"python -m workflow_scripts (\S+)", r.shellcmd or "")
        if not m:
            continue
        r.set_params(code=_cli.code_hash(m[1]))
        if "{params.args}" in r.shellcmd:
            given = re.findall(r"--([a-z][\w-]*)", r.shellcmd)
            r.set_params(
                args=step_files(r.name, m[1], {g.replace("-", "_") for g in given})
            )
        if r.conda_env is None:
            r.conda_env = (
                GPU_ENV
                if "gpu" in r.resources.keys()
                else (
                    "../envs/plotting.yaml"
                    if m[1].startswith(PLOTTING_STEPS)
                    else "../envs/pipeline.yaml"
                )
            )


# Each rule file's own helpers (Snakemake's linter keeps functions out of rule files), in the order of the
# Snakefile's includes: all are defined before any rule is parsed.
include: "common/corpus.smk"
include: "common/lm.smk"
include: "common/datastore.smk"
include: "common/index.smk"
include: "common/retrieval.smk"
include: "common/sweep.smk"
include: "common/tasks.smk"
include: "common/scaling.smk"
include: "common/neighbours.smk"
include: "common/incontext.smk"
include: "common/macondo.smk"
include: "common/mlp.smk"
include: "common/hurdle.smk"
include: "common/compare.smk"
include: "common/summary.smk"
include: "common/docs.smk"
