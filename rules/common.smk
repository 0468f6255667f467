# Config validation and the small helpers that turn config entries into rule params and inputs.
import hashlib
import json
import re
from pathlib import Path

from workflow_scripts import config as _config

_config.validate(config)

MODELS = config["models"]
DATASTORES = config["datastores"]
EVAL_SETS = config["eval_sets"]
TRAINED = [m for m, spec in MODELS.items() if spec["source"] == "train"]
# GPU stages ask the scheduler for a GPU only when the config says the device is cuda.
GPU = 1 if config["extraction"]["device"] == "cuda" else 0


def code(*modules):
    """A hash of the workflow_scripts modules a step runs, passed as a param: with the `params` rerun trigger,
    editing one reruns exactly the rules that list it (shared helpers in artifacts.py and config.py are left
    out, so editing them reruns nothing)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(workflow.basedir, "workflow_scripts", f"{m}.py").read_bytes())
    return h.hexdigest()[:16]


def names_regex(names):
    """A wildcard constraint that matches exactly these names (or nothing)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


def as_json(obj):
    return json.dumps(obj, sort_keys=True)


def shard_ids(ds):
    return [f"{i:03d}" for i in range(DATASTORES[ds]["shards"])]


def model_json(model):
    return f"results/models/{model}/model.json"


def tokenizer_inputs(wildcards):
    """A model trained here is tokenized with its trained tokenizer; others with their own."""
    if wildcards.model in TRAINED:
        return {"tokenizer_dir": f"results/models/{wildcards.model}/tokenizer"}
    return {"model_json": model_json(wildcards.model)}


def tokenizer_arg(wildcards, input):
    if "tokenizer_dir" in input.keys():
        return f"--tokenizer-dir {input.tokenizer_dir}"
    return f"--model-json {input.model_json}"


def ds_tokens(ds):
    spec = DATASTORES[ds]
    return f"results/tokens/{spec['model']}/{spec['corpus']}/{spec['split']}.npy"


def eval_tokens(evalset, ds):
    spec = EVAL_SETS[evalset]
    return (
        f"results/tokens/{DATASTORES[ds]['model']}/{spec['corpus']}/{spec['split']}.npy"
    )


def extraction_params(wildcards):
    ex = config["extraction"]
    return as_json(
        {
            "shard": int(wildcards.shard),
            "shards": DATASTORES[wildcards.ds]["shards"],
            "block_size": ex["block_size"],
            "batch_size": ex["batch_size"],
            "device": ex["device"],
        }
    )


def retrieval_params(wildcards):
    ex = config["extraction"]
    return as_json(
        {
            "k_max": config["sweep"]["k_max"],
            "max_tokens": EVAL_SETS[wildcards.evalset].get("max_tokens"),
            "block_size": ex["block_size"],
            "batch_size": ex["batch_size"],
            "device": ex["device"],
            "nprobe": (
                config["index"]["nprobe"] if config["index"]["type"] != "Flat" else None
            ),
        }
    )


def select_on():
    """The eval set on which (λ, k, σ) is chosen: 'valid' when it exists, else each set on itself."""
    return "valid" if "valid" in EVAL_SETS else ""


# every (eval set, datastore) pair: one retrieval cache, one sweep, one figure each
SWEEPS = sorted((e, d) for d in DATASTORES for e in EVAL_SETS)


def all_outputs():
    return [
        "results/tables/perplexity_summary.csv",
        "results/tables/stage_times.csv",
        *[f"results/figures/perplexity_vs_lambda/{e}__{d}.png" for e, d in SWEEPS],
        *expand("results/models/{model}/loss.csv", model=TRAINED),
    ]


wildcard_constraints:
    ds=names_regex(DATASTORES),
    evalset=names_regex(EVAL_SETS),
    split="train|valid|test",
    shard=r"\d{3}",


# Cheap aggregation jobs run on the submitting host, not as cluster jobs.
localrules:
    all,
    figures,
    summarize,
    figure_sweep,
    stage_times,
