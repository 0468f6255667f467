"""Task items (paper 1's downstream evaluation): a registry entry applied to its dataset's rows.

Every source (``hf``, ``local``, ``synthetic``) is read through ``datasets`` and turned, by the entry alone
(``registry.py``), into items of one form:

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

import json
import logging
import string
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

from ..artifacts import atomic_path
from ..cli import step
from .registry import CLEANERS, TaskError, label_key

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
log = logging.getLogger(__name__)


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
        labels = {label_key(k): (str(k), v) for k, v in e["labels"].items()}
        key = label_key(value)
        if key not in labels:
            raise TaskError(f"label {key!r} not in the verbalizer's labels {sorted(labels)}")
        return [n for n, _ in labels.values()], [w for _, w in labels.values()], list(labels).index(key)
    if isinstance(e["synonyms"], dict):
        raise TaskError(f"synonyms {e['synonyms']} not read: the entry must go through resolve_entry")
    names, n = [str(c) for c in e["classes"]], len(e["classes"])
    if e.get("label_map") is not None:
        table = {label_key(k): v for k, v in e["label_map"].items()}
        key = label_key(value)
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
