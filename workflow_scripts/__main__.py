"""Command line: ``python -m workflow_scripts <step> [--params JSON] --<name> PATH ...``.

Each Snakemake rule calls one step; every step also runs by hand. ``--params`` carries the slice of the
config that the step's output depends on, as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


def corpus(a, p):
    from .corpus import write_corpus

    write_corpus(p["spec"], p["seed"], a.outdir)


def tokenizer(a, p):
    from .lm import train_tokenizer

    train_tokenizer(a.train, p["vocab_size"], a.outdir)


def tokenize(a, p):
    from transformers import AutoTokenizer

    from .lm import load_identity, tokenize_split

    if a.tokenizer_dir:  # a tokenizer trained here, before its model exists
        tok = AutoTokenizer.from_pretrained(a.tokenizer_dir)
    else:
        ident = load_identity(a.model_json)
        tok = AutoTokenizer.from_pretrained(
            ident["path"],
            revision=ident.get("revision"),
            trust_remote_code=ident.get("trust_remote_code", False),
        )
    tokenize_split(tok, a.parquet, a.out)


def train_lm(a, p):
    from .lm import train_lm as train
    from .lm import write_identity

    _threads(a.threads)
    stop = p.get("stop")  # a training chunk: stop there and write a.checkpoint (the last chunk has none)
    train(
        a.train,
        a.valid,
        a.tokenizer_dir,
        p["train"],
        p["seed"],
        a.outdir,
        a.loss_log,
        resume=a.resume,
        stop=stop,
        checkpoint=a.checkpoint,
    )
    if stop is None or stop >= p["train"]["steps"]:
        write_identity({"source": "train", "path": a.outdir}, a.model_json, device="cpu")


def model_identity(a, p):
    from .lm import write_identity

    write_identity(p["spec"], a.model_json)


def extract_keys(a, p):
    from .datastore import extract_shard
    from .lm import load_checked

    _threads(a.threads)
    model, _, ident = load_checked(
        a.model_json, device=p["device"], dtype="float16" if p["device"] != "cpu" else "float32"
    )
    (keys,), (vals,), (meta,) = a.keys, a.vals, a.meta
    extract_shard(model, ident, a.tokens, p["shard"], p["shards"], p["block_size"], p["batch_size"], keys, vals, meta)


def manifest(a, p):
    from .datastore import write_manifest
    from .lm import load_identity

    shards = list(zip(a.keys, a.vals, a.meta, strict=True))
    write_manifest(load_identity(a.model_json), a.tokens, shards, a.out)


def build_index(a, p):
    from .index import build_index as build

    build(a.manifest, p["index"], p["seed"], a.index, a.index_meta, threads=a.threads)


def retrieve(a, p):
    from .retrieval import retrieve as run

    _threads(a.threads)
    run(a.model_json, a.manifest, a.index, a.index_meta, a.tokens, p, a.outdir, threads=a.threads)


def sweep(a, p):
    from .sweep import run_sweep

    run_sweep(a.cache, a.manifest, p, a.out_stem)


def summarize(a, p):
    from .sweep import summarize as run

    keys = [tuple(k) for k in p["keys"]]
    run(dict(zip(keys, a.sweeps, strict=True)), p["select_on"], a.out_stem)


def figure_sweep(a, p):
    from .figures import perplexity_vs_lambda

    perplexity_vs_lambda(a.sweep, p["title"], a.png, a.pdf)


def stage_times(a, p):
    from .stages import stage_times as run

    run(a.outdir, a.out_stem)


def task_suite(a, p):
    from .task_suite import write_suite

    write_suite(a.train, p["generators"], p["n_items"], p["seed"], a.outdir)


def load_task(a, p):
    from .tasks import load_task as run

    run(p["entry"], p.get("max_items"), p["seed"], a.out)


def score_task(a, p):
    from .task_eval import score_task as run

    _threads(a.threads)
    run(a.model_json, a.manifest, a.index, a.index_meta, a.parquet, p, a.outdir, a.sweep, threads=a.threads)


def task_sweep(a, p):
    from .task_eval import task_sweep as run

    run(a.cache, a.parquet, p, a.sweep, a.out_stem)


def task_summary(a, p):
    from .task_eval import task_summary as run

    run(a.sweeps, a.out_stem)


def figure_tasks(a, p):
    from .task_eval import figure_tasks as run

    run(a.sweeps, p["title"], a.png, a.pdf, p.get("seed", 0))


def task_examples(a, p):
    from .task_eval import task_examples as run

    run(a.sweeps, a.tokens, a.model_json, p, a.out_stem)


# ----------------------------------------------------------------------------- paper 2
def _tokenizer_of(model_json):
    from transformers import AutoTokenizer

    from .lm import load_identity

    ident = load_identity(model_json)
    return AutoTokenizer.from_pretrained(
        ident["path"], revision=ident.get("revision"), trust_remote_code=ident.get("trust_remote_code", False)
    )


def macondo_data(a, p):
    from .macondo import generate, write

    write(generate(p["generate"], p["seed"], _tokenizer_of(a.model_json)), a.outdir)


def macondo_finetune(a, p):
    from .macondo_lm import finetune

    finetune(a.model_json, a.train, p["finetune"], p["seed"], a.outdir, a.out, a.out_stem, a.threads)


def macondo_datastore(a, p):
    from .macondo_lm import build_datastore

    build_datastore(a.model_json, a.train, a.outdir, a.threads)


def train_mlp(a, p):
    from .mlp_lm import train_on_datastore

    train_on_datastore(a.model_json, a.manifest, p["mlp"], p["seed"], a.out, a.out_json, a.out_stem, a.threads)


def macondo_eval(a, p):
    from .macondo_lm import evaluate

    _threads(a.threads)
    evaluate(a.model_json, Path(a.manifest).parent, a.parquet, a.mlp, a.out_json, p, a.out_stem, a.threads)


def macondo_table(a, p):
    from .paper2 import macondo_table as run

    run(a.scores, a.out_stem, a.png, a.pdf)


def projection(a, p):
    from .projection import run
    from .task_eval import chosen_point

    point = p["point"]
    if point == "chosen":
        chosen, _ = chosen_point(a.sweep, p["datastore"])
        if chosen is None:
            raise ValueError(f"{a.sweep}: no chosen (lambda, k, sigma) for datastore {p['datastore']}")
        point = dict(zip(("lambda", "k", "sigma"), chosen, strict=True))
    run(a.model_json, a.tokens, a.cache, a.manifest, point, p, a.out_stem, a.threads)


def mlp_eval(a, p):
    from .mlp_lm import evaluate
    from .task_eval import chosen_point

    chosen, _ = chosen_point(a.sweep, p["datastore"])
    caches = dict(zip(p["eval_sets"], a.caches, strict=True))
    evaluate(
        a.model_json,
        a.out,
        a.out_json,
        caches,
        p["choose_on"],
        p["lambdas"],
        a.out_stem,
        {e: chosen for e in caches} if chosen else None,
    )


def hurdle(a, p):
    from . import hurdle as h

    _threads(a.threads)
    if p["data"] == "macondo":
        h.train_macondo(a.tokenizer_dir, a.parquet, p["shape"], p["run"], p["variant"], p["seed"], a.out_stem)
    else:
        h.train_corpus(a.tokenizer_dir, a.tokens, p["shape"], p["run"], p["variant"], p["seed"], a.out_stem)


def paper2_figure(a, p):
    from . import paper2

    if p["kind"] == "projection":
        paper2.projection_figure(a.parquet, a.png, a.pdf)
    elif p["kind"] == "mlp":
        paper2.mlp_figure(a.parquet, a.png, a.pdf)
    else:
        paper2.hurdle_table(a.scores, p["column"], a.out_stem, a.png, a.pdf, p["title"])


def paper2_comparison(a, p):
    from .paper2 import comparison

    files = dict(zip(p["inputs"], a.scores, strict=True))
    comparison(a.out_stem, setups=p["setups"], **files)


STEPS = {
    f.__name__.replace("_", "-"): f
    for f in (
        corpus,
        tokenizer,
        tokenize,
        train_lm,
        model_identity,
        extract_keys,
        manifest,
        build_index,
        retrieve,
        sweep,
        summarize,
        figure_sweep,
        stage_times,
        task_suite,
        load_task,
        score_task,
        task_sweep,
        task_summary,
        figure_tasks,
        task_examples,
        macondo_data,
        macondo_finetune,
        macondo_datastore,
        train_mlp,
        macondo_eval,
        macondo_table,
        projection,
        mlp_eval,
        hurdle,
        paper2_figure,
        paper2_comparison,
    )
}
PATH_ARGS = [
    "outdir",
    "out",
    "train",
    "valid",
    "parquet",
    "tokenizer_dir",
    "model_json",
    "loss_log",
    "resume",
    "checkpoint",
    "tokens",
    "manifest",
    "index",
    "index_meta",
    "cache",
    "out_stem",
    "sweep",
    "png",
    "pdf",
    "out_json",
    "mlp",
]
MULTI_ARGS = ["keys", "vals", "meta", "sweeps", "scores", "caches"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workflow_scripts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--params", default="{}", help="JSON object: the config slice this step depends on")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("SNAKEMAKE_THREADS", 1)))
    for name in PATH_ARGS:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name)
    for name in MULTI_ARGS:
        parser.add_argument(f"--{name}", nargs="+", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        parser.error(f"--params is not valid JSON: {e}")
    try:
        STEPS[args.step](args, params)
    except (ValueError, OSError, RuntimeError) as e:  # OSError: also a full disk, not only a missing file
        logging.getLogger("workflow_scripts").error("%s failed: %s", args.step, e)
        print(f"error: {args.step}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
