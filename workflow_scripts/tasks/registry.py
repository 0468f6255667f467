"""Task registry (paper 1's downstream evaluation): every task is a declarative entry, not code.

The entries live in ``registry.yaml`` beside this module (the twenty paper tasks and the offline synthetic
suite); a config can add its own under ``tasks.custom`` (e.g. a local jsonl file). This module holds what an entry
may say and the checks that refuse one scoring could not run (``check_entry``), the resolution of an entry against
paper 1's data folder (``resolve_entry``), the named text cleaners an entry picks, and the checks of a config's
``tasks`` section. Turning an entry and its dataset into items is ``items.py``; the answer metrics are
``metrics.py``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

from ..config import ConfigError, read_shipped_yaml
from .metrics import TEXT_METRICS

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")
KINDS = ("classify", "choice", "generate")
CATEGORIES = ("memory", "reasoning")
METRICS = {
    "classify": ("accuracy",),
    "choice": ("accuracy", "accuracy_norm"),
    "generate": tuple(TEXT_METRICS),
}
EXTRACTS = ("none", "gsm8k", "gsm8k_raw")
FEWSHOT_FROM = ("inline", "first")
AGGREGATES = ("mean", "macro")
SOURCE_TYPES = ("hf", "local", "synthetic", "paper")
PROTOCOLS = ("continuation", "last_token")
GENERATORS = ("recall", "occupation", "twohop", "arithmetic")


class TaskError(ValueError):
    pass


@functools.cache
def _shipped() -> dict:
    return read_shipped_yaml(REGISTRY_PATH)


def registry(custom: dict | None = None) -> dict:
    """The shipped entries plus ``custom`` ones (a custom entry of the same name replaces a shipped one)."""
    entries = copy.deepcopy(_shipped())
    for name, entry in (custom or {}).items():
        entries[name] = copy.deepcopy(entry)
    for name, entry in entries.items():
        check_entry(name, entry)
    return entries


def check_entry(name: str, e: dict, where: str | None = None) -> None:
    """Refuse an entry that scoring could not run, naming the field."""
    where = where or f"task {name!r}"

    def need(field, ok, expected):
        if not ok:
            raise TaskError(f"{where}: field {field!r} = {e.get(field)!r}, expected {expected}")

    need("category", e.get("category") in CATEGORIES, f"one of {CATEGORIES}")
    need("kind", e.get("kind") in KINDS, f"one of {KINDS}")
    need("metric", e.get("metric") in METRICS[e["kind"]], f"one of {METRICS[e['kind']]} for kind {e['kind']}")
    src = e.get("source")
    need("source", isinstance(src, dict) and src.get("type") in SOURCE_TYPES, f"a mapping with type {SOURCE_TYPES}")
    if src["type"] in ("hf", "local", "paper"):
        need("source", isinstance(src.get("path"), str), "a mapping with a path")
    if src["type"] == "synthetic":
        need("source", src.get("generator") in GENERATORS, f"a synthetic generator in {GENERATORS}")
    need("prompt", isinstance(e.get("prompt"), str), "a format string")
    if e["kind"] == "classify":
        need("protocol", e.get("protocol", "continuation") in PROTOCOLS, f"one of {PROTOCOLS}")
        need("label_field", isinstance(e.get("label_field"), str), "the column holding the label")
        if "synonyms" in e:
            classes, syn = e.get("classes"), e["synonyms"]
            need("classes", isinstance(classes, list) and len(classes) >= 2, "the class names, at least two")
            need(
                "synonyms",
                (isinstance(syn, dict) and isinstance(syn.get("file"), str))
                or (isinstance(syn, list) and len(syn) == len(classes) and all(_words(w) for w in syn)),
                "{file: ..., trim, keys} (a label file in tasks.paper_data) or one list of words per class",
            )
            lm = e.get("label_map")
            need(
                "label_map",
                lm is None
                or (isinstance(lm, dict) and all(v is None or v in range(len(classes)) for v in lm.values())),
                f"{{label value: class index 0..{len(classes) - 1} or null (row dropped)}}",
            )
            if lm is not None:
                _check_label_keys("label_map", lm, need)
        else:
            labels = e.get("labels")
            need(
                "labels",
                isinstance(labels, dict) and len(labels) >= 2 and all(_words(v) for v in labels.values()),
                "{label value: [continuation, ...]} with at least two labels",
            )
            _check_label_keys("labels", labels, need)
    if e["kind"] == "choice":
        ch = e.get("choices")
        need("choices", isinstance(ch, dict) and ("field" in ch or "fields" in ch), "{field: ...} or {fields: [...]}")
        gold = e.get("gold")
        need(
            "gold",
            isinstance(gold, dict) and gold.get("type") in ("index", "index1", "letter", "match") and "field" in gold,
            "{field, type: index | index1 | letter | match}",
        )
        if gold["type"] == "match":
            need("gold", "match_field" in gold, "a match_field for type match")
    if e["kind"] == "generate":
        ans = e.get("answers")
        need("answers", isinstance(ans, dict) and "field" in ans, "{field, extract}")
        need("answers", ans.get("extract", "none") in EXTRACTS, f"extract one of {EXTRACTS}")
        need("max_new_tokens", _pos_int(e.get("max_new_tokens", 1)), "a positive integer")
        stop = e.get("stop", [])
        need("stop", isinstance(stop, list) and all(isinstance(x, str) and x for x in stop), "a list of strings")
    if e.get("pmi"):
        need("domain", isinstance(e.get("domain"), str), "a domain premise (format string) when pmi is on")
    reasoning_only = [f for f in ("fewshot", "clean", "group", "aggregate") if f in e]
    if e["kind"] == "classify" and reasoning_only:
        need(reasoning_only[0], False, "absent for kind classify (choice and generate entries only)")
    if "fewshot" in e:
        _check_fewshot(e, need)
    if "clean" in e:
        c = e["clean"]
        need(
            "clean",
            isinstance(c, dict)
            and set(c) <= {"prompt", "choices", "fields"}
            and all(c[k] in CLEANERS for k in ("prompt", "choices") if k in c)
            and isinstance(c.get("fields", {}), dict)
            and all(isinstance(f, str) and v in CLEANERS for f, v in c.get("fields", {}).items()),
            f"{{prompt: cleaner, choices: cleaner, fields: {{field: cleaner}}}} with cleaners in {sorted(CLEANERS)}",
        )
    if "exclude" in e:
        x = e["exclude"]
        need(
            "exclude",
            isinstance(x, dict) and isinstance(x.get("field"), str) and isinstance(x.get("values"), list),
            "{field, values: [...]} (rows whose field, or any element of it, is one of values are left out)",
        )
    if "group" in e:
        need("group", isinstance(e["group"], str), "the row field naming an item's subtask")
    if "aggregate" in e:
        need("aggregate", e["aggregate"] in AGGREGATES, f"one of {AGGREGATES}")
        if e["aggregate"] == "macro":
            need("aggregate", e["kind"] == "generate", "macro only for kind generate")
            need("group", isinstance(e.get("group"), str), "the row field naming the subtask for aggregate: macro")

    sample = e.get("sample")
    need(
        "sample",
        sample is None or (isinstance(sample, dict) and {"n", "seed"} <= set(sample) and int(sample["n"]) > 0),
        "{n, seed}: the paper's seeded draw of n rows",
    )
    need("strip", isinstance(e.get("strip", []), list), "a list of fields stripped of surrounding whitespace")


def _check_label_keys(field: str, table: dict, need) -> None:
    """Label keys are matched to a row's label as lower-case text (``label_key``): two keys that read the same
    would silently become one label, and a YAML boolean key is usually an unquoted yes/no/on/off."""
    seen: dict = {}
    for k in table:
        other = seen.setdefault(label_key(k), k)
        need(field, other is k, f"distinct label values, but {other!r} and {k!r} match the same rows "
             "(label values are compared as lower-case text)")
    bools = [k for k in table if isinstance(k, bool)]
    need(field, not bools, f"label values as text, but {bools[0]!r} is a boolean (YAML reads unquoted "
         "yes/no/on/off/true/false as booleans): quote the key, e.g. 'yes'" if bools else "")


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_fewshot(e: dict, need) -> None:
    f = e["fewshot"]
    need("fewshot", isinstance(f, dict) and f.get("from") in FEWSHOT_FROM, f"a mapping with from: {FEWSHOT_FROM}")
    for key in ("prefix", "join"):
        need("fewshot", isinstance(f.get(key, ""), str), f"{key} a string")
    if f["from"] == "inline":
        ex = f.get("examples")
        need(
            "fewshot",
            isinstance(ex, list) and ex and all(isinstance(x, str) for x in ex),
            "examples: a non-empty list of exemplar texts for from: inline",
        )
    else:
        need("fewshot", _pos_int(f.get("k")), "k: a positive number of shots for from: first")
        need("fewshot", isinstance(f.get("template"), str), "template: a format string over a shot row")
        need("fewshot", isinstance(f.get("per", ""), str), "per: the row field grouping the shots (a subtask)")


def _words(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(w, str) and w for w in v)


def read_synonyms(spec: dict, root: Path) -> list[list[str]]:
    """Synonyms per class from a label file of paper 1's data folder (kNN-Prompt's): one class a line, words
    separated by ", ", each scored as " word"; ``trim`` cuts every class to the shortest class's length (as
    eval_fuzzy.py's load_label does). A ``.json`` file maps class names to word lists, read in ``keys`` order."""
    path = root / spec["file"]
    if not path.is_file():
        raise TaskError(f"label file {path} does not exist (tasks.paper_data = {root})")
    try:
        if path.suffix == ".json":
            table = json.loads(path.read_text())
            keys = spec.get("keys") or list(table)
            missing = [k for k in keys if k not in table]
            if missing:
                raise TaskError(f"label file {path} has no classes {missing} (it has {sorted(table)})")
            words = [[" " + str(w) for w in table[k]] for k in keys]
        else:
            lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            words = [[" " + w for w in ln.split(", ")] for ln in lines]
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TaskError(f"label file {path} cannot be read: {err}") from err
    if any(not w or any(not x.strip() for x in w) for w in words):
        raise TaskError(f"label file {path}: a class without words or an empty word")
    if spec.get("trim"):
        n = min(len(w) for w in words)
        words = [w[:n] for w in words]
    return words


def resolve_entry(entry: dict, paper_data: str | None, name: str = "") -> dict:
    """The entry as loaded and scored: a ``paper`` source becomes the local file in ``paper_data`` (config
    ``tasks.paper_data``, a copy of paper 1's ``data/`` folder) and a synonym file becomes its words, so that
    the words are part of the rule's params (editing the file reruns the task)."""
    e = copy.deepcopy(entry)
    needs = e["source"]["type"] == "paper" or isinstance(e.get("synonyms"), dict)
    if not needs:
        return e
    if not paper_data:
        raise TaskError(
            f"task {name!r} reads paper 1's task files: set config key tasks.paper_data to your copy of the paper's "
            "data/ folder (GSYfate/knnlm-limits, data/<task>/...)"
        )
    root = Path(paper_data)
    if e["source"]["type"] == "paper":
        path = root / e["source"]["path"]
        if not path.is_file():
            raise TaskError(f"task {name!r}: {path} does not exist (tasks.paper_data = {root})")
        e["source"] = {**e["source"], "type": "local", "path": str(path)}
    if isinstance(e.get("synonyms"), dict):
        e["synonyms"] = read_synonyms(e["synonyms"], root)
        if len(e["synonyms"]) != len(e["classes"]):
            raise TaskError(
                f"task {name!r}: label file {root / entry['synonyms']['file']} has {len(e['synonyms'])} classes, "
                f"the entry names {len(e['classes'])} ({e['classes']})"
            )
    return e


def label_key(v) -> str:
    """A label value as entries and rows are matched: its lower-case text."""
    return str(v).lower()


# --------------------------------------------------------------------------------------------- text cleaners
def normalize_question(q: str) -> str:
    """Paper 1's QA question form (eval_qa.py / eval_drop.py): a final '?' added if missing, first letter lower."""
    if not q:
        return q
    if not q.endswith("?"):
        q = q + "?"
    return q[0].lower() + q[1:]


def clean_hellaswag(text: str) -> str:
    """Paper 1's HellaSwag preprocessing (eval_pmi.py): strip, ' [title]' -> '. ', drop WikiHow [brackets],
    one pass of '  ' -> ' '."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


CLEANERS = {"question": normalize_question, "hellaswag": clean_hellaswag}


# --------------------------------------------------------------------------------------------- config
def synthetic_tasks() -> list[str]:
    return [n for n, e in _shipped().items() if e["source"]["type"] == "synthetic"]


def default_tasks_config(config: dict) -> dict:
    """The task evaluation when the config has no ``tasks`` section: the synthetic suite, built from the first
    generated corpus that a datastore is built on, evaluated on every datastore built from that corpus.
    Nothing when no datastore is built from a generated corpus (a hub or local corpus needs explicit tasks). Only
    what depends on the config: validating it fills in the schema's defaults (n_items, batch_size, ...)."""
    generated = [
        d for d, spec in config["datastores"].items() if config["corpora"][spec["corpus"]]["source"] == "generate"
    ]
    if not generated:
        return {"evaluate": {}}
    corpus = config["datastores"][generated[0]]["corpus"]
    return {
        "evaluate": {d: synthetic_tasks() for d in generated if config["datastores"][d]["corpus"] == corpus},
        "synthetic": {"corpus": corpus},
    }


def check_config(c: dict) -> None:
    """Task names exist (registry or tasks.custom), datastores exist, the synthetic suite has a generated corpus."""
    if "tasks" not in c:
        return
    t = c["tasks"]
    for name, entry in t.get("custom", {}).items():
        try:
            check_entry(name, entry, where=f"config key tasks.custom.{name}")
        except (TaskError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"config key tasks.custom.{name}: {e}") from e
    reg = registry(t.get("custom"))
    synthetic = False
    for ds, names in t["evaluate"].items():
        if ds not in c["datastores"]:
            raise ConfigError(
                f"config key tasks.evaluate.{ds}: not one of the datastores ({', '.join(c['datastores'])})"
            )
        for i, name in enumerate(names):
            if name not in reg:
                raise ConfigError(
                    f"config key tasks.evaluate.{ds}.{i}: {name!r} is not a task of the registry or tasks.custom"
                )
            synthetic |= reg[name]["source"]["type"] == "synthetic"
            try:
                resolve_entry(reg[name], t.get("paper_data"), name)
            except TaskError as e:
                raise ConfigError(f"config key tasks.evaluate.{ds}.{i}: {e}") from e
    syn = t.get("synthetic")
    if syn is not None:
        corpus = c["corpora"].get(syn["corpus"])
        if corpus is None or corpus["source"] != "generate":
            raise ConfigError(
                f"config key tasks.synthetic.corpus: {syn['corpus']!r} is not a generated corpus "
                f"(generated: {', '.join(n for n, s in c['corpora'].items() if s['source'] == 'generate') or 'none'})"
            )
    elif synthetic:
        raise ConfigError("config key tasks.synthetic: synthetic tasks are evaluated, name the corpus they come from")
