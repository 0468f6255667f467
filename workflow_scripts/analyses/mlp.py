"""Paper 2, §5 and App. D: an MLP trained on the datastore's (key, next token) pairs in place of kNN retrieval.

``logits = W(z + LN(MLP(z)))`` with ``W`` the LM's output layer (frozen, shared with the LM, so not counted as
storage), one hidden layer (paper: 4096) and a layer norm; trained with cross-entropy on every datastore pair
for a few epochs (paper: lr 1e-5, 10 epochs on Macondo, 2 on WikiText, batches of 3 × 3072 tokens). The MLP-LM
is ``λ·p_mlp + (1−λ)·p_lm``, mixed by ``knnlm.interpolate`` exactly like the kNN part; λ is chosen on one eval
set and applied to the other. Storage ratio: the MLP's bytes over the datastore's (keys + values) bytes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from .. import knnlm, lm
from ..artifacts import atomic_path, read_json, write_json, write_table
from ..cli import step
from ..datastore import Datastore
from ..retrieval_cache import load_cache
from ..sweep import chosen_point

log = logging.getLogger(__name__)


class KeyMLP(torch.nn.Module):
    """``logits = W(z + LN(MLP(z)))``; ``W`` is a frozen copy of the LM's output layer weights."""

    def __init__(self, dim: int, hidden: int, out_weight: torch.Tensor):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, dim))
        self.ln = torch.nn.LayerNorm(dim)
        self.register_buffer("W", out_weight.detach().float().clone(), persistent=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return (z + self.ln(self.mlp(z))) @ self.W.T

    def own_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


def output_weight(identity_json) -> torch.Tensor:
    model, _, _ = lm.load_checked(identity_json, device="cpu")
    return model.get_output_embeddings().weight.detach().float()


def train(keys, vals, W: torch.Tensor, p: dict, seed: int, desc: str = "train mlp"):
    """Fit a ``KeyMLP`` on (keys [n, d] array-like, vals [n]) for ``p['epochs']`` epochs; (model, loss rows)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    n, d = keys.shape
    model = KeyMLP(d, p["hidden"], W)
    opt = torch.optim.AdamW(model.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
    B = p["batch_size"]
    rows, t0, step = [], time.time(), 0
    n_steps = p["epochs"] * -(-n // B)
    bar = tqdm(total=n_steps, desc=desc, mininterval=10)
    for epoch in range(p["epochs"]):
        order = rng.permutation(n)
        for a in range(0, n, B):
            ids = np.sort(order[a : a + B])
            z = torch.from_numpy(np.asarray(keys[ids], np.float32))
            y = torch.from_numpy(np.asarray(vals[ids], np.int64))
            loss = torch.nn.functional.cross_entropy(model(z), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % p["log_every"] == 0 or step == n_steps - 1:
                rows.append({"epoch": epoch, "step": step, "loss": loss.item(), "seconds": time.time() - t0})
            step += 1
            bar.update()
    bar.close()
    model.eval()
    return model, rows


def logprobs(model: KeyMLP, z, targets, batch: int = 4096) -> np.ndarray:
    """log p_mlp(target | z) for every row."""
    out = np.empty(len(targets), np.float64)
    with torch.inference_mode():
        for a in range(0, len(targets), batch):
            lp = torch.log_softmax(model(torch.from_numpy(np.asarray(z[a : a + batch], np.float32))), -1)
            t = torch.from_numpy(np.asarray(targets[a : a + batch], np.int64))
            out[a : a + batch] = lp.gather(-1, t[:, None])[:, 0].double().numpy()
    return out


def save(model: KeyMLP, meta: dict, out_pt, out_json) -> None:
    with atomic_path(out_pt, ".pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(out_json, meta)


def load(pt, meta_json, W: torch.Tensor) -> KeyMLP:
    meta = read_json(meta_json)
    model = KeyMLP(meta["dim"], meta["hidden"], W)
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval()


def storage(model: KeyMLP, ds_bytes: int) -> dict:
    b = model.own_bytes()
    return {"mlp_bytes": b, "datastore_bytes": int(ds_bytes), "storage_ratio": b / ds_bytes}


def train_on_datastore(identity_json, manifest_json, p: dict, seed: int, out_pt, out_json, loss_csv, loss_parquet,
                       threads=1):
    """Train the MLP on every (key, value) pair of a backbone datastore."""
    torch.set_num_threads(threads)
    ds = Datastore(manifest_json)
    ds.check_model(lm.load_identity(identity_json), identity_json)
    if p.get("max_pairs") and p["max_pairs"] < ds.rows:  # a seeded subsample, gathered shard by shard
        ids = np.sort(np.random.default_rng(seed).choice(ds.rows, size=p["max_pairs"], replace=False))
        keys, vals = ds.gather_keys(ids), ds.gather_vals(ids)
    else:
        keys = np.concatenate([np.asarray(k) for k in ds.keys])
        vals = np.concatenate([np.asarray(v) for v in ds.vals])
    W = output_weight(identity_json)
    t0 = time.time()
    model, rows = train(keys, vals, W, p, seed)
    ds_bytes = sum(s["keys_bytes"] + s["values_bytes"] for s in ds.manifest["shards"])
    meta = {
        "dim": ds.dim,
        "hidden": p["hidden"],
        "pairs": len(vals),
        "datastore_rows": ds.rows,
        "manifest_sha256": ds.hash,
        "seconds": round(time.time() - t0, 2),
        **storage(model, ds_bytes),
        "params": p,
    }
    save(model, meta, out_pt, out_json)
    write_table(pl.DataFrame(rows), loss_csv, loss_parquet)
    log.info("MLP on %d pairs in %.0fs; storage %.4f of the datastore", ds.rows, meta["seconds"], meta["storage_ratio"])
    return meta


def evaluate(identity_json, mlp_pt, mlp_json, caches: dict, choose_on: str, lambdas, csv, parquet, knn_points=None,
             tokens: dict | None = None):
    """Perplexity of LM, MLP-LM (every λ) and kNN-LM (at ``knn_points[evalset]``) on each eval set's cache;
    λ of the MLP-LM chosen on ``choose_on``. ``tokens`` (eval set -> its tokens): each cache checked against its
    eval set's tokens."""
    W = output_weight(identity_json)
    model = load(mlp_pt, mlp_json, W)
    meta = read_json(mlp_json)
    tok = lm.load_tokenizer(lm.load_identity(identity_json))
    rows = []
    for evalset, cdir in caches.items():
        c = load_cache(cdir, tokens_npy=(tokens or {}).get(evalset))
        lp_mlp = logprobs(model, c["queries"], c["targets"])
        n_words = lm.word_count(tok, c["targets"], "lines")  # paper 2's WikiText-103 count
        base = {"eval_set": evalset, "n_tokens": int(len(c["targets"])), "n_words": n_words}

        def scores(lp, n_words=n_words):
            return {"ppl": knnlm.perplexity(lp), "word_ppl": knnlm.word_perplexity(lp, n_words)}

        rows.append({**base, "model": "LM", "lambda": 0.0, **scores(c["lm_logprob"])})
        for lam in map(float, lambdas):
            mixed = knnlm.interpolate(c["lm_logprob"], lp_mlp, lam)
            rows.append({**base, "model": "MLP-LM", "lambda": lam, **scores(mixed)})
        if knn_points and knn_points.get(evalset):
            lam, k, sigma = knn_points[evalset]
            knn = knnlm.knn_target_logprobs(c["dists"], c["vals"], c["targets"], [k], sigma)[k]
            rows.append(
                {
                    **base,
                    "model": f"kNN-LM (k={k}, σ={sigma:g})",
                    "lambda": lam,
                    **scores(knnlm.interpolate(c["lm_logprob"], knn, lam)),
                }
            )
    df = pl.DataFrame(rows).with_columns(pl.lit(meta["storage_ratio"]).alias("storage_ratio"))
    mlp = df.filter((pl.col("model") == "MLP-LM") & (pl.col("eval_set") == choose_on))
    best = float(mlp.sort(["ppl", "lambda"]).row(0, named=True)["lambda"]) if not mlp.is_empty() else None
    df = df.with_columns(
        ((pl.col("model") != "MLP-LM") | (pl.col("lambda") == pl.lit(best, dtype=pl.Float64))).alias("chosen"),
        pl.lit(choose_on).alias("chosen_on"),
    )
    write_table(df, csv, parquet)
    return df


# --------------------------------------------------------------------------------------------- steps
@step
def train_mlp(
    params: dict, model_json: Path, manifest: Path, mlp: Path, mlp_json: Path, loss_csv: Path, loss_parquet: Path,
    threads: int = 1,
) -> None:
    """Train the MLP that maps a datastore's keys to its values (paper 2, §5 and App. D)."""
    train_on_datastore(model_json, manifest, params["mlp"], params["seed"], mlp, mlp_json, loss_csv, loss_parquet,
                       threads)


@step
def mlp_eval(
    params: dict, model_json: Path, mlp: Path, mlp_json: Path, caches: list[Path], tokens: list[Path], summary: Path,
    csv: Path, parquet: Path, threads: int = 1,
) -> None:
    """Perplexity of the MLP-LM at every λ beside the LM and the kNN-LM at the point chosen on perplexity
    (--caches: the eval sets' retrieval caches, by their meta.json, and --tokens: their tokens, each in the order
    of params.eval_sets)."""
    lm.torch_threads(threads)
    chosen, _ = chosen_point(summary, params["datastore"])
    by_set = {e: c.parent for e, c in zip(params["eval_sets"], caches, strict=True)}
    # the table's rows: the set λ is chosen on first, then the others by name (not the config's key order)
    by_set = {e: by_set[e] for e in sorted(by_set, key=lambda e: (e != params["choose_on"], e))}
    evaluate(model_json, mlp, mlp_json, by_set, params["choose_on"], params["lambdas"], csv, parquet,
             {e: chosen for e in by_set} if chosen else None, dict(zip(params["eval_sets"], tokens, strict=True)))
