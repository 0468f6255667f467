"""Task registry and loading (paper 1's downstream evaluation): every task is a declarative entry, not code.

The entries live in ``registry.yaml`` beside this module (the twenty paper tasks and the offline synthetic
suite); a config can add its own under ``tasks.custom`` (e.g. a local jsonl file). Every source (``hf``,
``local``, ``synthetic``) is read through ``datasets`` and turned, by the entry alone, into items of one form:

* classify / choice: ``options`` — per answer option a list of (context, continuation) pairs (a fuzzy
  verbalizer has several; a choice one), ``domain`` — the same under the domain premise (for PMI), ``gold``.
* generate: ``context`` and ``answers`` (a list of acceptable strings).

Reasoning entries can also carry few-shot exemplars (``fewshot``: inline texts, or the first k rows of the dataset
or of each subtask, which are then not scored), named text cleaners (``clean``), rows to leave out (``exclude``)
and a macro average over subtasks (``group`` + ``aggregate: macro``); each mirrors paper 1's evaluation code.

Items are written as ``results/task_data/<task>.parquet`` (columns ``id, question, answer, item`` with ``item``
the JSON of the item), so scoring never looks at a dataset's own column layout.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
import string
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from ..artifacts import atomic_path
from ..cli import step
from ..config import ConfigError

REGISTRY_PATH = Path(__file__).with_name("registry.yaml")
KINDS = ("classify", "choice", "generate")
CATEGORIES = ("memory", "reasoning")
METRICS = {
    "classify": ("accuracy",),
    "choice": ("accuracy", "accuracy_norm"),
    "generate": ("em", "f1", "number", "f1_qa", "f1_drop", "gsm8k", "prefix"),
}
EXTRACTS = ("none", "gsm8k", "gsm8k_raw")
FEWSHOT_FROM = ("inline", "first")
AGGREGATES = ("mean", "macro")
SOURCE_TYPES = ("hf", "local", "synthetic", "paper")
PROTOCOLS = ("continuation", "last_token")
GENERATORS = ("recall", "occupation", "twohop", "arithmetic")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
log = logging.getLogger(__name__)


class TaskError(ValueError):
    pass


# --------------------------------------------------------------------------------------------- registry
@functools.cache
def _shipped() -> dict:
    return yaml.safe_load(REGISTRY_PATH.read_text())


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
    """Label keys are matched to a row's label as lower-case text (``_label_key``): two keys that read the same
    would silently become one label, and a YAML boolean key is usually an unquoted yes/no/on/off."""
    seen: dict = {}
    for k in table:
        other = seen.setdefault(_label_key(k), k)
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


# --------------------------------------------------------------------------------------------- loading
def get_path(row: dict, path: str, allow_null: bool = False):
    """``row['a']['b']`` for ``'a.b'``. A null value is refused unless ``allow_null``: a jsonl file read by
    ``datasets`` gives a key that a row lacks (but others have) as None, which would be scored as "None"."""
    obj = row
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise TaskError(f"row has no field {path!r} (fields: {sorted(row)})")
        obj = obj[part]
    if obj is None and not allow_null:
        raise TaskError(f"field {path!r} is missing (null) in this row")
    return obj


def _no_nulls(path: str, values: list) -> list:
    if any(v is None for v in values):
        raise TaskError(f"field {path!r} has a missing (null) element: {values!r}")
    return values


class _Formatter(string.Formatter):
    """``str.format`` that refuses a field the row lacks or holds as null (a jsonl row missing a key)."""

    def get_value(self, key, args, kwargs):
        if key not in kwargs:
            raise TaskError(f"prompt names field {{{key}}}, row has {sorted(kwargs)}")
        return kwargs[key]

    def get_field(self, field_name, args, kwargs):
        obj, first = super().get_field(field_name, args, kwargs)
        if obj is None:
            raise TaskError(f"field {field_name!r} is missing (null) in this row")
        return obj, first


_FORMATTER = _Formatter()


def fill(template: str, row: dict, **extra) -> str:
    return _FORMATTER.vformat(template, (), {**row, **extra})


def load_rows(source: dict, data_files: str | None = None):
    """A ``datasets.Dataset`` for a source entry. ``data_files`` (a local file in the dataset's own column
    layout) replaces a hub download: the same path downstream, used by the offline tests."""
    import datasets

    if data_files is None and source["type"] == "paper":
        raise TaskError(f"source {source} not resolved: the entry must go through resolve_entry")
    if data_files is not None or source["type"] in ("local", "synthetic"):
        path = Path(data_files or source["path"])
        if not path.is_file():
            raise TaskError(f"task data file {path} does not exist")
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise TaskError(f"{path}: unknown task file type (use one of {sorted(LOCAL_BUILDERS)})")
        with tempfile.TemporaryDirectory(prefix="datasets-") as d:  # in memory: never in the user's HF cache
            return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", cache_dir=d,
                                         keep_in_memory=True)
    path = source["path"]
    if Path(path).joinpath("dataset_dict.json").exists():
        return datasets.load_from_disk(path)[source.get("split", "test")]
    names = source.get("name")
    parts = []
    for name in names if isinstance(names, list) else [names]:
        ds = datasets.load_dataset(path, name, split=source.get("split", "test"), revision=source.get("revision"))
        if isinstance(names, list):
            ds = ds.add_column("subset", [name] * len(ds))
        parts.append(ds)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _label_key(v) -> str:
    return str(v).lower()


def _gold_index(e: dict, row: dict, n: int) -> int:
    g = e["gold"]
    v = get_path(row, g["field"])
    if g["type"] == "index":
        i = int(v)
    elif g["type"] == "index1":
        i = int(v) - 1
    elif g["type"] == "letter":
        i = string.ascii_uppercase.index(str(v).strip().upper())
    else:
        labels = [str(x) for x in get_path(row, g["match_field"])]
        if str(v) not in labels:
            raise TaskError(f"gold {v!r} not among {labels}")
        i = labels.index(str(v))
    if not 0 <= i < n:
        raise TaskError(f"gold index {i} outside {n} choices")
    return i


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K solution (after ``####``), without thousands separators."""
    if "####" not in answer:
        raise TaskError(f"GSM8K answer has no '####': {answer[-60:]!r}")
    return answer.split("####")[-1].strip().replace(",", "").rstrip(".")


def gsm8k_raw(answer: str) -> str:
    """The text after ``####`` of a GSM8K solution as written (``1,200`` keeps its comma: metric ``gsm8k``
    reads it as paper 1's check does)."""
    if "####" not in answer:
        raise TaskError(f"GSM8K answer has no '####': {answer[-60:]!r}")
    return answer.split("####")[-1].strip()


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


def _cleaned(e: dict, row: dict) -> dict:
    fields = e.get("clean", {}).get("fields", {})
    if not fields:
        return row
    row = dict(row)
    for f, name in fields.items():
        row[f] = CLEANERS[name](str(get_path(row, f)))
    return row


def build_context(e: dict, row: dict, shots: list[dict] | None = None) -> str:
    """The prompt of a row: ``fewshot.prefix`` + the shots, each followed by ``fewshot.join``, + the entry's prompt
    (``clean.prompt`` applied to the filled prompt). Inline shots are the entry's exemplar texts; ``first`` shots
    are ``shots`` (dataset rows) through ``fewshot.template``."""
    body = fill(e["prompt"], row)
    if e.get("clean", {}).get("prompt"):
        body = CLEANERS[e["clean"]["prompt"]](body)
    f = e.get("fewshot")
    if not f:
        return body
    if f["from"] == "inline":
        texts = list(f["examples"])
    else:
        texts = [fill(f["template"], _cleaned(e, s)) for s in shots or []]
    join = f.get("join", "")
    return f.get("prefix", "") + "".join(t + join for t in texts) + body


def _classes(e: dict, row: dict) -> tuple[list[str], list[list[str]], int | None]:
    """(class names, words per class, the row's class index or None when the entry drops the row)."""
    value = get_path(row, e["label_field"])
    if "synonyms" not in e:  # {label value: words}
        labels = {_label_key(k): (str(k), v) for k, v in e["labels"].items()}
        key = _label_key(value)
        if key not in labels:
            raise TaskError(f"label {key!r} not in the verbalizer's labels {sorted(labels)}")
        return [n for n, _ in labels.values()], [w for _, w in labels.values()], list(labels).index(key)
    if isinstance(e["synonyms"], dict):
        raise TaskError(f"synonyms {e['synonyms']} not read: the entry must go through resolve_entry")
    names, n = [str(c) for c in e["classes"]], len(e["classes"])
    if e.get("label_map") is not None:
        table = {_label_key(k): v for k, v in e["label_map"].items()}
        key = _label_key(value)
        if key not in table:
            raise TaskError(f"label {value!r} of field {e['label_field']!r} not in label_map {sorted(table)}")
        return names, e["synonyms"], table[key]
    try:
        gold = int(value)
    except (TypeError, ValueError):
        gold = -1
    if not 0 <= gold < n:
        raise TaskError(f"label {value!r} of field {e['label_field']!r} is not a class index 0..{n - 1}")
    return names, e["synonyms"], gold


def make_item(e: dict, row: dict, idx: int, shots: list[dict] | None = None) -> dict | None:
    """One row of a dataset -> one item, by the entry alone (``shots``: the rows of a ``fewshot: first`` entry;
    None: a row the entry drops, e.g. SST-5's neutral)."""
    if e.get("strip"):
        row = {**row, **{f: str(get_path(row, f)).strip() for f in e["strip"]}}
    row = _cleaned(e, row)
    context = build_context(e, row, shots)
    domain = fill(e["domain"], row) if e.get("pmi") else None
    item = {"id": str(row.get("id", idx)), "kind": e["kind"], "question": context}
    if e.get("group"):
        item["group"] = str(get_path(row, e["group"]))
    if e["kind"] == "classify":
        names, words, gold = _classes(e, row)
        if gold is None:
            return None
        item.update(gold=gold, labels=names, answer=names[gold])
        if e.get("protocol") == "last_token":  # the synonyms live in the entry; one query per premise
            item.update(premise=context, domain_premise=domain)
        else:
            item.update(
                options=[[[context, w] for w in ws] for ws in words],
                domain=[[[domain, w] for w in ws] for ws in words] if domain is not None else None,
            )
    elif e["kind"] == "choice":
        ch = e["choices"]
        if "fields" in ch:
            choices = [str(get_path(row, f)) for f in ch["fields"]]
        else:
            choices = [str(c) for c in _no_nulls(ch["field"], list(get_path(row, ch["field"])))]
        if len(choices) < 2:
            field = ch.get("field", ch.get("fields"))
            raise TaskError(f"field {field!r} has {len(choices)} choice(s) {choices}: a choice item needs at least "
                            "two (with one, it always scores 1.0)")
        if e.get("clean", {}).get("choices"):
            choices = [CLEANERS[e["clean"]["choices"]](c) for c in choices]
        gold = _gold_index(e, row, len(choices))
        if e.get("blank"):  # Winogrande (eval_winogrande.py): sentence up to the blank + the choice; score the rest
            text = context
            if e["blank"] not in text:
                raise TaskError(f"prompt {text!r} has no blank {e['blank']!r}")
            head, tail = text.split(e["blank"], 1)
            options = [[[head + c, " " + tail.strip()]] for c in choices]
            dom = [[[domain or "", " " + tail.strip()]] for _ in choices] if domain is not None else None
        else:
            cont = e.get("continuation", " {choice}")
            options = [[[context, fill(cont, row, choice=c)]] for c in choices]
            dom = [[[domain, fill(cont, row, choice=c)]] for c in choices] if domain is not None else None
        item.update(options=options, domain=dom, gold=gold, labels=choices, answer=choices[gold])
    else:
        ans = get_path(row, e["answers"]["field"])
        answers = [str(a) for a in _no_nulls(e["answers"]["field"], ans)] if isinstance(ans, list) else [str(ans)]
        if not answers:
            raise TaskError(f"field {e['answers']['field']!r} has no answers")
        extract = e["answers"].get("extract", "none")
        if extract == "gsm8k":
            answers = [gsm8k_gold(a) for a in answers]
        elif extract == "gsm8k_raw":
            answers = [gsm8k_raw(a) for a in answers]
        item.update(context=context, answers=answers, answer=" | ".join(answers))
    return item


def _excluded(e: dict, row: dict) -> bool:
    x = e.get("exclude")
    if not x:
        return False
    v = get_path(row, x["field"], allow_null=True)
    return any(a in x["values"] for a in (v if isinstance(v, list) else [v]))


def _group_of(row: dict, per: str | None):
    return str(get_path(row, per)) if per else None


def split_shots(e: dict, rows: list[dict]) -> tuple[dict, list[int]]:
    """For a ``fewshot: first`` entry: the first ``k`` rows of each ``per`` group (of all rows without ``per``) are
    the group's shots and are not scored. Returns ({group: shot rows}, indices of the rows left to score)."""
    f = e.get("fewshot") or {}
    if f.get("from") != "first":
        return {}, list(range(len(rows)))
    per, k = f.get("per"), f["k"]
    shots: dict = {}
    scored: dict = {}
    keep = []
    for i, r in enumerate(rows):
        g = _group_of(r, per)
        if len(shots.setdefault(g, [])) < k:
            shots[g].append(r)
        else:
            keep.append(i)
            scored[g] = scored.get(g, 0) + 1
    short = [g for g in shots if not scored.get(g)]
    if short:
        raise TaskError(f"fewshot: group(s) {short} have no row left to score after their {k} shots")
    return shots, keep


def load_items(
    entry: dict, max_items: int | None = None, seed: int = 0, data_files: str | None = None, name: str | None = None
) -> list:
    """Items of a task. The entry's ``sample`` is the paper's draw (numpy's legacy generator, as eval_fuzzy.py's
    ``np.random.seed(s); np.random.choice(n, size, replace=False)``); ``max_items`` then draws a seeded subsample
    (kept in dataset order) of the rows left after ``exclude``, the shots of a ``fewshot: first`` entry and the
    rows the entry drops. ``name``: the task, named in errors."""
    task = f"task {name!r}: " if name else ""
    ds = load_rows(entry["source"], data_files)
    n = len(ds)
    if n == 0:
        raise TaskError(f"task source {entry['source']} has no rows")
    idx = np.arange(n)
    if entry.get("sample"):
        size = min(n, int(entry["sample"]["n"]))
        idx = np.sort(np.random.RandomState(int(entry["sample"]["seed"])).choice(n, size, replace=False))
    if entry.get("exclude") or (entry.get("fewshot") or {}).get("from") == "first":
        rows = {int(i): ds[int(i)] for i in idx}
        kept = [int(i) for i in idx if not _excluded(entry, rows[int(i)])]
        shots, keep = split_shots(entry, [rows[i] for i in kept])
        idx = np.asarray([kept[j] for j in keep], dtype=np.int64)
    else:
        rows, shots = None, {}
    per = (entry.get("fewshot") or {}).get("per")
    items = []
    for i in idx:
        row = rows[int(i)] if rows is not None else ds[int(i)]
        try:
            it = make_item(entry, row, int(i), shots.get(_group_of(row, per)) if shots else None)
        except TaskError as err:
            where = data_files or entry["source"].get("path")
            raise TaskError(f"{task}row {int(i)} of {where}: {err}") from err
        if it is not None:
            items.append(it)
    if not items:
        raise TaskError(f"task source {entry['source']} has no rows the entry keeps")
    if max_items is not None and len(items) > max_items:
        keep = np.sort(np.random.default_rng(seed).choice(len(items), size=max_items, replace=False))
        items = [items[int(i)] for i in keep]
    return items


def write_items(items: list, out) -> None:
    df = pl.DataFrame(
        {
            "id": [it["id"] for it in items],
            "question": [it["question"] for it in items],
            "answer": [it["answer"] for it in items],
            "item": [json.dumps(it, sort_keys=True) for it in items],
        },
        schema={"id": pl.Utf8, "question": pl.Utf8, "answer": pl.Utf8, "item": pl.Utf8},
    )
    with atomic_path(out, ".parquet") as tmp:
        df.write_parquet(tmp)


def read_items(path) -> list:
    return [json.loads(s) for s in pl.read_parquet(path)["item"].to_list()]


@step
def load_task(params: dict, out: Path, source: Path | None = None) -> int:
    """A task's items (the registry entry applied to its dataset rows) from the hub, or from --source: the
    local file (or suite file) the entry names. Errors name the task (--out is results/task_data/<task>.parquet)."""
    items = load_items(
        params["entry"], params.get("max_items"), params["seed"], str(source) if source else None, out.stem
    )
    write_items(items, out)
    log.info("%d items", len(items))
    return len(items)


# --------------------------------------------------------------------------------------------- metrics
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
