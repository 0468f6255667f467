"""The task cache's file format: an uncompressed .npz written part by part with fixed member times (``save_npz``,
``Part``), the join of parts scored apart (blocks of a task, chunks of blocks: ``join_parts``, ``merge_chunks``)
and its record (``write_task_cache``). Scoring (``scoring.py``) fills it; the task sweep (``rescoring.py``) reads
it."""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path

import numpy as np

from .. import memory
from ..artifacts import ArtifactError, atomic_path, read_json, sha256_file, write_json
from .items import read_items

log = logging.getLogger(__name__)

CHUNK_KEY = "the items per job (raise tasks.chunks)"


def mode(entry: dict) -> str:
    """How a task is scored: ``last_token`` (paper 1's memory tasks), ``pairs`` (teacher-forced (context,
    continuation) pairs) or ``generate``."""
    if entry.get("protocol") == "last_token":
        return "last_token"
    return "pairs" if entry["kind"] in ("classify", "choice") else "generate"


def chunk_items(n: int, p: dict, chunk: tuple[int, int] | None) -> tuple[int, int]:
    """The items [a, b) of chunk (i, n) of a task, cut on whole blocks (``memory.task_block``); all without one."""
    if chunk is None:
        return 0, n
    return memory.chunk_bounds(n, chunk[1], memory.task_block(p))[chunk[0]]


def save_npz(path, arrays: dict) -> str:
    """``arrays`` as an uncompressed .npz (what ``np.savez`` writes), written atomically with fixed member
    timestamps, so that the file is a function of its arrays. A value is an array or a list of parts (``Part``):
    the member is written one part at a time, never joined in memory. Returns the file's sha256."""
    with atomic_path(path, ".npz") as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, value in arrays.items():
                parts = value if isinstance(value, list) else [Part.of(np.asarray(value))]
                shape = (sum(pt.shape[0] for pt in parts), *parts[0].shape[1:])
                dtype = parts[0].dtype
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                with zf.open(info, "w", force_zip64=True) as f:
                    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
                    np.lib.format.write_array_header_1_0(f, header)
                    for pt in parts:
                        arr = np.ascontiguousarray(pt.load())
                        if arr.shape != pt.shape or arr.dtype != dtype:
                            raise ArtifactError(f"{path}: part of {name} is {arr.dtype} {arr.shape}, "
                                                f"expected {dtype} {pt.shape}")
                        f.write(arr.reshape(-1).view(np.uint8))
        return sha256_file(tmp)


class Part:
    """Rows of an array that ``save_npz`` writes part by part: their shape and dtype, and ``load()`` to read them
    (an array in memory, or a member of a chunk's .npz read when its turn comes), shifted by ``offset``."""

    def __init__(self, load, shape, dtype, offset: int = 0):
        self._load, self.shape, self.dtype, self.offset = load, tuple(shape), np.dtype(dtype), int(offset)

    @classmethod
    def of(cls, arr: np.ndarray, offset: int = 0):
        return cls(lambda: arr, arr.shape, arr.dtype, offset)

    @classmethod
    def member(cls, npz, name: str, offset: int = 0):
        """A member of an open .npz (``np.load``), its shape and dtype read off its header."""
        with npz.zip.open(f"{name}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        return cls(lambda: npz[name], shape, dtype, offset)

    def load(self) -> np.ndarray:
        arr = self._load()
        return arr + self.offset if self.offset else arr


def _part(cache, name: str, offset: int = 0) -> Part:
    return Part.of(cache[name], offset) if isinstance(cache, dict) else Part.member(cache, name, offset)


def join_parts(entry: dict, parts: list[tuple]) -> tuple[dict, dict]:
    """One (cache, record) from parts scored apart, in item order (blocks of a task, or chunks of blocks; a part's
    cache is a dict of arrays or an open .npz): each part's pair ids and query rows shifted past the parts before
    it, its arrays listed as parts of the joined ones (``save_npz`` writes them one at a time). Associative, so
    joining chunks that each joined their blocks gives what joining all the blocks gives, byte for byte."""
    kept = [pt for pt in parts if pt[1]["meta"]["n_items"]] or parts[:1]
    how = mode(entry)
    metas = [r["meta"] for _, r in kept]
    meta = {"n_items": sum(m["n_items"] for m in metas)}
    record: dict = {}
    if how == "generate":
        points = [r["points"] for _, r in kept]
        at = [[(pt["lambda"], pt["k"], pt["sigma"]) for pt in pts] for pts in points]
        if any(x != at[0] for x in at):
            raise ValueError(f"parts decoded at different points cannot be joined: {at}")
        record["points"] = [
            {**{k: pts[0][k] for k in ("lambda", "k", "sigma")},
             "texts": [t for pt in pts for t in pt["texts"]],
             "neighbours": [x for pt in pts for x in pt["neighbours"]]}
            for pts in zip(*points, strict=True)
        ]
        return {"generated_points": np.asarray([len(record["points"])])}, {"meta": meta, **record}
    rows = [int(x) for x in np.cumsum([0] + [m["n_queries"] for m in metas])]
    meta["n_queries"] = rows[-1]
    names = ["q_dists", "q_vals", "q_ids", "q_keys"]
    if how == "last_token":
        slots, classes = kept[0][0]["slot_ids"], kept[0][1]["classes"]
        for c, r in kept[1:]:
            if r["classes"] != classes or not np.array_equal(c["slot_ids"], slots):
                raise ValueError("parts scored with different synonym slots cannot be joined")
        cache = {k: [_part(c, k) for c, _ in kept] for k in ["q_lm", *names]}
        cache["slot_ids"] = np.asarray(slots)
        record["items"] = [
            {**it, "q": it["q"] + off, "dq": it["dq"] + off if it["dq"] >= 0 else -1}
            for (_, r), off in zip(kept, rows, strict=False) for it in r["items"]
        ]
        record["classes"] = classes
        meta |= {"protocol": "last_token", "n_slots": metas[0]["n_slots"]}
        return cache, {"meta": meta, **record}
    pairs = [int(x) for x in np.cumsum([0] + [m["n_pairs"] for m in metas])]
    cache = {
        "t_pair": [_part(c, "t_pair", off) for (c, _), off in zip(kept, pairs, strict=False)],
        "t_row": [_part(c, "t_row", off) for (c, _), off in zip(kept, rows, strict=False)],
    }
    cache |= {k: [_part(c, k) for c, _ in kept] for k in ["t_target", "t_lm", *names, "pair_len"]}

    def shift(options, off):
        return None if options is None else [[int(i) + off for i in opt] for opt in options]

    record["items"] = [
        {"options": shift(it["options"], off), "domain": shift(it["domain"], off), "gold": it["gold"]}
        for (_, r), off in zip(kept, pairs, strict=False) for it in r["items"]
    ]
    meta |= {"n_pairs": pairs[-1], "n_tokens": sum(m["n_tokens"] for m in metas)}
    return cache, {"meta": meta, **record}


def write_task_cache(out_npz, out_json, cache: dict, record: dict, seconds: float) -> dict:
    """The task's npz, then its record with the npz's sha256 (task_sweep refuses an npz altered since)."""
    meta = record["meta"]
    meta["seconds"] = round(seconds, 2)
    meta["npz_sha256"] = save_npz(out_npz, cache)
    write_json(out_json, record)
    log.info("scored %s (%d items) in %.1fs", meta["task"], meta["n_items"], seconds)
    return meta


SAME = ("task", "kind", "K", "manifest_sha256", "items_sha256")  # every chunk's alike


def merge_chunks(chunk_jsons: list, items_parquet, p: dict, out_npz, out_json, manifest_json=None,
                 index_meta=None) -> dict:
    """Join the chunks' caches (each npz checked against the sha256 its record holds) into the cache one job
    writes, one array of one chunk at a time. The chunks must be the n chunks of this task, in order, scored alike.
    With the manifest and the index's record, first check the memory the join holds (one array of its largest
    chunk, read and shifted)."""
    t0 = time.time()
    items = read_items(items_parquet)
    n = len(items)
    parts, records = [], []
    for i, f in enumerate(chunk_jsons):
        record = read_json(f)
        npz = Path(f).with_suffix(".npz")
        got = record["meta"].get("chunk") or {}
        a, b = chunk_items(n, p, (i, len(chunk_jsons)))
        want = {"index": i, "of": len(chunk_jsons), "start": a, "end": b, "items": n}
        first = records[0]["meta"] if records else record["meta"]
        if got != want or any(record["meta"][k] != first[k] for k in SAME) or record["meta"]["task"] != p["task"]:
            raise ArtifactError(
                f"{f}: chunk {got or 'record missing'}, expected {want} of task {p['task']} built like "
                f"{chunk_jsons[0]} ({', '.join(SAME)}); the chunk belongs to another task, config or datastore: "
                f"rerun score_task_chunk (snakemake --forcerun {f})"
            )
        if sha256_file(npz) != record["meta"]["npz_sha256"]:
            raise ArtifactError(
                f"{npz}: sha256 differs from the one recorded in {f} when it was written; rerun score_task_chunk "
                f"(snakemake --forcerun {f})"
            )
        parts.append((np.load(npz, allow_pickle=False), record))  # members read one at a time by save_npz
        records.append(record)
    try:
        if manifest_json is not None:  # the rows of the largest chunk, as its record counts them
            exact = read_json(index_meta)["exact"] if index_meta is not None else True
            rows = max(r["meta"].get("n_tokens", r["meta"].get("n_queries", 0)) for r in records)
            memory.check("score_task", read_json(manifest_json), {"type": "Flat" if exact else "IVFPQ"}, CHUNK_KEY,
                         p["k_max"], rows, {"model": False})
        cache, record = join_parts(p["entry"], parts)
        first = records[0]["meta"]
        meta = {k: first[k] for k in SAME} | record.pop("meta") | {"chunks": len(records)}
        seconds = sum(r["meta"]["seconds"] for r in records) + time.time() - t0
        return write_task_cache(out_npz, out_json, cache, {"meta": meta, **record}, seconds)
    finally:
        for z, _ in parts:
            z.close()
