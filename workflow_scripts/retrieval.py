"""Retrieval stage: once per (eval set, datastore), K_max neighbours per scored token, cached on disk.

The cache (one directory, readable with numpy alone) holds ``targets``, ``lm_logprob``, ``dists`` (squared L2,
ascending), ``vals``, ``ids`` (global datastore rows), ``queries`` (float16) and ``meta.json``. Every
(λ, k, σ) point is a rescoring of it. With an approximate index, distances are recomputed exactly from the
stored keys and the neighbours re-sorted, unless ``index.distances`` is ``pq``: then FAISS's approximate PQ
distances and order are kept, as paper 1's code does (``recompute_dists=False``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from . import devices, lm, memory
from .artifacts import (
    ArtifactError,
    atomic_path,
    load_npy,
    open_npy_for_writing,
    read_json,
    sha256_file,
    write_json,
)
from .cli import step
from .datastore import Datastore, run_model
from .index import load_index

log = logging.getLogger(__name__)
CACHE_FILES = {
    "targets": (np.int32, 1),
    "lm_logprob": (np.float32, 1),
    "dists": (np.float32, 2),
    "vals": (np.int32, 2),
    "ids": (np.int64, 2),
    "queries": (np.float16, 2),
}


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
    for a in tqdm(range(0, n, batch), desc=f"search K={K}", mininterval=10, disable=n <= batch):
        q = queries[a : a + batch]
        d, i = index.search(q, K)
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


def open_retriever(identity_json, manifest_json, index_path, index_meta, cfg: dict, threads: int = 1):
    """(model, tokenizer, identity, datastore, index, index meta), every piece checked against the others:
    the model is the one that built the datastore, the index was built from this version of it, and it holds
    at least ``cfg['k_max']`` keys; the model takes windows of ``cfg['block_size']``, when given."""
    faiss.omp_set_num_threads(threads)
    device = cfg.get("device", "auto")
    dtype = devices.model_dtype(device, cfg.get("dtype", "float16"))
    model, tok, ident = lm.load_checked(identity_json, device=device, dtype=dtype, block_size=cfg.get("block_size"))
    ds = Datastore(manifest_json)
    ds.check_model(ident, identity_json)
    if cfg["k_max"] > ds.rows:
        raise ValueError(f"k_max = {cfg['k_max']} exceeds the {ds.rows} keys of datastore {manifest_json}")
    index, imeta = load_index(index_path, index_meta, ds, cfg.get("nprobe"))
    index = devices.search_index(index, device, cfg.get("gpu_shard_above_gb", devices.SHARD_ABOVE_GB), k=cfg["k_max"])
    return model, tok, ident, ds, index, imeta


SEARCH_BATCH = memory.SEARCH_BATCH  # queries per FAISS search call
chunk_unit, chunk_bounds = memory.chunk_unit, memory.chunk_bounds  # pure functions: the Snakefile plans with them


def scored_tokens(tokens: np.ndarray, cfg: dict) -> int:
    """How many positions of an eval stream are scored: all but the last, at most ``max_tokens``."""
    return min(tokens.size - 1, cfg.get("max_tokens") or tokens.size)


def retrieve(
    identity_json, manifest_json, index_path, index_meta, tokens_npy, cfg: dict, outdir, threads: int = 1,
    chunk: tuple[int, int] | None = None,
) -> dict:
    """Run the datastore's model over an eval token stream, search, and write the cache to ``outdir``. With
    ``chunk`` = (i, n): only chunk i of n (``chunk_bounds``), a partial cache that ``merge_chunks`` joins."""
    outdir = Path(outdir)
    model, _, ident, ds, index, imeta = open_retriever(
        identity_json, manifest_json, index_path, index_meta, cfg, threads
    )
    K = cfg["k_max"]
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    n = scored_tokens(tokens, cfg)
    a, b = (0, n) if chunk is None else chunk_bounds(n, chunk[1], chunk_unit(cfg))[chunk[0]]
    distances = cfg.get("distances") or "exact"
    memory.check("retrieve", ds.manifest, memory.search_config(imeta, distances),
                 "the queries per job (raise retrieval.chunks)", K, b - a)
    t0 = time.time()
    queries = np.empty((b - a, ds.dim), np.float16)
    lm_logprob = np.empty(b - a, np.float32)
    if b > a:
        for first, keys, lp in run_model(
            model, ident["hook_point"], tokens, a, b, cfg["block_size"], cfg["batch_size"], True, desc="queries"
        ):
            queries[first - a : first - a + len(keys)] = keys.astype(np.float16)
            lm_logprob[first - a : first - a + len(keys)] = lp
    t_model = time.time() - t0
    # search with the float16-rounded queries so that the cache is self-consistent
    dists, ids = search(index, ds, queries.astype(np.float32), K, exact=imeta["exact"], distances=distances,
                        batch=cfg.get("search_batch") or SEARCH_BATCH)
    t_search = time.time() - t0 - t_model
    arrays = {
        "targets": tokens[a + 1 : b + 1].astype(np.int32),
        "lm_logprob": lm_logprob,
        "dists": dists,
        "vals": ds.gather_vals(ids),
        "ids": ids,
        "queries": queries,
    }
    meta = {
        "manifest_sha256": ds.hash,
        "model_sha256": ident["model_sha256"],
        "K": K,
        "n_tokens": int(b - a),
        "tokens_sha256": sha256_file(tokens_npy),
        "index": imeta["factory"],
        "distances": "faiss" if imeta["exact"] else DISTANCES[distances],
        "seconds": {"model": round(t_model, 2), "search": round(t_search, 2)},
    }
    if chunk is not None:
        meta["chunk"] = {"index": chunk[0], "of": chunk[1], "start": a, "end": b, "scored": n}
    meta = write_cache(outdir, arrays, meta)
    log.info("retrieved %d x %d neighbours (model %.1fs, search %.1fs)", b - a, K, t_model, t_search)
    return meta


def write_cache(outdir: Path, arrays: dict, meta: dict) -> dict:
    """The cache's arrays, each written atomically and hashed as written, then meta.json with the digests. An array
    may be given as a list of consecutive parts (the chunks' memory-mapped arrays): written one part at a time."""
    digests = {}
    for name, arr in arrays.items():
        parts = arr if isinstance(arr, list) else [arr]
        shape = (sum(len(x) for x in parts), *parts[0].shape[1:])
        with atomic_path(outdir / f"{name}.npy", ".npy") as tmp:
            out = open_npy_for_writing(tmp, CACHE_FILES[name][0], shape)
            pos = 0
            for x in parts:
                out[pos : pos + len(x)] = x
                pos += len(x)
            out.flush()
            del out
            digests[f"{name}.npy"] = sha256_file(tmp)  # as written: readers refuse a file altered since
    meta = {**meta, "sha256": digests}
    write_json(outdir / "meta.json", meta)
    return meta


SAME = ("manifest_sha256", "model_sha256", "K", "tokens_sha256", "index", "distances")  # every chunk's alike


def merge_chunks(chunk_metas: list, tokens_npy, cfg: dict, outdir) -> dict:
    """Join the chunks' caches (each checked by ``load_cache``: digests, shapes, distances) into the one cache a
    single job writes, array by array. The chunks must be the n chunks of this eval set, in order, built alike."""
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    n = scored_tokens(tokens, cfg)
    caches = [load_cache(Path(m).parent) for m in chunk_metas]
    bounds = chunk_bounds(n, len(caches), chunk_unit(cfg))
    first = caches[0]["meta"]
    for i, (c, m) in enumerate(zip(caches, chunk_metas, strict=True)):
        got = c["meta"].get("chunk") or {}
        want = {"index": i, "of": len(caches), "start": bounds[i][0], "end": bounds[i][1], "scored": n}
        if got != want or any(c["meta"][k] != first[k] for k in SAME):
            raise ArtifactError(
                f"{m}: chunk {got or 'record missing'}, expected {want} built like {chunk_metas[0]} ({', '.join(SAME)}"
                f"); the chunk belongs to another eval set, config or datastore: rerun retrieve_chunk "
                f"(snakemake --forcerun {m})"
            )
    if first["tokens_sha256"] != sha256_file(tokens_npy):
        raise ArtifactError(f"{chunk_metas[0]}: built from another version of {tokens_npy}; rerun retrieve_chunk")
    K = first["K"]
    arrays = {name: [c[name] for c in caches] for name in CACHE_FILES}  # memory-mapped: copied part by part
    meta = {k: first[k] for k in SAME}
    meta |= {"n_tokens": int(n), "chunks": len(caches),
             "seconds": {k: round(sum(c["meta"]["seconds"][k] for c in caches), 2) for k in ("model", "search")}}
    meta = write_cache(Path(outdir), arrays, meta)
    log.info("merged %d chunks into %d x %d neighbours", len(caches), n, K)
    return meta


def load_cache(cache_dir, manifest_json=None, mmap: bool = True) -> dict:
    """Load and check a retrieval cache: each file's sha256 against the one ``meta.json`` recorded when it was
    written, the shapes against ``meta.json``, the distances finite. With ``manifest_json``, refuse a cache built
    from another datastore."""
    cache_dir = Path(cache_dir)
    meta_json = cache_dir / "meta.json"
    rerun = f"rerun retrieve for it (snakemake --forcerun {meta_json})"
    meta = read_json(meta_json)
    recorded = meta.get("sha256")
    if not isinstance(recorded, dict):
        raise ArtifactError(
            f"{meta_json}: no sha256 record of the cache's files (written by an older version, or edited); {rerun}"
        )
    out = {}
    for name, (dt, nd) in CACHE_FILES.items():
        f = cache_dir / f"{name}.npy"
        out[name] = load_npy(f, mmap=mmap, dtype=dt, ndim=nd)
        if sha256_file(f) != recorded.get(f.name):
            raise ArtifactError(
                f"{f}: sha256 differs from the one recorded in {meta_json} when the cache was written "
                f"(the file, or the record, was altered since); {rerun}"
            )
    n, K = meta["n_tokens"], meta["K"]
    for name, arr in out.items():
        if arr.shape[0] != n or (arr.ndim == 2 and name != "queries" and arr.shape[1] != K):
            raise ArtifactError(
                f"{cache_dir / (name + '.npy')}: shape {arr.shape}, {meta_json} says N={n}, K={K}; the files "
                f"match the sha256 recorded in it, so meta.json is the altered one; {rerun}"
            )
    bad = ~np.isfinite(out["dists"])
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        r, c = int(rows[0]), int(np.argmax(bad[rows[0]]))
        raise ArtifactError(
            f"{cache_dir / 'dists.npy'}: non-finite distance ({out['dists'][r, c]}) at row {r}, column {c} "
            f"({len(rows)} of {n} rows have one); the kNN-LM is undefined there; {rerun}"
        )
    if manifest_json is not None:
        from .datastore import manifest_hash

        if manifest_hash(manifest_json) != meta["manifest_sha256"]:
            raise ArtifactError(f"{cache_dir} was built from another version of {manifest_json}; rerun retrieve")
    out["meta"] = meta
    return out


@step(name="retrieve")
def retrieve_step(
    params: dict, model_json: Path, manifest: Path, index: Path, index_meta: Path, tokens: Path, meta: Path,
    threads: int = 1, chunks: list[Path] = (),
) -> None:
    """Retrieve K_max neighbours for every scored token of an eval set; write the cache (its arrays beside
    --meta, the cache's meta.json). With --chunks (the retrieve-chunk caches' meta.json, in order): join them."""
    if chunks:
        merge_chunks(chunks, tokens, params, meta.parent)
        return
    lm.torch_threads(threads)
    retrieve(model_json, manifest, index, index_meta, tokens, params, meta.parent, threads=threads)


@step(name="retrieve-chunk")
def retrieve_chunk_step(
    params: dict, model_json: Path, manifest: Path, index: Path, index_meta: Path, tokens: Path, meta: Path,
    threads: int = 1,
) -> None:
    """Retrieve one chunk of an eval set (params ``chunk``: [i, n]; chunks cut on whole model and search batches),
    a partial cache that ``retrieve --chunks`` joins into the one-job cache."""
    lm.torch_threads(threads)
    retrieve(model_json, manifest, index, index_meta, tokens, params, meta.parent, threads=threads,
             chunk=tuple(params["chunk"]))


@step(name="verify-retrieval")
def verify_retrieval_step(cache: Path, manifest: Path, out: Path) -> None:
    """Check a retrieval cache (--cache: its meta.json) as the sweep does (load_cache: each file's sha256, the
    shapes, the distances, the datastore it was built from) and write a marker (--out) naming what was checked. A
    job before the sweep: when the check fails, Snakemake does not start the sweep, which would remove its tables
    first."""
    c = load_cache(cache.parent, manifest)
    write_json(out, {"checked": "retrieval cache", "meta": str(cache), "manifest": str(manifest),
                     "sha256": c["meta"]["sha256"]})
