"""Paper 2, §3 (Eq. 2): can the LM's last layers express the kNN-LM's distribution?

For each eval position, solve ``z* = argmin_z KL[f(z) || p_knnlm]`` by Adam from the model's own representation,
for ``f`` (the output layer and softmax) and for ``f∘g`` (with the last block's MLP and its residual), and report
the perplexity of ``p_proj = f(z*)`` beside the LM's and the kNN-LM's, with the mean final KL. With ``to_gold``,
also Table 4's ``f∘g → y``: ``f∘g`` moved towards the gold next token (``z* = argmin_z −log f∘g(z)[y]``, the same
optimiser and stopping rule), its perplexity and its KL to ``p_knnlm`` reported the same way.

Hugging Face decoders end with ``block output = h + mlp(norm(h))`` then ``logits = head(final_norm(output))``, so
here ``f(z) = softmax(head(z))`` acts on the final-normed hidden state (the paper's "last linear layer with
softmax") and ``f∘g(h) = softmax(head(final_norm(h + mlp(norm(h)))))`` acts on ``h``, the residual stream entering
the last MLP. ``h`` is captured with the backbone's forward pre-hook (``forward.run_model``) on the last block's
pre-MLP norm; its norm is the kNN-LM query, checked against the retrieval cache. ``p_knnlm`` comes from the cache
through ``knnlm`` (the only kNN-LM math). Positions are optimised together in batches; a position stops when its
KL changes by less than ``tol`` in a step (a per-position mask; stopped rows are held fixed), or at
``max_steps``. The paper: lr 0.1 until the change is below 0.001 (Tables 1, 3); lr 0.001 for 100 steps (Table 4).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .. import knnlm, lm
from ..artifacts import ArtifactError, load_npy, write_json, write_table
from ..cli import step
from ..forward import run_model
from ..retrieval_cache import load_cache
from ..sweep import chosen_point

log = logging.getLogger(__name__)
_PRE_MLP_NORMS = ("ln_2", "post_attention_layernorm", "final_layer_norm")
_FINAL_NORMS = ("transformer.ln_f", "model.norm", "gpt_neox.final_layer_norm", "model.decoder.final_layer_norm")


def last_layers(model, hook_point: str):
    """(pre-MLP norm path, ``f``, ``f∘g``) of a causal LM; ``f`` and ``f∘g`` return logits."""
    block_path = hook_point.rsplit(".", 1)[0]
    block = model.get_submodule(block_path)
    norm_name = next((n for n in _PRE_MLP_NORMS if hasattr(block, n)), None)
    final = next((p for p in _FINAL_NORMS if _has(model, p)), None)
    if norm_name is None or final is None:
        raise ValueError(f"{type(model).__name__}: no pre-MLP norm in {block_path} or final norm in {_FINAL_NORMS}")
    norm, mlp, final_norm = getattr(block, norm_name), model.get_submodule(hook_point), model.get_submodule(final)
    head = model.get_output_embeddings()

    def f(z):
        return head(z)

    def fg(h):
        return head(final_norm(h + mlp(norm(h))))

    return f"{block_path}.{norm_name}", f, fg, final_norm


def _has(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def kl_rows(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL[q || p] per row, from log-probabilities."""
    return (logq.exp() * (logq - logp)).sum(-1)


def project(fn, z0: torch.Tensor, target_logp: torch.Tensor | None, lr: float, tol: float, max_steps: int,
            gold: torch.Tensor | None = None):
    """Adam on ``z`` (rows optimised independently) to minimise KL[softmax(fn(z)) || exp(target_logp)], or, with
    ``gold`` (one token id a row) in its place, −log softmax(fn(z))[gold]: the projection onto the gold next
    token, Table 4's "f∘g → y" (the KL to a one-hot target is infinite; towards it, the cross-entropy is what is
    left to minimise).

    A row stops once its objective changes by less than ``tol`` between steps (``tol = 0``: run ``max_steps``).
    Adam's normalised steps can leave a point of near-zero gradient, so each row's best iterate is kept (z* is an
    argmin). Returns (z*, the objective at z* per row, steps taken per row)."""
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    active = torch.ones(len(z0), dtype=torch.bool)
    steps = torch.zeros(len(z0), dtype=torch.long)
    best_z, best_kl, prev = z0.clone(), torch.full((len(z0),), float("inf")), None

    def kl_of(zz):
        logq = torch.log_softmax(fn(zz).float(), dim=-1)
        return -logq.gather(-1, gold[:, None])[:, 0] if gold is not None else kl_rows(logq, target_logp)

    for _ in range(max_steps + 1):
        kl = kl_of(z)
        with torch.no_grad():
            better = kl.detach() < best_kl
            best_kl = torch.where(better, kl.detach(), best_kl)
            best_z[better] = z.detach()[better]
        if prev is not None and tol > 0:
            active &= (prev - kl.detach()).abs() >= tol
        if not active.any() or int(steps.max()) >= max_steps:
            break
        prev = kl.detach()
        frozen = z.detach()[~active].clone()
        opt.zero_grad(set_to_none=True)
        (kl * active).sum().backward()
        opt.step()
        with torch.no_grad():  # Adam's momentum would move a stopped row: hold it
            z[~active] = frozen
        steps += active
    return best_z, best_kl, steps


def run(identity_json, tokens_npy, cache_dir, manifest_json, points: list, p: dict, csv, parquet, meta_json, threads=1):
    """Project ``p_knnlm`` at the first ``max_positions`` eval positions for every run in ``p['runs']``, at each
    kNN-LM point of ``points`` ((label, {lambda, k, sigma}) pairs)."""
    torch.set_num_threads(threads)
    t0 = time.time()
    model, tok, ident = lm.load_checked(identity_json, device="cpu", block_size=p["block_size"])
    for q in model.parameters():
        q.requires_grad_(False)
    cache = load_cache(cache_dir, manifest_json, tokens_npy=tokens_npy)
    n = min(p["max_positions"], cache["meta"]["n_tokens"])
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    norm_path, f, fg, final_norm = last_layers(model, ident["hook_point"])
    h = np.empty((n, ident["dim"]), np.float32)
    stride = (cache["meta"].get("window") or {}).get("stride")  # the eval set's windows, as retrieve ran them
    for first, keys, _ in run_model(model, norm_path, tokens, 0, n, p["block_size"], p["batch_size"], False,
                                    stride=stride):
        h[first : first + len(keys)] = keys
    h = torch.from_numpy(h)
    norm = model.get_submodule(norm_path)
    with torch.no_grad():
        query = norm(h).numpy()
        z_f = final_norm(h + model.get_submodule(ident["hook_point"])(norm(h)))
        lm_logp = torch.log_softmax(f(z_f).float(), -1)
    cached_q = np.asarray(cache["queries"][:n], np.float32)
    err = float(np.max(np.abs(query - cached_q)) / (np.max(np.abs(cached_q)) + 1e-9))
    targets = np.asarray(cache["targets"][:n], np.int64)
    lm_t = lm_logp.numpy()[np.arange(n), targets]
    if err > 1e-2 or not np.allclose(lm_t, cache["lm_logprob"][:n], atol=1e-3):
        raise ArtifactError(
            f"{cache_dir}: the model's queries or log-probabilities at the first {n} positions differ from the cache "
            f"(relative query error {err:.3g}); it was built with another model or block size — rerun retrieve"
        )
    n_words = lm.word_count(tok, targets, "lines")  # paper 2's WikiText-103 count
    rows = []
    idx, gold = torch.arange(n), torch.from_numpy(targets)
    towards_gold: dict = {}  # run -> (log p_proj, steps) of f∘g→y
    for label, point in points:
        lam, k, sigma = point["lambda"], point["k"], point["sigma"]
        if k > cache["meta"]["K"]:
            raise ValueError(f"projection point {label}: k = {k} exceeds the {cache['meta']['K']} cached neighbours")
        p_knn = knnlm.knn_distribution(cache["dists"][:n], cache["vals"][:n], k, sigma, lm_logp.shape[1])
        with np.errstate(divide="ignore"):
            target = torch.from_numpy(knnlm.interpolate(lm_logp.numpy(), np.log(p_knn), lam)).float()
        knnlm_t = target.numpy()[np.arange(n), targets]
        base = {"point": label, "n_positions": n, "n_words": n_words, "lambda": lam, "k": k, "sigma": sigma}

        def row(run, space, token_lp, kl, base=base, **extra):
            return {"run": run, "space": space, **base, "ppl": knnlm.perplexity(token_lp),
                    "word_ppl": knnlm.word_perplexity(token_lp, n_words), "kl": kl, **extra}

        rows.append(row("LM", "-", lm_t, float(kl_rows(lm_logp, target).mean())))
        rows.append(row("kNN-LM", "-", knnlm_t, 0.0))
        for ri, r in enumerate(p["runs"]):
            spaces = [("f", f, z_f, target), ("f∘g", fg, h, target)]
            if p["to_gold"]:  # Table 4's f∘g → y: towards the gold next token (the target None)
                spaces.append(("f∘g→y", fg, h, None))
            for space, fn, z0, to in spaces:
                if to is None and ri in towards_gold:  # the same for every point: solved once a run
                    logq, steps = towards_gold[ri]
                else:
                    zs, kls, steps = [], [], []
                    for a in range(0, n, p["opt_batch"]):
                        b = slice(a, a + p["opt_batch"])
                        z, kl, st = project(fn, z0[b], None if to is None else to[b], r["lr"], r["tol"],
                                            r["max_steps"], gold=gold[b] if to is None else None)
                        zs.append(z)
                        kls.append(kl)
                        steps.append(st)
                    with torch.no_grad():
                        logq = torch.log_softmax(fn(torch.cat(zs)).float(), -1)
                    if to is None:
                        towards_gold[ri] = logq, steps
                # KL[p_proj || p_knnlm] at z*: the minimised one, or, towards the gold token, computed at its z*
                kl_mean = float(torch.cat(kls).mean()) if to is not None else float(kl_rows(logq, target).mean())
                name = f"p_proj lr={r['lr']:g}" + (f" tol={r['tol']:g}" if r["tol"] > 0 else f" {r['max_steps']} steps")
                rows.append(
                    row(
                        name,
                        space,
                        logq[idx, gold].numpy(),
                        kl_mean,
                        lr=r["lr"],
                        tol=r["tol"],
                        max_steps=r["max_steps"],
                        mean_steps=float(torch.cat(steps).float().mean()),
                    )
                )
                log.info("%s, %s %s: ppl %.3f, KL %.4f (%.1f s since the start)", label, rows[-1]["run"], space,
                         rows[-1]["ppl"], rows[-1]["kl"], time.time() - t0)
    df = pl.DataFrame(rows, infer_schema_length=None)
    write_table(df, csv, parquet)
    write_json(meta_json, {"points": dict(points), "n_positions": n})  # no timings: two runs give the same files
    log.info("projection: %.1f s", time.time() - t0)
    return df


def point_label(point: dict, how: str) -> str:
    return f"{how}: λ={point['lambda']:g}, k={point['k']}, σ={point['sigma']:g}"


@step
def projection(
    params: dict, model_json: Path, manifest: Path, tokens: Path, cache: Path, summary: Path, csv: Path,
    parquet: Path, meta: Path, threads: int = 1,
) -> None:
    """Solve Eq. 2 (projection of p_knnlm onto the output space of f and of f∘g) at the eval positions, for each
    kNN-LM point of params.points: a (λ, k, σ), or "chosen" (the perplexity sweep's choice in --summary);
    --cache: the retrieval cache's meta.json."""
    points = []
    for point in params["points"]:
        if point == "chosen":
            chosen, on = chosen_point(summary, params["datastore"])
            if chosen is None:
                raise ValueError(f"{summary}: no chosen (lambda, k, sigma) for datastore {params['datastore']}")
            point = dict(zip(("lambda", "k", "sigma"), chosen, strict=True))
            points.append((point_label(point, f"chosen on {on.removeprefix('perplexity on ')}"), point))
        else:
            points.append((point_label(point, "given"), point))
    run(model_json, tokens, cache.parent, manifest, points, params, csv, parquet, meta, threads)
