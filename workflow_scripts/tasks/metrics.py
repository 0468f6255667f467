"""The answer metrics of paper 1's generate tasks (``TEXT_METRICS``, an entry's ``metric``), each mirroring the
paper's evaluation script, and a task's score from its items' scores (``aggregate``)."""

from __future__ import annotations

import re
import string

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(pred: str, golds: list[str]) -> float:
    return float(any(normalize_answer(pred) == normalize_answer(g) for g in golds))


def _overlap_f1(p: list[str], t: list[str]) -> float:
    common = sum(min(p.count(w), t.count(w)) for w in set(p) & set(t))
    if not common:
        return 0.0
    prec, rec = common / len(p), common / len(t)
    return 2 * prec * rec / (prec + rec)


def token_f1(pred: str, golds: list[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    best = 0.0
    p = normalize_answer(pred).split()
    for g in golds:
        t = normalize_answer(g).split()
        best = max(best, float(p == t) if not p or not t else _overlap_f1(p, t))
    return best


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a generation: after ``####`` if present, else the last number in the text."""
    marked = "####" in text
    if marked:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    return found[0 if marked else -1].replace(",", "")


def number_match(pred: str, golds: list[str]) -> float:
    got = final_number(pred)
    if got is None:
        return 0.0
    for g in golds:
        try:
            if abs(float(got) - float(g.replace(",", ""))) < 1e-6:
                return 1.0
        except ValueError:
            continue
    return 0.0


def qa_f1(pred: str, golds: list[str]) -> float:
    """Paper 1's NQ / HotpotQA F1 (eval_qa.py ``f1_score``), the best over the golds: a gold that normalises to
    yes / no / noanswer scores 1 when it is a substring of the normalised prediction, else 0; otherwise token F1,
    0 without common tokens (so an empty prediction or gold scores 0)."""
    best = 0.0
    p = normalize_answer(pred)
    for g in golds:
        t = normalize_answer(g)
        if t in ("yes", "no", "noanswer"):
            best = max(best, float(t in p))
        else:
            best = max(best, _overlap_f1(p.split(), t.split()))
    return best


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def drop_f1(pred: str, golds: list[str]) -> float:
    """Paper 1's DROP F1 (eval_drop.py ``f1_score``), the best over the golds: a gold that normalises to a number
    scores 1 when it is one of the whole digit runs (``\\b\\d+\\b``) of the normalised prediction, else 0;
    otherwise token F1 (0 without common tokens)."""
    best = 0.0
    p = normalize_answer(pred)
    for g in golds:
        t = normalize_answer(g)
        if _is_float(t):
            best = max(best, float(t in re.findall(r"\b\d+\b", p)))
        else:
            best = max(best, _overlap_f1(p.split(), t.split()))
    return best


_GSM8K_MARK = re.compile(r"#### ([0-9.,$]+)")


def gsm8k_answer(text: str) -> float | None:
    """Paper 1's GSM8K answer (eval_gsm8k.py ``extract_answer_and_chain``): the first '#### ' followed by digits,
    '.', ',' or '$'; its first run of digits and dots ('1,200' reads 1, '$18' reads 18); 'a.b' -> a.b, one part ->
    that number, no part or more than two -> 0. None without a marked answer ('The answer is 18.' has none)."""
    m = _GSM8K_MARK.search(text)
    if not m:
        return None
    num = re.search(r"[0-9.]+", m.group(1))
    if num is None:
        return None
    parts = [x for x in num.group().split(".") if x]
    if len(parts) == 1:
        return float(parts[0])
    if len(parts) == 2:
        return float(f"{parts[0]}.{parts[1]}")
    return 0


def gsm8k_match(pred: str, golds: list[str]) -> float:
    """Paper 1's GSM8K check (``check_answer``): the prediction's answer equals the gold's, both read by
    ``gsm8k_answer`` (golds are the text after '####', as ``extract: gsm8k_raw`` gives them). As in the paper, no
    marked answer on both sides compares equal (None == None)."""
    got = gsm8k_answer(pred)
    return float(any(got == gsm8k_answer("#### " + g) for g in golds))


def prefix_match(pred: str, golds: list[str]) -> float:
    """Paper 1's BBH check (eval_bbh.py): the stripped generation starts with the target."""
    return float(any(pred.strip().startswith(g) for g in golds))


TEXT_METRICS = {
    "em": exact_match,
    "f1": token_f1,
    "number": number_match,
    "f1_qa": qa_f1,
    "f1_drop": drop_f1,
    "gsm8k": gsm8k_match,
    "prefix": prefix_match,
}


def aggregate(entry: dict, items: list[dict], scores) -> float:
    """A task's score from its per-item scores: their mean, or with ``aggregate: macro`` the mean over the items'
    groups (subtasks) of each group's mean (paper 1's BBH average)."""
    scores = np.asarray(scores, np.float64)
    if entry.get("aggregate", "mean") != "macro":
        return float(scores.mean())
    groups = [it["group"] for it in items]
    return float(np.mean([scores[[g == h for h in groups]].mean() for g in dict.fromkeys(groups)]))
