"""Retrieval stage: once per (eval set, datastore), K_max neighbours per scored token, cached on disk.

The cache (``retrieval_cache``: one directory, readable with numpy alone) holds ``targets``, ``lm_logprob``,
``dists`` (squared L2, ascending), ``vals``, ``ids`` (global datastore rows), ``queries`` (float16) and
``meta.json``. Every (λ, k, σ) point is a rescoring of it. With an approximate index, distances are recomputed
exactly from the stored keys and the neighbours re-sorted (``index.search``), unless ``index.distances`` is ``pq``:
then FAISS's approximate PQ distances and order are kept, as paper 1's code does (``recompute_dists=False``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np

from . import devices, lm, memory
from .artifacts import load_npy, sha256_file
from .cli import step
from .datastore import Datastore, window_record
from .forward import run_model
from .index import DISTANCES, load_index, search
from .retrieval_cache import chunk_bounds, chunk_unit, merge_chunks, scored_tokens, write_cache

log = logging.getLogger(__name__)


def open_retriever(identity_json, manifest_json, index_path, index_meta, cfg: dict, threads: int = 1):
    """(model, tokenizer, identity, datastore, index, index meta), every piece checked against the others:
    the model is the one that built the datastore, the index was built from this version of it, and it holds
    at least ``cfg['k_max']`` keys; the model takes windows of ``cfg['block_size']``, when given."""
    faiss.omp_set_num_threads(threads)
    device = cfg["device"]
    dtype = devices.model_dtype(device, cfg["dtype"])
    model, tok, ident = lm.load_checked(identity_json, device=device, dtype=dtype, block_size=cfg.get("block_size"))
    ds = Datastore(manifest_json)
    ds.check_model(ident, identity_json)
    if cfg["k_max"] > ds.rows:
        raise ValueError(f"k_max = {cfg['k_max']} exceeds the {ds.rows} keys of datastore {manifest_json}")
    index, imeta = load_index(index_path, index_meta, ds, cfg.get("nprobe"))
    index = devices.search_index(index, device, cfg["gpu_shard_above_gb"], k=cfg["k_max"])
    return model, tok, ident, ds, index, imeta


def check_not_datastore_text(tokens_npy, tokens_sha256: str, manifest: dict, manifest_json, cfg: dict) -> None:
    """Refuse to score an eval set whose tokens are the datastore's own (the same sha256 as its ``manifest``
    records, whatever the corpora are called) unless ``cfg['allow_datastore_overlap']``: every target would be a
    neighbour."""
    if tokens_sha256 == manifest.get("tokens_sha256") and not cfg.get("allow_datastore_overlap"):
        raise ValueError(
            f"{tokens_npy} is the text the datastore {manifest_json} was built from (the same tokens_sha256 "
            f"{tokens_sha256[:12]}): every target is among its neighbours. Score another text, or set the eval "
            f"set's allow_datastore_overlap: true if this is what you mean"
        )


SEARCH_BATCH = memory.SEARCH_BATCH  # queries per FAISS search call


def target_words(tok, targets) -> dict:
    """The words the scored tokens spell, by each paper's count (``lm.word_count``), for word-level perplexity."""
    return {convention: lm.word_count(tok, targets, convention) for convention in lm.WORD_COUNTS}


def retrieve(
    identity_json, manifest_json, index_path, index_meta, tokens_npy, cfg: dict, outdir, threads: int = 1,
    chunk: tuple[int, int] | None = None,
) -> dict:
    """Run the datastore's model over an eval token stream, search, and write the cache to ``outdir``. With
    ``chunk`` = (i, n): only chunk i of n (``chunk_bounds``), a partial cache that ``merge_chunks`` joins."""
    outdir = Path(outdir)
    model, tok, ident, ds, index, imeta = open_retriever(
        identity_json, manifest_json, index_path, index_meta, cfg, threads
    )
    ds.check_window(cfg["block_size"], cfg.get("datastore_stride"), "its datastores.<name>.stride")
    tokens_sha256 = sha256_file(tokens_npy)
    check_not_datastore_text(tokens_npy, tokens_sha256, ds.manifest, manifest_json, cfg)
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
            model, ident["hook_point"], tokens, a, b, cfg["block_size"], cfg["batch_size"], True, desc="queries",
            stride=cfg.get("stride"),
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
        "tokens_sha256": tokens_sha256,
        "index": imeta["factory"],
        "distances": "faiss" if imeta["exact"] else DISTANCES[distances],
        **window_record(cfg["block_size"], cfg.get("stride")),  # the eval set's windows, when strided
        "words": target_words(tok, tokens[1 : n + 1]),  # of all the scored tokens, in every chunk alike
        "seconds": {"model": round(t_model, 2), "search": round(t_search, 2)},
    }
    if chunk is not None:
        meta["chunk"] = {"index": chunk[0], "of": chunk[1], "start": a, "end": b, "scored": n}
    meta = write_cache(outdir, arrays, meta)
    log.info("retrieved %d x %d neighbours (model %.1fs, search %.1fs)", b - a, K, t_model, t_search)
    return meta



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
