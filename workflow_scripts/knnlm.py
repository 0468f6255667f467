"""The kNN-LM math, in one place; every other stage calls it.

    p_knn(w) ∝ Σ_{i ≤ k} 1[v_i = w] · exp(−d_i / σ)        d_i: squared L2 distance, neighbours sorted ascending
    p(w)     = λ · p_knn(w) + (1 − λ) · p_lm(w)              λ is the weight of the kNN part (Khandelwal; paper 1)

Paper 2 writes its interpolation weight on p_lm; its λ = 0.25 (App. A) is λ = 0.25 on p_knn here.
Everything is computed in log space; perplexity is exp(−mean natural-log probability).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

# the LM variants paper 2 scores side by side: column name -> name in tables and figures. "knn_lm" weighs p_knn
# by λ (our reading of paper 2's λ, the kNN-LM literature's); "knn_lm_literal" by 1 − λ (its Eq. 1 read literally,
# λ on p_lm): both rescore the same neighbours.
VARIANTS = {"lm": "LM", "knn_lm": "kNN-LM", "knn_lm_literal": "kNN-LM (λ on p_lm)", "mlp_lm": "MLP-LM"}


def _check(dists: np.ndarray, vals: np.ndarray, k: int) -> None:
    if dists.shape != vals.shape or dists.ndim != 2:
        raise ValueError(f"dists {dists.shape} and vals {vals.shape} must be equal [N, K] arrays")
    if not 1 <= k <= dists.shape[1]:
        raise ValueError(f"k = {k} outside 1..{dists.shape[1]} (neighbours cached)")


def knn_target_logprobs(dists, vals, targets, ks: Iterable[int], sigma: float, chunk: int = 2048) -> dict:
    """log p_knn(target) for every k in ``ks`` at one σ, from one pass over the neighbours.

    ``dists`` must be ascending per row (the retrieval cache guarantees it). Uses cumulative sums over the
    neighbour axis, so all k cost one exp + two cumsums. Returns {k: float64 [N]}; −inf where no neighbour
    among the first k carries the target.
    """
    ks = sorted(set(int(k) for k in ks))
    for k in ks:
        _check(dists, vals, k)
    if not sigma > 0:
        raise ValueError(f"sigma = {sigma} must be > 0")
    kmax = ks[-1]
    n = dists.shape[0]
    out = {k: np.empty(n, np.float64) for k in ks}
    cols = np.asarray(ks) - 1
    for a in range(0, n, chunk):
        d = np.asarray(dists[a : a + chunk, :kmax], dtype=np.float64)
        if np.any(np.diff(d, axis=1) < 0):
            raise ValueError("neighbour distances must be sorted ascending per row")
        w = np.exp((d[:, :1] - d) / sigma)  # relative to the nearest neighbour: w[:, 0] = 1, no overflow
        hit = np.asarray(vals[a : a + chunk, :kmax]) == np.asarray(targets[a : a + chunk])[:, None]
        den = np.cumsum(w, axis=1)[:, cols]
        num = np.cumsum(np.where(hit, w, 0.0), axis=1)[:, cols]
        with np.errstate(divide="ignore"):
            lp = np.log(num) - np.log(den)
        for j, k in enumerate(ks):
            out[k][a : a + chunk] = lp[:, j]
    return out


def knn_probs_at(dists, vals, token_ids, ks: Iterable[int], sigma: float) -> dict:
    """p_knn(w) for every w in ``token_ids`` [S] and every k in ``ks`` at one σ: {k: float64 [N, S]}.

    The columns of ``knn_distribution`` at ``token_ids`` without building [N, V] (paper 1's memory tasks read
    a few hundred label-word ids per query). Missing neighbours (value −1) carry no mass, as there.
    """
    ks = sorted(set(int(k) for k in ks))
    for k in ks:
        _check(dists, vals, k)
    if not sigma > 0:
        raise ValueError(f"sigma = {sigma} must be > 0")
    token_ids = np.asarray(token_ids, np.int64)
    kmax = ks[-1]
    d = np.asarray(dists[:, :kmax], dtype=np.float64)
    if np.any(np.diff(d, axis=1) < 0):
        raise ValueError("neighbour distances must be sorted ascending per row")
    v = np.asarray(vals[:, :kmax], np.int64)
    valid = v >= 0
    top = np.where(valid, -d, -np.inf).max(axis=1, keepdims=True)
    w = np.where(valid, np.exp(np.where(valid, -d - top, 0.0) / sigma), 0.0)
    # slot of each neighbour's value among token_ids (S = no slot); duplicates in token_ids share the first slot
    uniq, first = np.unique(token_ids, return_index=True)
    pos = np.searchsorted(uniq, v)
    hit = valid & (pos < len(uniq)) & (uniq[np.minimum(pos, len(uniq) - 1)] == v)
    slot = np.where(hit, first[np.minimum(pos, len(uniq) - 1)], len(token_ids))
    n, S = d.shape[0], len(token_ids) + 1
    flat = np.arange(n)[:, None] * S + slot
    out = {}
    for k in ks:
        num = np.bincount(flat[:, :k].ravel(), weights=w[:, :k].ravel(), minlength=n * S).reshape(n, S)[:, :-1]
        num = num[:, first[np.searchsorted(uniq, token_ids)]]  # duplicates read their first slot
        out[k] = num / w[:, :k].sum(axis=1, keepdims=True)
    return out


def knn_distribution(dists, vals, k: int, sigma: float, vocab_size: int) -> np.ndarray:
    """The full p_knn [N, V] (float64) for the first k neighbours; for small N (tasks, analyses, tests)."""
    _check(dists, vals, k)
    if not sigma > 0:
        raise ValueError(f"sigma = {sigma} must be > 0")
    d = np.asarray(dists[:, :k], dtype=np.float64)
    if np.any(np.diff(d, axis=1) < 0):
        raise ValueError("neighbour distances must be sorted ascending per row")
    logits = -d / sigma
    v = np.asarray(vals[:, :k])
    valid = v >= 0
    # shift by the nearest real neighbour: a missing one (-1) must not make the real weights underflow
    top = np.where(valid, logits, -np.inf).max(axis=1, keepdims=True)
    w = np.exp(np.where(valid, logits - top, -np.inf))
    p = np.zeros((d.shape[0], vocab_size))
    rows = np.broadcast_to(np.arange(d.shape[0])[:, None], v.shape)
    np.add.at(p, (rows[valid], v[valid]), w[valid])
    return p / p.sum(axis=1, keepdims=True)


def interpolate(lm_logprob, knn_logprob, lam: float):
    """log(λ·p_knn + (1−λ)·p_lm) from log-probabilities; λ = 0 returns ``lm_logprob`` exactly."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda = {lam} outside [0, 1]")
    lm = np.asarray(lm_logprob, dtype=np.float64)
    if lam == 0.0:
        return lm
    knn = np.asarray(knn_logprob, dtype=np.float64)
    if lam == 1.0:
        return knn
    return np.logaddexp(np.log(lam) + knn, np.log1p(-lam) + lm)


def perplexity(logprobs) -> float:
    return float(np.exp(-np.mean(np.asarray(logprobs, dtype=np.float64))))


def window_perplexity(logprobs, starts) -> float:
    """Paper 1's aggregation (run_clm.py: ``exp(mean(nlls))`` over its sliding windows, each window's loss the mean
    NLL of the tokens it scores): exp of the mean over windows of each window's mean NLL. ``starts``: the index of
    each window's first scored token in ``logprobs`` (``strided_windows``' firsts), ascending from 0."""
    nll = -np.asarray(logprobs, dtype=np.float64)
    starts = np.asarray(starts, dtype=np.int64)
    sizes = np.diff(np.append(starts, nll.size))
    if starts.size == 0 or starts[0] != 0 or (sizes <= 0).any():
        raise ValueError(f"window starts {starts[:5].tolist()}... do not cut {nll.size} tokens into windows")
    return float(np.exp(np.mean(np.add.reduceat(nll, starts) / sizes)))


def word_perplexity(logprobs, n_words: int) -> float:
    """Word-level perplexity of token log-probabilities: the total NLL divided by the number of words the tokens
    spell (``lm.word_count``), so that a BPE model's number can be set beside a word-level one (WikiText-103)."""
    if n_words <= 0:
        raise ValueError(f"word perplexity over {n_words} words")
    return float(np.exp(-np.sum(np.asarray(logprobs, dtype=np.float64)) / n_words))


def sweep(dists, vals, targets, lm_logprob, lambdas, ks, sigmas, window_starts=None, n_words=None) -> list[dict]:
    """Perplexity at every (λ, k, σ) by rescoring cached neighbours: the cost does not grow with the datastore. With
    ``window_starts`` (the eval windows, ``window_perplexity``), paper 1's per-window aggregation beside it; with
    ``n_words`` (the words the targets spell), the word-level perplexity (``word_perplexity``)."""
    base = perplexity(lm_logprob)
    windowed = {} if window_starts is None else {"base_window_ppl": window_perplexity(lm_logprob, window_starts)}
    worded = {} if n_words is None else {"base_word_ppl": word_perplexity(lm_logprob, n_words)}
    rows = []
    for sigma in sigmas:
        per_k = knn_target_logprobs(dists, vals, targets, ks, sigma)
        for k in ks:
            for lam in lambdas:
                lp = interpolate(lm_logprob, per_k[int(k)], lam)
                rows.append(
                    {
                        "lambda": float(lam),
                        "k": int(k),
                        "sigma": float(sigma),
                        "ppl": perplexity(lp),
                        "base_ppl": base,
                        "n_tokens": int(len(targets)),
                        **windowed,
                        **({"window_ppl": window_perplexity(lp, window_starts)} if windowed else {}),
                        **worded,
                        **({"word_ppl": word_perplexity(lp, n_words)} if worded else {}),
                    }
                )
    return rows
