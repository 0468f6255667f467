"""The numpy half of task scoring: an option's score from its pairs' log-probabilities (a fuzzy verbalizer, PMI,
per-token normalisation), paper 1's last-token DCPMI, and the rescoring of a task cache at every (λ, k, σ).
``scoring`` fills the caches (a model, torch); ``evaluate`` and the scaling study rescore them with this module
alone, so their jobs start without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import knnlm

PMI_EPS = 1e-10  # eval_fuzzy.py: log(p + 1e-10)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m)))) if np.isfinite(m) else float(m)


def option_scores(options, pair_logprob, pair_len, normalize: bool = False) -> np.ndarray:
    """log Σ_{pairs of the option} p(continuation | context) (per-token mean log-probability if ``normalize``)."""
    out = np.empty(len(options))
    for j, pairs in enumerate(options):
        lp = np.asarray([pair_logprob[p] / (pair_len[p] if normalize else 1) for p in pairs], dtype=np.float64)
        out[j] = _logsumexp(lp)
    return out


NO_ANSWER = -1  # the prediction of an item none of whose options has a score above -inf (λ = 1, no neighbour)


def decide(scores) -> np.ndarray | int:
    """argmax over the last axis of option scores, NaN (−inf − (−inf) under PMI) ranked as −inf; an item none of
    whose options scores above −inf gets ``NO_ANSWER`` (wrong for every metric) instead of argmax's class 0."""
    s = np.asarray(scores, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    out = np.where(np.all(s == -np.inf, axis=-1), NO_ANSWER, np.argmax(s, axis=-1))
    return int(out) if out.ndim == 0 else out


def score_classify(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = True) -> np.ndarray:
    """Predicted label per item: the label whose verbalizer set is most probable as the continuation; with
    ``pmi``, domain-conditional PMI (score under the input minus score under the domain premise)."""
    preds = np.empty(len(items), np.int64)
    for i, it in enumerate(items):
        s = option_scores(it["options"], pair_logprob, pair_len)
        if pmi and it.get("domain"):
            s = s - option_scores(it["domain"], pair_logprob, pair_len)
        preds[i] = decide(s)
    return preds


def score_choice(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = False, normalize: bool = False):
    """Predicted candidate per item by its log-likelihood as continuation (sum, or per-token mean when
    ``normalize``); with ``pmi``, minus its log-likelihood under the domain premise."""
    preds = np.empty(len(items), np.int64)
    for i, it in enumerate(items):
        s = option_scores(it["options"], pair_logprob, pair_len, normalize)
        if pmi and it.get("domain"):
            s = s - option_scores(it["domain"], pair_logprob, pair_len, normalize)
        preds[i] = decide(s)
    return preds


def predict(entry: dict, items, pair_logprob, pair_len) -> np.ndarray:
    if entry["kind"] == "classify":
        return score_classify(items, pair_logprob, pair_len, pmi=bool(entry.get("pmi")))
    return score_choice(
        items, pair_logprob, pair_len, pmi=bool(entry.get("pmi")), normalize=entry["metric"] == "accuracy_norm"
    )


def pair_logprobs(token_logprob, token_pair, n_pairs: int) -> np.ndarray:
    """Sum the scored tokens' log-probabilities per (context, continuation) pair."""
    return np.bincount(token_pair, weights=np.asarray(token_logprob, np.float64), minlength=n_pairs)





def last_token_scores(lm_logp, premise_row, domain_row, class_slots, use_pmi: bool = True) -> np.ndarray:
    """Class scores per item [n, C] from log p at the synonym slots [Q, S]: DCPMI (eval_fuzzy.py's ``dcpmi``),
    or Σ p over the class's synonyms without PMI (its ``lm``). A synonym listed twice counts twice, as there."""
    p = np.exp(np.asarray(lm_logp, np.float64))
    out = np.empty((len(premise_row), len(class_slots)))
    for c, slots in enumerate(class_slots):
        if use_pmi:
            log_p = np.log(p[:, slots] + PMI_EPS)
            out[:, c] = (log_p[premise_row] - log_p[domain_row]).sum(axis=1)
        else:
            out[:, c] = p[premise_row][:, slots].sum(axis=1)
    return out


def last_token_logps_over_grid(cache: dict, lambdas, ks, sigmas):
    """Yield ((λ, k, σ), log p [Q, S] of the kNN-LM at the synonym slots): rescoring of the cache."""
    for sigma in sigmas:
        per_k = knnlm.knn_probs_at(cache["q_dists"], cache["q_vals"], cache["slot_ids"], ks, sigma)
        for k in ks:
            with np.errstate(divide="ignore"):
                knn = np.log(per_k[int(k)])
            for lam in lambdas:
                yield (float(lam), int(k), float(sigma)), knnlm.interpolate(cache["q_lm"], knn, lam)


def token_logprobs_over_grid(cache: dict, lambdas, ks, sigmas):
    """Yield ((λ, k, σ), log p of every scored token under the kNN-LM): rescoring of the cache."""
    d = cache["q_dists"][cache["t_row"]]
    v = cache["q_vals"][cache["t_row"]]
    for sigma in sigmas:
        per_k = knnlm.knn_target_logprobs(d, v, cache["t_target"], ks, sigma)
        for k in ks:
            for lam in lambdas:
                yield (float(lam), int(k), float(sigma)), knnlm.interpolate(cache["t_lm"], per_k[int(k)], lam)
