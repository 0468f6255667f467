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
from workflow_scripts import job_environment as _job_environment
from workflow_scripts import memory as _memory
from workflow_scripts.config import CHUNK_KEYS, training_chunks
from workflow_scripts.tasks import registry as _tasks
from workflow_scripts.tasks import items as _items

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

# Every job this Snakemake starts inherits the allocator settings (workflow_scripts/job_environment.py): without
# them a tenth of the default run's CPU time was system time, mostly page faults. They change no result, and changing
# them reruns nothing.
os.environ.update(_job_environment.job_environment(os.environ))


# The threads of a step's arithmetic (torch, FAISS), passed as --threads: the config's, whatever --cores gives
# the job (Snakemake lowers a rule's `threads:`, its scheduling, to --cores; sums over another number of threads
# differ in the last bits). Rules asking for one thread run their steps on one.
ARITHMETIC_THREADS = config["arithmetic_threads"]

# ... and those of the rules that rule_threads names (e.g. a cluster's FAISS jobs, docs/cluster.md; the schema
# lists the names it takes)
RULE_THREADS = config["rule_threads"]

# What the exact searches (retrieval, task scoring, the scaling study) ask the scheduler for, so their steps run on
# one thread: on 2 cores a search given two threads kept them 64-85 % busy, while two one-thread jobs side by side
# keep both busy (docs/testing.md#the-default-runs-time). On a cluster, `--set-threads retrieve_chunk=16` gives a job
# more cores and `rule_threads: {retrieve_chunk: 16}` makes its arithmetic use them.
SEARCH_THREADS = 1


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


# Each rule file's own helpers (Snakemake's linter keeps functions out of rule files), in the order of the
# Snakefile's includes: all are defined before any rule is parsed.
include: "common/steps.smk"
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
