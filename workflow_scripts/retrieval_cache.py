"""The retrieval cache artifact, per (eval set, datastore): one directory, readable with numpy alone, holding
``targets``, ``lm_logprob``, ``dists`` (squared L2, ascending), ``vals``, ``ids`` (global datastore rows),
``queries`` (float16) and ``meta.json`` with each file's sha256. Written by ``retrieval`` (or joined from its
chunks here), read and checked by every stage that rescores it. Imports neither torch nor FAISS: the sweep, the
scaling study and the verify jobs start without them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from . import memory
from .artifacts import ArtifactError, atomic_path, load_npy, open_npy_for_writing, read_json, sha256_file, write_json
from .cli import step

log = logging.getLogger(__name__)
chunk_unit, chunk_bounds = memory.chunk_unit, memory.chunk_bounds  # pure functions: the Snakefile plans with them


CACHE_FILES = {
    "targets": (np.int32, 1),
    "lm_logprob": (np.float32, 1),
    "dists": (np.float32, 2),
    "vals": (np.int32, 2),
    "ids": (np.int64, 2),
    "queries": (np.float16, 2),
}


def scored_tokens(tokens: np.ndarray, cfg: dict) -> int:
    """How many positions of an eval stream are scored: all but the last, at most ``max_tokens``."""
    return min(tokens.size - 1, cfg.get("max_tokens") or tokens.size)


def write_cache(outdir: Path, arrays: dict, meta: dict) -> dict:
    """The cache's arrays, each written atomically and hashed as written, then meta.json with the digests. An array
    may be given as a list of consecutive parts (the chunks' memory-mapped arrays): written one part at a time."""
    digests = {}
    for name, arr in arrays.items():
        parts = arr if isinstance(arr, list) else [arr]
        shape = (sum(len(x) for x in parts), *parts[0].shape[1:])
        with atomic_path(outdir / f"{name}.npy", ".npy") as tmp:
            if len(parts) == 1:  # in memory: one write (a memory map's page faults cost 3x the search's overhead)
                np.save(tmp, np.ascontiguousarray(parts[0], dtype=CACHE_FILES[name][0]), allow_pickle=False)
            else:
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
OPTIONAL = ("window", "words")  # alike too, where recorded: the eval set's windows (strided), its words (scored)


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
        alike = all(c["meta"].get(k) == first.get(k) for k in (*SAME, *OPTIONAL))
        if got != want or not alike:
            raise ArtifactError(
                f"{m}: chunk {got or 'record missing'}, expected {want} built like {chunk_metas[0]} "
                f"({', '.join((*SAME, *OPTIONAL))}); the chunk belongs to another eval set, config or datastore: rerun "
                f"retrieve_chunk (snakemake --forcerun {m})"
            )
    if first["tokens_sha256"] != sha256_file(tokens_npy):
        raise ArtifactError(f"{chunk_metas[0]}: built from another version of {tokens_npy}; rerun retrieve_chunk")
    K = first["K"]
    arrays = {name: [c[name] for c in caches] for name in CACHE_FILES}  # memory-mapped: copied part by part
    meta = {k: first[k] for k in SAME} | {k: first[k] for k in OPTIONAL if k in first}
    meta |= {"n_tokens": int(n), "chunks": len(caches),
             "seconds": {k: round(sum(c["meta"]["seconds"][k] for c in caches), 2) for k in ("model", "search")}}
    meta = write_cache(Path(outdir), arrays, meta)
    log.info("merged %d chunks into %d x %d neighbours", len(caches), n, K)
    return meta


def load_cache(cache_dir, manifest_json=None, mmap: bool = True, tokens_npy=None) -> dict:
    """Load and check a retrieval cache: each file's sha256 against the one ``meta.json`` recorded when it was
    written, the shapes against ``meta.json``, the distances finite. With ``manifest_json``, refuse a cache built
    from another datastore; with ``tokens_npy`` (the eval set's tokens), a cache built from another eval set."""
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
    if tokens_npy is not None:
        check_eval_tokens(meta, meta_json, tokens_npy)
    out["meta"] = meta
    return out


def check_eval_tokens(meta: dict, meta_json, tokens_npy) -> None:
    """Refuse a cache whose record names other tokens than ``tokens_npy`` (the eval set it is read as): another
    eval set's cache (results/retrieval/valid and .../test swapped), or one of an older version of the tokens."""
    tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
    got = sha256_file(tokens_npy)
    if meta.get("tokens_sha256") != got or meta["n_tokens"] > tokens.size - 1:
        raise ArtifactError(
            f"{meta_json}: built from tokens with sha256 {str(meta.get('tokens_sha256'))[:12]} ({meta['n_tokens']} "
            f"scored), not from {tokens_npy} (sha256 {got[:12]}, {tokens.size} tokens): the cache of another eval "
            f"set, or of another version of its tokens; rerun retrieve for it (snakemake --forcerun {meta_json})"
        )


@step(name="verify-retrieval")
def verify_retrieval_step(cache: Path, manifest: Path, tokens: Path, out: Path) -> None:
    """Check a retrieval cache (--cache: its meta.json) as the sweep does (load_cache: each file's sha256, the
    shapes, the distances, the datastore and the eval set's --tokens it was built from) and write a marker (--out)
    naming what was checked. A job before the sweep: when the check fails, Snakemake does not start the sweep,
    which would remove its tables first."""
    c = load_cache(cache.parent, manifest, tokens_npy=tokens)
    write_json(out, {"checked": "retrieval cache", "meta": str(cache), "manifest": str(manifest),
                     "tokens": str(tokens), "sha256": c["meta"]["sha256"]})
