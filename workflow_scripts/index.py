"""Index stage: a FAISS index over a datastore's keys, trained on a key sample and filled shard by shard.

``Flat`` is exact; ``IVFPQ`` (nlist, m, nbits, nprobe) is approximate, and retrieval then recomputes exact
distances from the stored keys. Where FAISS sees GPUs, the coarse quantizer's k-means trains on them
(``devices.training_on_gpus``); a search moves the index to them (``devices.search_index``, called by retrieval).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from . import devices, memory
from .artifacts import ArtifactError, atomic_path, load_npy, read_json, sha256_file, write_json
from .cli import step
from .datastore import Datastore

log = logging.getLogger(__name__)


def factory_string(cfg: dict, dim: int) -> str:
    if cfg["type"] == "Flat":
        return "Flat"
    if dim % cfg["m"]:
        raise ValueError(f"index.m = {cfg['m']} must divide the key dimension {dim}")
    return f"IVF{cfg['nlist']},PQ{cfg['m']}x{cfg['nbits']}"


def new_index(cfg: dict, dim: int):
    """An empty index of the config's type. IVFPQ: polysemous training only when ``index.polysemous`` asks for it
    (it reorders the PQ centroids for Hamming-filtered search, which retrieval never uses, and is most of the
    training time)."""
    index = faiss.index_factory(dim, factory_string(cfg, dim), faiss.METRIC_L2)
    if cfg["type"] != "Flat":
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = bool(cfg.get("polysemous", False))
    return index


def train_in_place(index, ds: Datastore, cfg: dict, seed: int):
    """``index`` trained, when it needs training, on a seeded sample of ``cfg['train_sample']`` keys drawn across
    all shards (on the GPUs when they answer); returns the trained index."""
    if index.is_trained:
        return index
    desc = factory_string(cfg, ds.dim)
    n = min(ds.rows, cfg["train_sample"])
    centroids = max(cfg["nlist"], 2 ** cfg["nbits"])
    if n < centroids:  # FAISS's k-means would stop on an assertion
        raise ValueError(
            f"{ds.path}: {n} keys to train {desc} (datastore of {ds.rows} keys, index.train_sample = "
            f"{cfg['train_sample']}), fewer than its {centroids} centroids (index.nlist = {cfg['nlist']}, 2^index.nbits"
            f" = {2 ** cfg['nbits']}); lower index.nlist / index.nbits to at most the keys, or use index.type Flat"
        )
    if n < cfg["nlist"] * 39 and n < ds.rows:
        log.warning("training %s on %d keys (< 39 per list)", desc, n)
    sample_ids = np.sort(np.random.default_rng(seed).choice(ds.rows, size=n, replace=False))
    sample = ds.gather_keys(sample_ids)
    with devices.training_on_gpus(index) as on_gpus:
        log.info("training %s on %d keys%s", desc, n, " (k-means on the GPUs)" if on_gpus else "")
        index.train(sample)
    return index


ADD_ROWS = memory.ADD_ROWS  # rows converted to float32 at a time when adding: memory bounded by one chunk of one shard


def add_keys(index, keys: np.ndarray, start: int | None = None) -> None:
    """Add one shard's keys in chunks of ``ADD_ROWS``; with ``start``, under their global row ids (start + i)."""
    for i in range(0, len(keys), ADD_ROWS):
        x = np.asarray(keys[i : i + ADD_ROWS], dtype=np.float32)
        if start is None:
            index.add(x)
        else:
            index.add_with_ids(x, np.arange(start + i, start + i + len(x), dtype=np.int64))


def build_index(manifest_path, cfg: dict, seed: int, out_index, out_meta, threads: int = 1) -> dict:
    """The whole index in one process, held in memory (macondo's small datastores, and the reference that the
    sharded build (``train_index`` + ``add_shard`` + ``merge_index``) is tested against)."""
    faiss.omp_set_num_threads(threads)
    devices.log_devices()
    ds = Datastore(manifest_path)
    t0 = time.time()
    desc = factory_string(cfg, ds.dim)
    index = new_index(cfg, ds.dim)
    index = train_in_place(index, ds, cfg, seed)
    for keys in tqdm(ds.keys, desc="add shards", disable=len(ds.keys) < 2):
        add_keys(index, keys)
    if index.ntotal != ds.rows:
        raise ArtifactError(f"index holds {index.ntotal} vectors, datastore {manifest_path} has {ds.rows}")
    with atomic_path(out_index, ".faiss") as tmp:
        faiss.write_index(index, str(tmp))
        index_sha256 = sha256_file(tmp)
    meta = {
        "manifest_sha256": ds.hash,
        "index_sha256": index_sha256,
        "factory": desc,
        "ntotal": int(index.ntotal),
        "nprobe": cfg.get("nprobe"),
        "exact": desc == "Flat",
        "layout": "memory",
        "build_seconds": time.time() - t0,
    }
    write_json(out_meta, meta)
    return meta


def is_exact(index) -> bool:
    """Whether FAISS returns true squared L2 distances and neighbours: a flat index with the L2 metric. Read off
    the index itself (never off index.json); anything else (IVF, PQ, ...) is approximate."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat) and index.metric_type == faiss.METRIC_L2


@contextmanager
def gemm_distances():
    """Within the block, FAISS computes every exact L2 search by its GEMM (|x|^2 + |y|^2 - 2 x.y), whatever the
    number of queries in a call. Outside, a call of fewer than distance_compute_blas_threshold / dim queries (1000
    at dim 128 in FAISS 1.15) takes a per-pair loop: exact for each pair and independent of the call's queries and
    threads, but 2.5-4x slower here (benchmarks/run.py, measure 9). The GEMM's last bits depend on the call's
    queries and on the thread count, as they already do in retrieve's calls of 1024 queries; the scaling study's
    exactness and rerun tests rely on the loop, so only task scoring (blocks of about 950 queries) uses this."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 0
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


# ------------------------------------------------------------------------------------------ sharded exact search
# FAISS's exact search computes distances block by block of BLAS_BLOCK database rows (a GEMM per block), and the
# float32 result for a key depends on where it sits in its block. A range of rows that starts on a multiple of
# BLAS_BLOCK (and ends on one, or at the datastore's end) is computed exactly as the same rows of one index over
# the whole datastore: that is why the ranges below are cut there and not at the shard boundaries.
BLAS_BLOCK = int(faiss.cvar.distance_compute_blas_database_bs)
RANGE_BYTES = memory.RANGE_BYTES  # float32 keys of one range held at a time by the sharded exact search


def range_rows(dim: int, budget: int = RANGE_BYTES) -> int:
    """Rows per search range: a multiple of BLAS_BLOCK whose float32 keys fit ``budget`` bytes (at least one block)."""
    return max(1, budget // (4 * dim * BLAS_BLOCK)) * BLAS_BLOCK


def _sortable(d: np.ndarray) -> np.ndarray:
    """float32 -> uint64 whose order is the floats' order (-0.0 read as 0.0), in the high 32 bits."""
    u = (d + np.float32(0)).view(np.uint32)
    return np.where(u >> 31, ~u, u | np.uint32(0x80000000)).astype(np.uint64) << np.uint64(32)


def merge_topk(d1, i1, d2, i2, k: int):
    """The k nearest of two candidate lists per query, by distance, ties by (global) row id. Rows below 2^32 (every
    datastore here): one sort of (distance, row) packed in a uint64, 2x faster than ``np.lexsort``, same order."""
    d, i = np.concatenate([d1, d2], axis=1), np.concatenate([i1, i2], axis=1)
    if i.size and (i.min() < 0 or i.max() >= 1 << 32):
        order = np.lexsort((i, d), axis=1)[:, :k]
        return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    key = np.sort(_sortable(d) | i.astype(np.uint64), axis=1)[:, :k]
    u = (key >> np.uint64(32)).astype(np.uint32)
    d = np.where(u >> 31, u & np.uint32(0x7FFFFFFF), ~u).view(np.float32)
    return d, (key & np.uint64(0xFFFFFFFF)).astype(np.int64)


class ShardedFlat:
    """Exact L2 search over a datastore's own keys, range by range, the top-k merged by distance and ties by row id:
    the same ids and distances as one ``IndexFlatL2`` over all keys (ranges aligned to FAISS's BLAS blocks, see
    above), with one range of float32 keys in memory instead of a float32 copy of the whole datastore."""

    metric_type = faiss.METRIC_L2

    def __init__(self, ds: Datastore, rows: int | None = None):
        self.ds, self.d, self.ntotal = ds, ds.dim, ds.rows
        self.rows = rows or range_rows(ds.dim)
        if self.rows % BLAS_BLOCK:
            raise ValueError(f"search range of {self.rows} rows: not a multiple of FAISS's block of {BLAS_BLOCK}")

    def keys(self, a: int, b: int) -> np.ndarray:
        """float32 keys of global rows [a, b), read shard by shard."""
        out = np.empty((b - a, self.d), np.float32)
        offs = self.ds.offsets
        for s in range(np.searchsorted(offs, a, side="right") - 1, len(self.ds.keys)):
            if offs[s] >= b:
                break
            lo, hi = max(a, offs[s]), min(b, offs[s + 1])
            out[lo - a : hi - a] = self.ds.keys[s][lo - offs[s] : hi - offs[s]]
        return out

    def search(self, q: np.ndarray, k: int):
        return self.search_batches(q, k, len(q) or 1)

    def search_batches(self, q: np.ndarray, k: int, batch: int, progress: str = "", out=None):
        """``search`` of each ``batch`` of queries in turn, as separate calls would give them (FAISS's float32
        results depend on a call's queries), with each range of keys read and converted once for all batches, not
        once per batch: range by range, every batch's top-k so far merged in place into ``out`` ((dists, ids),
        [n, k] each; allocated when not given)."""
        n = len(q)
        d, i = out if out is not None else (np.empty((n, k), np.float32), np.empty((n, k), np.int64))
        w = 0  # columns of d and i that hold candidates: the top-k of the rows searched so far
        ranges = [(a, min(a + self.rows, self.ntotal)) for a in range(0, self.ntotal, self.rows)]
        for a, b in tqdm(ranges, desc=progress or "search", mininterval=10, disable=not progress):
            keys, kr = self.keys(a, b), min(k, b - a)
            w_next = min(k, w + kr)
            for s in range(0, n, batch):
                dr, ir = faiss.knn(q[s : s + batch], keys, kr)
                d[s : s + batch, :w_next], i[s : s + batch, :w_next] = merge_topk(
                    d[s : s + batch, :w], i[s : s + batch, :w], dr, ir + a, k
                )
            w = w_next
            del keys
        d[:, w:], i[:, w:] = np.finfo(np.float32).max, -1  # fewer keys than k: as FAISS pads
        return d, i


# ------------------------------------------------------------------------------------------ the sharded build
# train_index (one job) -> add_shard (one job per shard) -> merge_index (one job). Paths in index.json are relative
# to its directory; the merged IVF index keeps its inverted lists in IVFDATA beside index.faiss, memory-mapped.
IVFDATA = "index.ivfdata"
READ_FLAGS = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
# The trained index read to add keys or to merge: without the table of precomputed distances that FAISS builds on
# reading an IVFPQ index for search (nlist x m x 2^nbits floats, 256 MiB at nlist 16384, m 16), which adding never
# reads. It would make add_shard's memory grow with nlist.
TRAINED_FLAGS = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE


def _checked(path, meta_path, what: str, rerun: str) -> dict:
    """index.json-like meta of an intermediate file, with the file's sha256 checked against it."""
    meta = read_json(meta_path)
    if sha256_file(path) != meta.get("sha256"):
        raise ArtifactError(f"{path}: sha256 differs from {meta_path} ({what} altered since); rerun {rerun}")
    return meta


def train_index(manifest_path, cfg: dict, seed: int, out_index, out_meta, threads: int = 1) -> dict:
    """The empty index, trained on the seeded cross-shard sample (IVFPQ), or the empty Flat index."""
    faiss.omp_set_num_threads(threads)
    devices.log_devices()
    ds = Datastore(manifest_path, deep=False)  # sizes only: training reads a sample; add_shard hashes every shard
    memory.check("train_index", ds.manifest, cfg, "index.train_sample")
    t0 = time.time()
    index = train_in_place(new_index(cfg, ds.dim), ds, cfg, seed)
    with atomic_path(out_index, ".faiss") as tmp:
        faiss.write_index(index, str(tmp))
        digest = sha256_file(tmp)
    meta = {"sha256": digest, "factory": factory_string(cfg, ds.dim), "dim": ds.dim, "index": cfg,
            "trained_on": {"manifest_sha256": ds.hash, "rows": ds.rows, "sample": min(ds.rows, cfg["train_sample"])}
            if cfg["type"] != "Flat" else None,
            "polysemous": bool(cfg.get("polysemous", False)), "seconds": round(time.time() - t0, 2)}
    write_json(out_meta, meta)
    return meta


def add_shard(trained, trained_meta, keys_npy, shard_json, out_part, out_meta, threads: int = 1) -> dict:
    """One shard's keys encoded with the trained index, under their global row ids (the shard's ``start``: rows are
    positions of the datastore's token stream). Memory: the shard's codes, one chunk of its keys."""
    from .datastore import KEY_DTYPE

    faiss.omp_set_num_threads(threads)
    devices.log_devices()
    t0 = time.time()
    tmeta = _checked(trained, trained_meta, "the trained index", "train_index")
    smeta = read_json(shard_json)
    if sha256_file(keys_npy) != smeta["keys_sha256"]:
        raise ArtifactError(f"{keys_npy}: sha256 differs from the one recorded at extraction in {shard_json}; "
                            f"rerun extract_keys (snakemake --forcerun {keys_npy})")
    one = {"dim": tmeta["dim"], "rows": smeta["rows"], "shards": [{"rows": smeta["rows"]}]}
    memory.check("add_shard", one, tmeta["index"],
                 "the keys per shard (raise datastores.<name>.shards, or lower shard_tokens)")
    keys = load_npy(keys_npy, mmap=True, dtype=KEY_DTYPE, ndim=2)
    if keys.shape != (smeta["rows"], tmeta["dim"]):
        raise ArtifactError(f"{keys_npy}: shape {keys.shape}, expected ({smeta['rows']}, {tmeta['dim']})")
    index = faiss.read_index(str(trained), TRAINED_FLAGS)
    add_keys(index, keys, start=smeta["start"])
    with atomic_path(out_part, ".faiss") as tmp:
        faiss.write_index(index, str(tmp))
        digest = sha256_file(tmp)
    meta = {"sha256": digest, "shard": smeta["shard"], "start": smeta["start"], "rows": smeta["rows"],
            "keys_sha256": smeta["keys_sha256"], "trained_sha256": tmeta["sha256"],
            "seconds": round(time.time() - t0, 2)}
    write_json(out_meta, meta)
    log.info("shard %d: %d keys encoded in %.1fs", smeta["shard"], smeta["rows"], meta["seconds"])
    return meta


def merge_index(manifest_path, cfg: dict, trained, trained_meta, parts: list, part_metas: list, out_index,
                out_meta) -> dict:
    """Join the parts into one index. IVFPQ: the trained index with its inverted lists on disk (``IVFDATA``,
    written by FAISS's ``merge_ondisk`` from the memory-mapped parts), so that search memory-maps them. Flat: an
    empty ``IndexFlatL2`` that says what the index is; search is ``ShardedFlat`` over the datastore's keys."""
    ds = Datastore(manifest_path, deep=False)  # sizes; the parts' keys digests are checked against it below
    memory.check("merge_index", ds.manifest, cfg, "index.nlist")
    t0 = time.time()
    out_index, out_meta = Path(out_index), Path(out_meta)
    meta = {"manifest_sha256": ds.hash, "factory": factory_string(cfg, ds.dim), "ntotal": ds.rows,
            "nprobe": cfg.get("nprobe") if cfg["type"] != "Flat" else None}
    if cfg["type"] == "Flat":
        index = faiss.IndexFlatL2(ds.dim)
        with atomic_path(out_index, ".faiss") as tmp:
            faiss.write_index(index, str(tmp))
            meta["index_sha256"] = sha256_file(tmp)
        meta |= {"exact": True, "layout": "sharded", "range_rows": range_rows(ds.dim)}
    else:
        if len(parts) != len(ds.manifest["shards"]):
            raise ArtifactError(f"{len(parts)} index parts for the {len(ds.manifest['shards'])} shards of "
                                f"{manifest_path}; rerun add_shard")
        tmeta = _checked(trained, trained_meta, "the trained index", "train_index")
        if (tmeta["dim"], tmeta["factory"]) != (ds.dim, meta["factory"]):
            raise ArtifactError(f"{trained}: a {tmeta['factory']} index of dimension {tmeta['dim']}, the config and "
                                f"{manifest_path} ask for {meta['factory']} of {ds.dim}; rerun train_index")
        meta |= {"trained_sha256": tmeta["sha256"], "trained_on": tmeta["trained_on"]}
        listed = []
        for i, (part, pmeta_path, s) in enumerate(zip(parts, part_metas, ds.manifest["shards"], strict=True)):
            pm = _checked(part, pmeta_path, "the index part", f"add_shard (snakemake --forcerun {part})")
            stale = [k for k, want in (("keys_sha256", s["keys_sha256"]), ("start", int(ds.offsets[i])),
                                       ("rows", s["rows"]), ("trained_sha256", tmeta["sha256"])) if pm[k] != want]
            if stale:
                raise ArtifactError(f"{pmeta_path}: {', '.join(stale)} differ from shard {i} of {manifest_path} "
                                    f"and {trained_meta} (a part of another datastore version or trained index); "
                                    f"rerun add_shard (snakemake --forcerun {part})")
            listed.append({"shard": i, "sha256": pm["sha256"], "keys_sha256": pm["keys_sha256"]})
        index = faiss.read_index(str(trained), TRAINED_FLAGS)
        with atomic_path(out_index.parent / IVFDATA, ".ivfdata") as data_tmp, \
                atomic_path(out_index, ".faiss") as tmp:
            merge_ondisk(index, [str(p) for p in parts], str(data_tmp))
            invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
            invlists.filename = IVFDATA  # relative: read back with IO_FLAG_ONDISK_SAME_DIR (load_index)
            faiss.write_index(index, str(tmp))
            if index.ntotal != ds.rows:
                raise ArtifactError(f"merged index holds {index.ntotal} vectors, {manifest_path} has {ds.rows}")
            meta["index_sha256"] = sha256_file(tmp)
            del index, invlists
            meta["ivfdata_sha256"] = sha256_file(data_tmp)
        meta |= {"exact": False, "layout": "ondisk", "ivfdata": IVFDATA, "parts": listed}
    meta["build_seconds"] = round(time.time() - t0, 2)
    write_json(out_meta, meta)
    return meta


def merge_ondisk(index, parts: list[str], ivfdata: str) -> None:
    """FAISS's merge of IVF parts into on-disk inverted lists (faiss.contrib.ondisk), its progress log quietened."""
    from faiss.contrib.ondisk import merge_ondisk as merge

    logging.getLogger("faiss.contrib.ondisk").setLevel(logging.WARNING)
    merge(index, parts, ivfdata)


def load_index(index_path, meta_path, ds: Datastore, nprobe: int | None = None):
    """(index, meta) of a datastore's index, checked against index.json and the datastore; ``meta['exact']``
    is what the index is (``is_exact``), and an ``exact`` flag in index.json that says otherwise is refused.
    Layouts (index.json ``layout``): ``memory`` (one FAISS file), ``ondisk`` (IVF with its lists memory-mapped from
    ``index.ivfdata`` beside index.faiss, wherever the directory was moved), ``sharded`` (exact ``ShardedFlat``)."""
    index_path = Path(index_path)
    meta = read_json(meta_path)
    layout = meta.get("layout", "memory")
    # the pipeline's indexes are merge_index's; one built in one process (macondo's) is its own rule's
    rerun = "rerun merge_index"
    if layout == "memory":
        rerun = "rerun the job that built it (merge_index, macondo_memory)"
    if meta["manifest_sha256"] != ds.hash:
        raise ArtifactError(f"{index_path} was built from another version of {ds.path}; {rerun}")
    if sha256_file(index_path) != meta["index_sha256"]:
        raise ArtifactError(f"{index_path}: sha256 differs from {meta_path} (altered); delete it and {rerun}")
    if layout == "ondisk":
        data = index_path.parent / IVFDATA
        if not data.exists():
            raise ArtifactError(f"{data}: missing (the inverted lists of {index_path}); {rerun}")
        if sha256_file(data) != meta.get("ivfdata_sha256"):
            raise ArtifactError(f"{data}: sha256 differs from {meta_path} (altered); delete it and {rerun}")
    try:
        index = faiss.read_index(str(index_path), READ_FLAGS if layout == "ondisk" else 0)
    except RuntimeError as e:
        raise ArtifactError(f"{index_path}: unreadable FAISS index ({e}); delete it and {rerun}") from e
    exact = is_exact(index)
    ntotal = index.ntotal if layout != "sharded" else meta["ntotal"]
    if ntotal != ds.rows or index.d != ds.dim or (layout == "sharded" and index.ntotal):
        raise ArtifactError(f"{index_path}: {ntotal} x {index.d}, datastore has {ds.rows} x {ds.dim}")
    if "exact" in meta and meta["exact"] is not exact:
        kind = type(faiss.downcast_index(index)).__name__
        raise ArtifactError(
            f"{meta_path} says exact={json.dumps(meta['exact'])}, but {index_path} is a FAISS {kind} "
            f"({'exact' if exact else 'approximate'}): index.json was altered, or belongs to another index; "
            f"the index matches the sha256 recorded there; {rerun} (snakemake --forcerun {meta_path})"
        )
    meta = {**meta, "exact": exact}
    if layout == "sharded":
        if not exact:
            raise ArtifactError(f"{meta_path}: layout sharded, but {index_path} is not a flat L2 index; {rerun}")
        return ShardedFlat(ds, meta.get("range_rows")), meta
    if nprobe is not None and hasattr(index, "nprobe"):
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index, meta


def exact_sq_l2(queries: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Squared L2 between queries [n, d] and their neighbours' keys [n, K, d], in float32."""
    diff = keys - queries[:, None, :]
    return np.einsum("nkd,nkd->nk", diff, diff)


DISTANCES = {"exact": "recomputed from keys", "pq": "faiss PQ (approximate)"}  # retrieval meta, IVFPQ


def search(
    index, ds: Datastore, queries: np.ndarray, K: int, exact: bool, batch: int = 1024, distances: str = "exact"
):
    """Neighbours of float32 ``queries``, nearest first. ``exact`` (a Flat index) or ``distances='pq'``: FAISS's
    distances and order as they are (clamped at 0); else distances recomputed from the stored keys, re-sorted."""
    if distances not in DISTANCES:
        raise ValueError(f"distances = {distances!r}: one of {', '.join(DISTANCES)}")
    recompute = not exact and distances == "exact"
    n = len(queries)
    dists = np.empty((n, K), np.float32)
    ids = np.empty((n, K), np.int64)
    sharded = isinstance(index, ShardedFlat)
    if sharded:  # each range of keys read once for every batch, the results written into dists and ids
        index.search_batches(queries, K, batch, progress=f"search K={K}" if n > batch else "", out=(dists, ids))
    for a in tqdm(range(0, n, batch), desc=f"search K={K}", mininterval=10, disable=n <= batch or sharded):
        q = queries[a : a + batch]
        d, i = (dists[a : a + batch], ids[a : a + batch]) if sharded else index.search(q, K)
        if (i < 0).any():
            raise ArtifactError(
                f"the index returned fewer than K={K} neighbours for some queries; "
                f"raise index.nprobe or lower the largest k"
            )
        if recompute:
            d = exact_sq_l2(q, ds.gather_keys(i))
            order = np.argsort(d, axis=1, kind="stable")
            d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
        dists[a : a + batch] = np.maximum(d, 0.0)
        ids[a : a + batch] = i
    return dists, ids


@step(name="train-index")
def train_index_step(params: dict, manifest: Path, index: Path, index_meta: Path, threads: int = 1) -> None:
    """Train a datastore's empty index on a seeded sample drawn across its shards (IVFPQ; Flat needs none)."""
    train_index(manifest, params["index"], params["seed"], index, index_meta, threads=threads)


@step(name="add-shard")
def add_shard_step(trained: Path, trained_meta: Path, keys: Path, shard_meta: Path, part: Path, part_meta: Path,
                   threads: int = 1) -> None:
    """Encode one shard's keys with the trained index into an index part (global row ids)."""
    add_shard(trained, trained_meta, keys, shard_meta, part, part_meta, threads=threads)


@step(name="merge-index")
def merge_index_step(params: dict, manifest: Path, index: Path, index_meta: Path, trained: Path | None = None,
                     trained_meta: Path | None = None, parts: list[Path] = (), part_metas: list[Path] = (),
                     threads: int = 1) -> None:
    """Join a datastore's index parts into index.faiss with on-disk inverted lists (IVFPQ), or write the sharded
    exact index (Flat)."""
    faiss.omp_set_num_threads(threads)
    devices.log_devices()
    merge_index(manifest, params["index"], trained, trained_meta, list(parts), list(part_metas), index, index_meta)
