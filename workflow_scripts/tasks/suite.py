"""The offline synthetic task suite, built from the synthetic world beside the default corpus.

It reads ``world.json`` (the facts) and the training split the datastore is built from, so that every item's
status is checked against the text itself rather than assumed:

* memory — ``recall``: "X ( born 1936 in ___", items whose fact one training sentence states (subject, answer
  and "born" in the same sentence); ``occupation``: a topic-like classification whose label word co-occurs with the
  person's name in a training sentence.
* reasoning — ``twohop``: "X works for a company based in ___": X's employer and the employer's city are each
  stated in training sentences, but no training sentence holds X together with the answer; ``arithmetic``: a
  birth year stated in training text plus a small offset given in the prompt ("N years later").

Rows carry ``prompt``, ``choices``/``gold`` or ``label``, and the ``evidence`` sentences; they are written as
jsonl (one file per task) and loaded like any local task file.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict
from pathlib import Path

import polars as pl

from ..artifacts import atomic_path, read_json
from ..cli import step

log = logging.getLogger(__name__)
_SENT = re.compile(r"(?<= \.)\s+")
_NAME = re.compile(r"[A-Z][a-z]+ [A-Z][a-z]+")
OFFSETS = (10, 20, 30, 40, 50)
N_CHOICES = 4


def sentences(documents) -> list[str]:
    return [s.strip() for doc in documents for s in _SENT.split(doc) if s.strip()]


def by_person(sents: list[str], names: set[str]) -> dict[str, list[str]]:
    """Training sentences that mention each person (by full name)."""
    out: dict[str, list[str]] = defaultdict(list)
    for s in sents:
        for m in set(_NAME.findall(s)):
            if m in names:
                out[m].append(s)
    return out


def _mentions(sentence: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", sentence) is not None


def _choices(rng: random.Random, gold: str, pool: list[str]) -> tuple[list[str], int]:
    others = rng.sample(sorted(set(pool) - {gold}), k=min(N_CHOICES - 1, len(set(pool)) - 1))
    choices = [gold, *others]
    rng.shuffle(choices)
    return choices, choices.index(gold)


def build(world: dict, train_docs: list[str], generator: str, n_items: int, seed: int) -> list[dict]:
    """Up to ``n_items`` rows of one generator; the same inputs and seed give the same rows."""
    sents = sentences(train_docs)
    people = {p["name"]: p for p in world["people"]}
    mentions = by_person(sents, set(people))
    companies = {c["name"]: c for c in world["companies"]}
    cities = sorted(c["name"] for c in world["cities"])
    rng = random.Random(f"{seed}-{generator}")
    about: dict[str, list[str]] = {}  # company -> training sentences naming it (filled on first use)
    rows = []
    for name in sorted(people):
        p, said = people[name], mentions.get(name, [])
        if generator == "recall":
            ev = [s for s in said if _mentions(s, p["birth_city"]) and "born" in s]
            if ev:
                choices, gold = _choices(rng, p["birth_city"], cities)
                prompt = f"{name} ( born {p['born']} in"  # the birth year given, the city recalled
                rows.append({"prompt": prompt, "choices": choices, "gold": gold, "evidence": ev[:2]})
        elif generator == "occupation":
            ev = [s for s in said if _mentions(s, p["occupation"])]
            if ev:
                rows.append({"prompt": f"{name} is a", "label": p["occupation"], "evidence": ev[:2]})
        elif generator == "twohop":
            company = companies[p["employer"]]
            answer = company["city"]
            hop1 = [s for s in said if company["name"] in s]
            if company["name"] not in about:
                about[company["name"]] = [s for s in sents if company["name"] in s]
            hop2 = [s for s in about[company["name"]] if _mentions(s, answer) and "founded by" not in s]
            together = [s for s in said if _mentions(s, answer)]
            if hop1 and hop2 and not together:
                pool = sorted({c["city"] for c in world["companies"]})
                choices, gold = _choices(rng, answer, pool if len(pool) >= N_CHOICES else cities)
                rows.append(
                    {
                        "prompt": f"{name} works for a company based in",
                        "choices": choices,
                        "gold": gold,
                        "evidence": [hop1[0], hop2[0]],
                    }
                )
        elif generator == "arithmetic":
            ev = [s for s in said if str(p["born"]) in s and "born" in s]
            if ev:
                n = rng.choice(OFFSETS)
                gold_year = p["born"] + n
                cands = {gold_year, p["born"], gold_year + 10, gold_year - 10, gold_year + 20}
                cands = sorted(cands)[:N_CHOICES] if n > 10 else [p["born"], gold_year, gold_year + 10, gold_year + 20]
                choices = [str(y) for y in sorted(cands)]
                rng.shuffle(choices)
                rows.append(
                    {
                        "prompt": f"{name} was born in {p['born']} . {n} years later it was the year",
                        "choices": choices,
                        "gold": choices.index(str(gold_year)),
                        "evidence": ev[:1],
                    }
                )
        else:
            raise ValueError(f"unknown synthetic generator {generator!r}")
    rng.shuffle(rows)
    rows = rows[:n_items]
    if len(rows) < n_items:
        log.warning("%s: only %d eligible items (asked for %d)", generator, len(rows), n_items)
    for i, r in enumerate(rows):
        r["id"] = f"{generator}-{i:04d}"
        r["domain"] = {"occupation": "This person is a"}.get(generator, "")
    return rows


def write_suite(train_parquet, world_json, generators: dict[str, str], n_items: int, seed: int, outs: dict) -> dict:
    """One jsonl per task (``{task: generator}``, written to ``outs[task]``) from the world and training split."""
    world = read_json(world_json)
    if not world.get("people"):
        raise ValueError(f"{world_json} has no synthetic world (corpus not generated)")
    docs = pl.read_parquet(train_parquet)["text"].to_list()
    counts = {}
    for task, gen in generators.items():
        rows = build(world, docs, gen, n_items, seed)
        if not rows:
            raise ValueError(f"synthetic task {task}: no eligible items in this world")
        with atomic_path(outs[task], ".jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        counts[task] = len(rows)
        log.info("%s (%s): %d items", task, gen, len(rows))
    return counts


@step
def task_suite(params: dict, train: Path, world: Path, out: list[Path]) -> None:
    """The offline synthetic task suite from the generated corpus's world and training split; --out: one
    <task>.jsonl per task of params.generators."""
    outs = {p.name.removesuffix(".jsonl"): p for p in out}
    if sorted(outs) != sorted(params["generators"]):
        raise ValueError(f"task-suite: --out names {sorted(outs)}, params.generators {sorted(params['generators'])}")
    write_suite(train, world, params["generators"], params["n_items"], params["seed"], outs)
