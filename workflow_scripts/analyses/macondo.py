"""Paper 2, §4 and App. C: fine-tune an LM on Macondo's over-specified sentences, then score the children's
names on the test sentences (no description) with the LM, the kNN-LM and the MLP-LM (Table 5 / Fig. 1 analogue).

Every sentence is its own sequence (``[bos] sentence [eos]``, right-padded in batches), in fine-tuning, in the
datastore and at test time: a test prefix never sees another sentence. The datastore is the backbone's format
(one shard, manifest with sha256) built from the fine-tuned model's keys over the training sentences, indexed by
``index.build_index`` and searched by ``index.search``; scores go through ``forward.forward_scored`` and
``knnlm`` — the same code as the perplexity and task paths.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .. import forward, index, knnlm, lm
from ..artifacts import atomic_path, open_npy_for_writing, save_npy, write_table
from ..cli import step
from ..config import context_length
from ..datastore import KEY_DTYPE, VAL_DTYPE, shard_digests, write_manifest, write_shard_meta
from ..index import search
from ..retrieval import open_retriever
from . import mlp as mlp_lm

log = logging.getLogger(__name__)


def bos_id(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


def encode_sentences(tok, texts, max_len: int | None = None) -> list[list[int]]:
    """``[bos] + tokens + [eos]`` per sentence; refuse one longer than the model's ``max_len`` positions."""
    texts = list(texts)
    out = [[bos_id(tok), *s, tok.eos_token_id] for s in tok(texts, add_special_tokens=False)["input_ids"]]
    longest = max(range(len(out)), key=lambda i: len(out[i]), default=None)
    if max_len is not None and longest is not None and len(out[longest]) > max_len:
        raise ValueError(
            f"sentence {texts[longest]!r} is {len(out[longest])} tokens with bos/eos, more than the model's "
            f"{max_len} positions; use a model with a longer context"
        )
    return out


def max_positions(model) -> int | None:
    return context_length(model.config)[0]


def test_pairs(tok, test: pl.DataFrame):
    """The test items as scored sequences: ``[bos] context child`` and the position where the child starts."""
    items = [{"options": [[(c, t)]]} for c, t in zip(test["context"], test["continuation"], strict=True)]
    seqs, starts, _ = forward.build_pairs(
        items, lambda s: tok(s, add_special_tokens=False)["input_ids"], bos_id(tok), 1 << 20
    )
    return seqs, starts


def sentence_batches(seqs: list[list[int]], batch: int, pad: int, rng):
    """``next_batch`` for ``lm.fit``: epochs of shuffled sentences, right-padded; no loss on padding."""
    order: list[int] = []

    def next_batch(_step):
        nonlocal order
        if len(order) < batch:
            order = order + list(rng.permutation(len(seqs)))
        chunk, order = order[:batch], order[batch:]
        L = max(len(seqs[i]) for i in chunk)
        x = torch.full((len(chunk), L), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), L), dtype=torch.long)
        for b, i in enumerate(chunk):
            x[b, : len(seqs[i])] = torch.as_tensor(seqs[i])
            mask[b, : len(seqs[i])] = 1
        y = x[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return x[:, :-1], y, mask[:, :-1]

    return next_batch


def finetune(
    identity_json, train_parquet, p: dict, seed: int, outdir, model_json, loss_csv, loss_parquet, threads=1,
    checkpoints: dict | None = None,
):
    """Fine-tune the model of ``identity_json`` on the training sentences (epochs, lr, batch, warm-up from ``p``).
    ``checkpoints``: {step: (hf dir, model.json)}, the model saved before that step's update (0: as given)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model, tok, _ = lm.load_checked(identity_json, device="cpu")
    seqs = encode_sentences(tok, pl.read_parquet(train_parquet)["text"].to_list(), max_positions(model))
    steps = p["epochs"] * math.ceil(len(seqs) / p["batch_size"])
    checkpoints = checkpoints or {}
    late = sorted(s for s in checkpoints if not 0 <= s < steps)
    if late:
        raise ValueError(f"analyses.macondo.checkpoints {late}: fine-tuning runs steps 0..{steps - 1} only")

    def save(step, m):
        if step in checkpoints:
            rng = torch.get_rng_state()  # loading the copy back to describe it must not move training's RNG
            hf, ident_json = checkpoints[step]
            lm.save_model(m, tok, hf)
            lm.write_identity({"source": "local", "path": str(hf)}, ident_json, device="cpu")
            torch.set_rng_state(rng)

    cfg = {**p, "steps": steps, "log_every": max(1, steps // 50)}
    rows = lm.fit(
        model,
        sentence_batches(seqs, p["batch_size"], tok.eos_token_id, np.random.default_rng(seed)),
        cfg,
        f"finetune seed {seed}",
        on_step=save,
    )
    write_table(pl.DataFrame(rows).with_columns(pl.lit(seed).alias("seed")), loss_csv, loss_parquet)
    lm.save_model(model, tok, outdir)
    ident = lm.write_identity({"source": "local", "path": str(Path(outdir))}, model_json, device="cpu")
    log.info("fine-tuned %d steps on %d sentences; last loss %.3f", steps, len(seqs), rows[-1]["train_loss"])
    return ident


def build_datastore(identity_json, train_parquet, manifest, index_path, index_meta, threads=1, batch=32) -> dict:
    """Keys and values of every training-sentence position, one shard (beside ``manifest``), and a Flat index."""
    torch.set_num_threads(threads)
    outdir = Path(manifest).parent
    model, tok, ident = lm.load_checked(identity_json, device="cpu")
    seqs = encode_sentences(tok, pl.read_parquet(train_parquet)["text"].to_list(), max_positions(model))
    n = sum(len(s) - 1 for s in seqs)
    save_npy(outdir / "tokens.npy", np.concatenate([np.asarray(s, np.int32) for s in seqs]))
    offsets = np.cumsum([0] + [len(s) - 1 for s in seqs])
    keys_p, vals_p, meta_p = outdir / "keys_000.npy", outdir / "vals_000.npy", outdir / "shard_000.json"
    with atomic_path(keys_p, ".npy") as ktmp, atomic_path(vals_p, ".npy") as vtmp:
        keys = open_npy_for_writing(ktmp, KEY_DTYPE, (n, ident["dim"]))
        vals = open_npy_for_writing(vtmp, VAL_DTYPE, (n,))
        for i, k, _ in forward.forward_scored(model, ident["hook_point"], seqs, [1] * len(seqs), batch):
            keys[offsets[i] : offsets[i + 1]] = k.astype(KEY_DTYPE)
            vals[offsets[i] : offsets[i + 1]] = seqs[i][1:]
        keys.flush()
        vals.flush()
        del keys, vals
        digests = shard_digests(ktmp, vtmp)
    write_shard_meta(meta_p, ident, 0, 0, n, digests)
    written = write_manifest(ident, outdir / "tokens.npy", [(keys_p, vals_p, meta_p)], manifest)
    index.build_index(manifest, {"type": "Flat"}, 0, index_path, index_meta, threads)
    return written


def evaluate(identity_json, manifest, index_path, index_meta, test_parquet, mlp_pt, mlp_json, p: dict, csv, parquet,
             threads: int = 1):
    """log p(child | "[villager], is the parent of") per test item under the LM, the kNN-LM (λ = knn.lambda on
    p_knn, and 1 − λ: paper 2's λ read on p_lm) and the MLP-LM (none without ``mlp_pt``: its column empty)."""
    k, lam, sigma = p["knn"]["k"], p["knn"]["lambda"], p["knn"]["sigma"]
    model, tok, ident, ds, idx, imeta = open_retriever(
        identity_json,
        manifest,
        index_path,
        index_meta,
        {"k_max": k, "device": "cpu", "dtype": "float32", "gpu_shard_above_gb": None},  # Macondo runs on the CPU
        threads,
    )
    test = pl.read_parquet(test_parquet)
    seqs, starts = test_pairs(tok, test)
    tok_item, keys, lm_lp, targets = [], [], [], []
    for i, kk, lp in forward.forward_scored(model, ident["hook_point"], seqs, starts, 32):
        tok_item += [i] * len(lp)
        keys.append(kk)
        lm_lp.append(lp)
        targets += seqs[i][starts[i] :]
    q = np.concatenate(keys).astype(np.float16).astype(np.float32)  # the datastore's precision
    dists, ids = search(idx, ds, q, k, imeta["exact"])
    lm_lp, targets = np.concatenate(lm_lp).astype(np.float64), np.asarray(targets)
    knn = knnlm.knn_target_logprobs(dists, ds.gather_vals(ids), targets, [k], sigma)[k]
    tok_item = np.asarray(tok_item)

    def per_item(lp):
        return np.bincount(tok_item, weights=lp, minlength=len(seqs))

    mlp_scores = [None] * len(seqs)  # a checkpoint without an MLP (analyses.macondo.checkpoint_mlp)
    if mlp_pt is not None:
        mlp = mlp_lm.load(mlp_pt, mlp_json, model.get_output_embeddings().weight.detach().float())  # loaded once
        mlp_scores = per_item(knnlm.interpolate(lm_lp, mlp_lm.logprobs(mlp, q, targets), p["mlp_lambda"]))

    df = test.select("villager", "child", "n_children").with_columns(
        pl.lit(p["seed"]).alias("seed"),
        pl.lit(p["at"]).alias("at"),
        pl.Series("lm", per_item(lm_lp)),
        pl.Series("knn_lm", per_item(knnlm.interpolate(lm_lp, knn, lam))),
        pl.Series("knn_lm_literal", per_item(knnlm.interpolate(lm_lp, knn, 1 - lam))),
        pl.Series("mlp_lm", mlp_scores, dtype=pl.Float64),
        pl.Series("n_tokens", np.bincount(tok_item, minlength=len(seqs))),
    )
    write_table(df, csv, parquet)
    log.info("mean log-likelihood: LM %.3f, kNN-LM %.3f, MLP-LM %s", df["lm"].mean(), df["knn_lm"].mean(),
             "-" if mlp_pt is None else f"{df['mlp_lm'].mean():.3f}")
    return df



# --------------------------------------------------------------------------------------------- steps
def check_points(name: str, ats: list, mlp_at: list, per_point: dict, per_mlp: dict) -> None:
    """A step over a seed's points: each list of ``per_point`` has one path per point of ``ats``, each of
    ``per_mlp`` one per point of ``mlp_at``, which is a subset of ``ats``; else a ValueError naming the lists."""
    wrong = [f"--{k}: {len(v)}" for k, v in per_point.items() if len(v) != len(ats)]
    wrong += [f"--{k}: {len(v)}" for k, v in per_mlp.items() if len(v) != len(mlp_at)]
    if wrong or not set(mlp_at) <= set(ats):
        raise ValueError(f"{name}: params.at names {len(ats)} points and params.mlp_at {mlp_at} (of them), but "
                         f"{', '.join(wrong) or 'mlp_at is not a subset of at'}")


@step
def macondo_finetune(
    params: dict, model_json: Path, train: Path, hf: Path, out_model_json: Path, loss_csv: Path,
    loss_parquet: Path, checkpoint_hf: list[Path] = (), checkpoint_json: list[Path] = (), threads: int = 1,
) -> None:
    """Fine-tune the model on one seed's training sentences (over-specified: with a description); the model
    is also saved before the update of each step of params.checkpoints (--checkpoint-hf and --checkpoint-json
    in that order)."""
    steps = params.get("checkpoints", [])
    if not len(steps) == len(checkpoint_hf) == len(checkpoint_json):
        raise ValueError(f"macondo-finetune: {len(steps)} checkpoint steps, {len(checkpoint_hf)} --checkpoint-hf, "
                         f"{len(checkpoint_json)} --checkpoint-json")
    finetune(model_json, train, params["finetune"], params["seed"], hf, out_model_json, loss_csv, loss_parquet,
             threads, dict(zip(steps, zip(checkpoint_hf, checkpoint_json, strict=True), strict=True)))


@step
def macondo_memory(
    params: dict, model_json: list[Path], train: Path, manifest: list[Path], index: list[Path],
    index_meta: list[Path], mlp: list[Path] = (), mlp_json: list[Path] = (), loss_csv: list[Path] = (),
    loss_parquet: list[Path] = (), threads: int = 1,
) -> None:
    """A seed's memories, one point of params.at after the other: its datastore over the training sentences (shard
    beside --manifest, Flat index; --model-json, --manifest, --index, --index-meta in the order of params.at), then
    at the points of params.mlp_at the MLP trained on the datastore's pairs (params.mlp, params.seed; --mlp,
    --mlp-json, --loss-csv, --loss-parquet in the order of params.mlp_at)."""
    ats, mlp_at = params["at"], params["mlp_at"]
    check_points("macondo-memory", ats, mlp_at,
                 {"model-json": model_json, "manifest": manifest, "index": index, "index-meta": index_meta},
                 {"mlp": mlp, "mlp-json": mlp_json, "loss-csv": loss_csv, "loss-parquet": loss_parquet})
    for i, at in enumerate(ats):
        build_datastore(model_json[i], train, manifest[i], index[i], index_meta[i], threads)
        if at in mlp_at:
            j = mlp_at.index(at)
            mlp_lm.train_on_datastore(model_json[i], manifest[i], params["mlp"], params["seed"], mlp[j], mlp_json[j],
                                      loss_csv[j], loss_parquet[j], threads)


@step
def macondo_eval(
    params: dict, model_json: list[Path], manifest: list[Path], index: list[Path], index_meta: list[Path],
    mlp: list[Path], mlp_json: list[Path], test: Path, parquet: list[Path], csv: list[Path], threads: int = 1,
) -> None:
    """Score the children's names on one seed's test sentences with the LM, the kNN-LM and the MLP-LM, at each
    checkpoint of params.at in turn (every list argument in that order; --mlp and --mlp-json: the checkpoints of
    params.mlp_at, in that order; the others' MLP-LM column is empty)."""
    lm.torch_threads(threads)
    ats, mlp_at = params["at"], params["mlp_at"]
    check_points("macondo-eval", ats, mlp_at,
                 {"model-json": model_json, "manifest": manifest, "index": index, "index-meta": index_meta,
                  "parquet": parquet, "csv": csv},
                 {"mlp": mlp, "mlp-json": mlp_json})
    mlps = dict(zip(mlp_at, zip(mlp, mlp_json, strict=True), strict=True))
    for i, at in enumerate(ats):
        evaluate(model_json[i], manifest[i], index[i], index_meta[i], test, *mlps.get(at, (None, None)),
                 {**params, "at": at}, csv[i], parquet[i], threads)
