"""Index stage: a FAISS index over a datastore's keys, trained on a key sample and filled shard by shard.

``Flat`` is exact; ``IVFPQ`` (nlist, m, nbits, nprobe) is approximate, and retrieval then recomputes exact
distances from the stored keys. Where FAISS sees GPUs, the coarse quantizer's k-means trains on them
(``devices.training_on_gpus``); a search moves the index to them (``devices.search_index``, called by retrieval).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import faiss
import numpy as np
from tqdm import tqdm

from . import devices
from .artifacts import ArtifactError, atomic_path, read_json, sha256_file, write_json
from .cli import step
from .datastore import Datastore

log = logging.getLogger(__name__)


def factory_string(cfg: dict, dim: int) -> str:
    if cfg["type"] == "Flat":
        return "Flat"
    if dim % cfg["m"]:
        raise ValueError(f"index.m = {cfg['m']} must divide the key dimension {dim}")
    return f"IVF{cfg['nlist']},PQ{cfg['m']}x{cfg['nbits']}"


def build_index(manifest_path, cfg: dict, seed: int, out_index, out_meta, threads: int = 1) -> dict:
    faiss.omp_set_num_threads(threads)
    devices.log_devices()
    ds = Datastore(manifest_path)
    t0 = time.time()
    desc = factory_string(cfg, ds.dim)
    index = faiss.index_factory(ds.dim, desc, faiss.METRIC_L2)
    if not index.is_trained:
        n = min(ds.rows, cfg["train_sample"])
        if n < cfg["nlist"] * 39 and n < ds.rows:
            log.warning("training %s on %d keys (< 39 per list)", desc, n)
        sample_ids = np.sort(np.random.default_rng(seed).choice(ds.rows, size=n, replace=False))
        sample = ds.gather_keys(sample_ids)
        with devices.training_on_gpus(index) as on_gpus:
            log.info("training %s on %d keys%s", desc, n, " (k-means on the GPUs)" if on_gpus else "")
            index.train(sample)
    for keys in tqdm(ds.keys, desc="add shards", disable=len(ds.keys) < 2):
        for i in range(0, len(keys), 1 << 18):  # bounded memory: one float32 chunk of one shard at a time
            index.add(np.asarray(keys[i : i + (1 << 18)], dtype=np.float32))
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
        "build_seconds": time.time() - t0,
    }
    write_json(out_meta, meta)
    return meta


def is_exact(index) -> bool:
    """Whether FAISS returns true squared L2 distances and neighbours: a flat index with the L2 metric. Read off
    the index itself (never off index.json); anything else (IVF, PQ, ...) is approximate."""
    return isinstance(faiss.downcast_index(index), faiss.IndexFlat) and index.metric_type == faiss.METRIC_L2


def load_index(index_path, meta_path, ds: Datastore, nprobe: int | None = None):
    """(index, meta) of a datastore's index, checked against index.json and the datastore; ``meta['exact']``
    is what the index is (``is_exact``), and an ``exact`` flag in index.json that says otherwise is refused."""
    meta = read_json(meta_path)
    if meta["manifest_sha256"] != ds.hash:
        raise ArtifactError(f"{index_path} was built from another version of {ds.path}; rerun build_index")
    if sha256_file(index_path) != meta["index_sha256"]:
        raise ArtifactError(f"{index_path}: sha256 differs from {meta_path} (altered); delete it and rerun build_index")
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as e:
        raise ArtifactError(
            f"{index_path}: unreadable FAISS index ({e}); delete it and rerun build_index"
        ) from e
    if index.ntotal != ds.rows or index.d != ds.dim:
        raise ArtifactError(f"{index_path}: {index.ntotal} x {index.d}, datastore has {ds.rows} x {ds.dim}")
    exact = is_exact(index)
    if "exact" in meta and meta["exact"] is not exact:
        kind = type(faiss.downcast_index(index)).__name__
        raise ArtifactError(
            f"{meta_path} says exact={json.dumps(meta['exact'])}, but {index_path} is a FAISS {kind} "
            f"({'exact' if exact else 'approximate'}): index.json was altered, or belongs to another index; "
            f"the index matches the sha256 recorded there; rerun build_index (snakemake --forcerun {meta_path})"
        )
    meta = {**meta, "exact": exact}
    if nprobe is not None and hasattr(index, "nprobe"):
        faiss.extract_index_ivf(index).nprobe = nprobe
    return index, meta


@step(name="build-index")
def build_index_step(params: dict, manifest: Path, index: Path, index_meta: Path, threads: int = 1) -> None:
    """Build the FAISS index of a datastore (Flat, or IVFPQ trained on a sample), adding keys shard by shard."""
    build_index(manifest, params["index"], params["seed"], index, index_meta, threads=threads)
