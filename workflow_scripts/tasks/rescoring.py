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


def _logsumexp(x: np.ndarray) -> np.ndarray:
    """log Σ exp over the last axis of [n, s] rows: max + log Σ exp(x − max); the max itself where it is not finite."""
    m = np.max(x, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # a row of −inf: (−inf) − (−inf); its max is kept
        out = m + np.log(np.sum(np.exp(x - m[..., None]), axis=-1))
    return np.where(np.isfinite(m), out, m)


class Options:
    """Items' options (each a list of pair ids) as arrays, built once and scored at every grid point with a few
    numpy calls instead of one per option: options of the same number of pairs are scored as the rows of one
    matrix. ``scores`` returns [items, width], −inf where an item has fewer options than ``width``."""

    def __init__(self, options: Sequence[Sequence[Sequence[int]]], pair_len, normalize: bool = False,
                 width: int | None = None):
        self.n = len(options)
        self.width = max((len(o) for o in options), default=1) if width is None else width
        by_size: dict[int, tuple[list, list]] = {}
        for i, opts in enumerate(options):
            if len(opts) > self.width:
                raise ValueError(f"item {i}: {len(opts)} options, more than the {self.width} of its other scores")
            for j, pairs in enumerate(opts):
                if not len(pairs):
                    raise ValueError(f"item {i}, option {j}: no (context, continuation) pair to score")
                slots, ids = by_size.setdefault(len(pairs), ([], []))
                slots.append(i * self.width + j)
                ids.append(list(pairs))
        self.groups = [(np.asarray(slots, np.int64), np.asarray(ids, np.int64)) for slots, ids in by_size.values()]
        self.scale = np.asarray(pair_len) if normalize else None

    def scores(self, pair_logprob) -> np.ndarray:
        """log Σ_{pairs of the option} p(continuation | context) (per-token mean log-probability if normalizing)."""
        lp_all = np.asarray(pair_logprob, np.float64)
        out = np.full(self.n * self.width, -np.inf)
        for slots, ids in self.groups:
            lp = lp_all[ids] if self.scale is None else lp_all[ids] / self.scale[ids]
            out[slots] = _logsumexp(lp)
        return out.reshape(self.n, self.width)


def option_scores(options, pair_logprob, pair_len, normalize: bool = False) -> np.ndarray:
    """log Σ_{pairs of the option} p(continuation | context) (per-token mean log-probability if ``normalize``)."""
    return Options([options], pair_len, normalize).scores(pair_logprob)[0]


NO_ANSWER = -1  # the prediction of an item none of whose options has a score above -inf (λ = 1, no neighbour)


def decide(scores) -> np.ndarray | int:
    """argmax over the last axis of option scores, NaN (−inf − (−inf) under PMI) ranked as −inf; an item none of
    whose options scores above −inf gets ``NO_ANSWER`` (wrong for every metric) instead of argmax's class 0."""
    s = np.asarray(scores, np.float64)
    s = np.where(np.isnan(s), -np.inf, s)
    out = np.where(np.all(s == -np.inf, axis=-1), NO_ANSWER, np.argmax(s, axis=-1))
    return int(out) if out.ndim == 0 else out


def predictor(items: Sequence[dict], pair_len, pmi: bool = False, normalize: bool = False):
    """``fn(pair_logprob)`` -> predicted option per item: the option most probable as the continuation (its pairs'
    probabilities summed, or per-token mean log-probability when ``normalize``); with ``pmi``, minus its score under
    the item's domain premise (items without one: the score alone). The items' layout is built once, here."""
    opts = Options([it["options"] for it in items], pair_len, normalize)
    with_domain = np.asarray([i for i, it in enumerate(items) if pmi and it.get("domain")], np.int64)
    dom = Options([items[i]["domain"] for i in with_domain], pair_len, normalize, opts.width)
    for i in with_domain:
        if len(items[i]["domain"]) != len(items[i]["options"]):
            raise ValueError(f"item {i}: {len(items[i]['options'])} options but {len(items[i]['domain'])} domain "
                             "scores")

    def fn(pair_logprob) -> np.ndarray:
        s = opts.scores(pair_logprob)
        if with_domain.size:
            s[with_domain] -= dom.scores(pair_logprob)
        return np.asarray(decide(s), np.int64).reshape(len(items))

    return fn


def score_classify(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = True) -> np.ndarray:
    """Predicted label per item: the label whose verbalizer set is most probable as the continuation; with
    ``pmi``, domain-conditional PMI (score under the input minus score under the domain premise)."""
    return predictor(items, pair_len, pmi)(pair_logprob)


def score_choice(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = False, normalize: bool = False):
    """Predicted candidate per item by its log-likelihood as continuation (sum, or per-token mean when
    ``normalize``); with ``pmi``, minus its log-likelihood under the domain premise."""
    return predictor(items, pair_len, pmi, normalize)(pair_logprob)


def task_predictor(entry: dict, items, pair_len):
    """``predictor`` of a task entry: classify (PMI when the entry says), choice (also accuracy_norm)."""
    normalize = entry["kind"] != "classify" and entry["metric"] == "accuracy_norm"
    return predictor(items, pair_len, bool(entry.get("pmi")), normalize)


def predict(entry: dict, items, pair_logprob, pair_len) -> np.ndarray:
    return task_predictor(entry, items, pair_len)(pair_logprob)


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
