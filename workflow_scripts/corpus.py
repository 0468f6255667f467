"""Corpus stage: every source (``generate``, ``local`` files, ``hf`` datasets) goes through one loading path.

All sources become a ``datasets.DatasetDict`` with splits ``train``/``valid``/``test`` and one ``text``
column, which is checked and written as ``results/corpus/<corpus>/<split>.parquet``.
"""

from __future__ import annotations

import codecs
import json
import logging
import random
import tempfile
from contextlib import nullcontext
from pathlib import Path

import datasets

from . import world as world_mod
from .artifacts import atomic_path, write_json
from .cli import step

SPLITS = ("train", "valid", "test")
LOCAL_BUILDERS = {"text": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}
log = logging.getLogger(__name__)


class CorpusError(ValueError):
    pass


def _check_utf8(path, split: str, chunk: int = 1 << 22) -> None:
    """Refuse a text/JSON corpus file that is not valid UTF-8, naming it and the byte offset.

    ``datasets`` reports such a file as a bare ``DatasetGenerationError`` (text) or fails later, in the
    empty-document filter (jsonl), without naming the file.
    """
    dec = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            pending = len(dec.getstate()[0])
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise CorpusError(
                    f"corpus file {path} (split {split!r}) is not valid UTF-8: byte {offset - pending + e.start} "
                    f"is {e.object[e.start:e.start + 1]!r} ({e.reason})"
                ) from e
            if not block:
                return
            offset += len(block)


def _check_jsonl(path, split: str, field: str) -> None:
    """Refuse a jsonl corpus file whose lines ``datasets`` would fail on with a long traceback, or read wrongly,
    naming the file, the line and the field: a line that is not a JSON object, a text field holding a number,
    boolean, list or object (``datasets`` turns these into a cast error, an ``AttributeError`` in the empty-document
    filter, or, when another split holds text, silently into their JSON text), and a field no row has. A row
    without the field, or with null, is an empty document (skipped with a warning)."""
    rows = with_field = 0
    fields: set = set()
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"corpus file {path} (split {split!r}) line {n} is not valid JSON ({e})") from e
            where = f"corpus file {path} (split {split!r}) line {n}"
            if not isinstance(row, dict):
                raise CorpusError(f"{where} is a {type(row).__name__}, not a JSON object")
            rows += 1
            if len(fields) < 50:
                fields.update(row)
            value = row.get(field)
            if value is not None and not isinstance(value, str):
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:57] + "..."
                raise CorpusError(f"{where}: field {field!r} holds {type(value).__name__} {shown}, not text")
            with_field += field in row
    if rows and not with_field:
        raise CorpusError(
            f"corpus file {path} (split {split!r}) has no field {field!r} in any of its {rows} rows "
            f"(fields: {sorted(fields)}); set text_field to the field holding the text"
        )


def _check_parquet(path, split: str, field: str) -> None:
    """Refuse a parquet corpus file whose text column is not text, naming the file (``datasets`` fails casting it
    to the other splits' type, naming neither)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise CorpusError(f"corpus file {path} (split {split!r}) is not a readable parquet file ({e})") from e
    if field in schema.names:
        t = schema.field(field).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise CorpusError(f"corpus file {path} (split {split!r}): column {field!r} holds {t} values, not text")


def _generate(spec: dict, seed: int) -> tuple[datasets.DatasetDict, dict]:
    g = spec["generate"]
    w = world_mod.make_world(seed, g["n_people"], g["n_cities"], g["n_companies"], g["n_universities"])
    docs = world_mod.generate_documents(seed, g["n_documents"], w)
    rng = random.Random(seed + 2)
    rng.shuffle(docs)
    n_eval = {s: int(round(g["eval_fraction"] * len(docs))) for s in ("valid", "test")}
    parts = {
        "valid": docs[: n_eval["valid"]],
        "test": docs[n_eval["valid"] : n_eval["valid"] + n_eval["test"]],
        "train": docs[n_eval["valid"] + n_eval["test"] :],
    }
    return datasets.DatasetDict(
        {s: datasets.Dataset.from_dict({"text": parts[s]}) for s in SPLITS}
    ), w.to_dict()


def _local(spec: dict, cache_dir=None) -> datasets.DatasetDict:
    """A local corpus's files through the ``datasets`` builder of their format, which writes them as Arrow files:
    into ``cache_dir`` (a directory the caller removes), or without one into a temporary directory removed
    before returning, the splits copied into memory. Never into the user's Hugging Face cache."""
    loc = spec["local"]
    fmt = loc["format"]
    files = {}
    for split in SPLITS:
        paths = loc["files"][split]
        paths = [paths] if isinstance(paths, str) else list(paths)
        for p in paths:
            if not Path(p).is_file():
                raise CorpusError(f"corpus file {p} (split {split!r}) does not exist")
            if Path(p).stat().st_size == 0:
                raise CorpusError(f"corpus file {p} (split {split!r}) is empty")
            if fmt != "parquet":
                _check_utf8(p, split)
            if fmt == "jsonl":
                _check_jsonl(p, split, loc.get("text_field", "text"))
            if fmt == "parquet":
                _check_parquet(p, split, loc.get("text_field", "text"))
        files[split] = paths
    try:
        with tempfile.TemporaryDirectory(prefix="datasets-") if cache_dir is None else nullcontext(cache_dir) as d:
            return datasets.load_dataset(LOCAL_BUILDERS[fmt], data_files=files, cache_dir=str(d),
                                         keep_in_memory=cache_dir is None)
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus files {files}: not valid UTF-8 ({e})") from e
    except datasets.exceptions.DatasetGenerationError as e:  # its message names neither the file nor the cause
        cause = " ".join(str(e.__cause__ or e).split())
        raise CorpusError(f"corpus files {files} (format {fmt}) cannot be read: {cause[:500]}") from e


def _hf(spec: dict) -> datasets.DatasetDict:
    hf = spec["hf"]
    path = hf["path"]
    if Path(path).joinpath("dataset_dict.json").exists():
        dd = datasets.load_from_disk(path)
    else:
        dd = datasets.load_dataset(path, hf.get("name"), revision=hf.get("revision"))
    mapping = hf.get("splits", {s: s for s in SPLITS})
    missing = [theirs for theirs in mapping.values() if theirs not in dd]
    if missing:
        raise CorpusError(f"dataset {path!r} has splits {sorted(dd)}, config asks for {missing}")
    return datasets.DatasetDict({ours: dd[theirs] for ours, theirs in mapping.items()})


def load_corpus(spec: dict, seed: int, cache_dir=None) -> tuple[datasets.DatasetDict, dict | None]:
    """Load a corpus entry of the config into splits with a ``text`` column. Returns (splits, world or None).
    ``cache_dir``: where a local corpus's Arrow files go (a directory the caller removes; without it, in memory)."""
    source = spec["source"]
    world = None
    if source == "generate":
        dd, world = _generate(spec, seed)
    elif source == "local":
        dd = _local(spec, cache_dir)
    elif source == "hf":
        dd = _hf(spec)
    else:
        raise CorpusError(f"unknown corpus source {source!r}")
    field = spec.get(source, {}).get("text_field", "text")
    out = {}
    for split in SPLITS:
        if split not in dd:
            raise CorpusError(f"corpus has no {split!r} split (has {sorted(dd)})")
        ds = dd[split]
        if field not in ds.column_names:
            raise CorpusError(f"{split} split has no text field {field!r} (columns: {ds.column_names})")
        feature = ds.features[field]
        dtype = getattr(feature, "dtype", type(feature).__name__)
        if dtype not in ("string", "large_string", "null"):
            raise CorpusError(f"{split} split: text field {field!r} holds {dtype} values, not text")
        ds = (
            ds.select_columns([field]).rename_column(field, "text")
            if field != "text"
            else ds.select_columns(["text"])
        )
        n = len(ds)
        # in memory: only the indices of the kept rows (a cached dataset's filter would write them beside its files)
        ds = ds.filter(lambda t: t is not None and t.strip() != "", input_columns="text", keep_in_memory=True)
        if n - len(ds):
            log.warning("%s split: skipped %d empty documents of %d", split, n - len(ds), n)
        if len(ds) == 0:
            raise CorpusError(f"{split} split has no non-empty documents")
        out[split] = ds
    return datasets.DatasetDict(out), world


def write_corpus(spec: dict, seed: int, splits: dict, world_json) -> None:
    """Write each split's documents to ``splits[split]`` (parquet) and the generated world (or {})."""
    out = Path(splits["train"]).resolve().parent
    beside = next(d for d in (out, *out.parents) if d.is_dir())  # creates no folder for a corpus that fails
    with tempfile.TemporaryDirectory(prefix=".datasets-", dir=beside) as cache:  # Arrow files of a local corpus
        dd, world = load_corpus(spec, seed, cache)
        for split, ds in dd.items():
            with atomic_path(splits[split]) as tmp:
                ds.to_parquet(str(tmp))
            log.info("%s: %d documents", split, len(ds))
        del dd
    write_json(world_json, world or {})


@step
def corpus(params: dict, train: Path, valid: Path, test: Path, world: Path) -> None:
    """Generate a corpus, or load local files or a Hugging Face dataset, into train/valid/test parquet files."""
    write_corpus(params["spec"], params["seed"], {"train": train, "valid": valid, "test": test}, world)
