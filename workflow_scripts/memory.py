"""Memory planning: each heavy job's peak memory estimated from the manifest (rows, dim, shard sizes), the index
config (code size, nlist) and K, before it runs. The rules ask the scheduler for it (``mem_mb`` callables in
rules/*.smk, re-evaluated by Snakemake right before a job is scheduled, once its inputs exist), and the job prints
it in its log and stops at once, naming the estimate and the config key to change, when its machine or allocation
has less memory than that (instead of being killed for memory halfway through).

Pure Python (json, os): the Snakefile imports it to build the DAG.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import struct
from pathlib import Path

log = logging.getLogger(__name__)


class NotEnoughMemory(ValueError):
    """The job's estimate exceeds what its machine or allocation has: stopped before it starts."""


MiB = 1 << 20
BASE_MB = 1500  # python, torch/faiss libraries, BLAS buffers: what a step holds before its data
ADD_ROWS = 1 << 18  # index.ADD_ROWS: keys converted to float32 at a time when adding
RANGE_BYTES = 256 << 20  # index.RANGE_BYTES: float32 keys held at a time by the sharded exact search
SEARCH_BATCH = 1024  # queries searched at a time (index.search)
PRECOMPUTED_TABLE_MAX = 2 << 30  # FAISS's precomputed_table_max_bytes: a larger IVFPQ table is not built


def chunk_unit(cfg: dict) -> int:
    """Chunks of an eval set start on multiples of this many positions: whole model batches (``batch_size`` windows
    of ``block_size``, whose context resets every block) and whole search batches, so that every forward pass and
    every FAISS call of a chunk is one of the one-job run's, and the chunks' cache is that run's, byte for byte."""
    return math.lcm(cfg["block_size"] * cfg["batch_size"], cfg.get("search_batch") or SEARCH_BATCH)


def chunk_bounds(n: int, chunks: int, unit: int) -> list[tuple[int, int]]:
    """Positions [0, n) in ``chunks`` contiguous ranges cut on multiples of ``unit`` (some of them empty when
    there are fewer units than chunks)."""
    units = -(-n // unit)
    cuts = [min(n, round(i * units / chunks) * unit) for i in range(chunks + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(chunks)]


TASK_BLOCK_BATCHES = 8  # a task is scored in blocks of this many batches (tasks.batch_size) of items
TOKEN_ROW_BYTES = 24  # a task cache's per-token row: t_pair, t_row (int64), t_target (int32), t_lm (float32)


def task_block(cfg: dict) -> int:
    """Items per block of a task: each block is scored on its own (its pairs forwarded in its own batches, its
    queries searched in its own calls, its decoding batched within it), so that a chunk of whole blocks does
    every forward pass and FAISS call the one-job run does, and the chunks' caches join into that run's."""
    return TASK_BLOCK_BATCHES * cfg["batch_size"]


def task_queries(items: list[dict], cfg: dict, count_pairs=None) -> tuple[int, int]:
    """(rows kept to the end of the job, most rows held by one block) for scoring ``items`` with the params
    ``cfg`` of score_task. Teacher-forced pairs: their scored tokens (at least their distinct queries), counted
    by ``count_pairs(block items)`` (the step tokenizes them), else bounded without a tokenizer by each distinct
    continuation's UTF-8 bytes + 1 (a byte-level BPE or sentencepiece piece covers at least a byte, plus a
    leading space piece; about 4x the tokens of English text); last-token classification, its distinct premises;
    generate, prompts x new tokens x points decoded with the kNN (searched per block, nothing kept)."""
    entry, block = cfg["entry"], task_block(cfg)
    per_block = []
    for a in range(0, len(items), block):
        chunk = items[a : a + block]
        if entry.get("protocol") == "last_token":
            n = len({t for it in chunk for t in (it["premise"], it.get("domain_premise")) if t is not None})
        elif entry["kind"] == "generate":
            g = cfg.get("generate") or {}
            grid = cfg.get("grid") or {}
            points = 1 + (len(grid.get("lambdas", ())) * len(grid.get("ks", ())) * len(grid.get("sigmas", ())))
            new = int(entry.get("max_new_tokens") or g["max_new_tokens"])
            n = len(chunk) * new * (points if g.get("points") == "grid" else 1)
        elif count_pairs is not None:
            n = count_pairs(chunk)
        else:
            pairs = {tuple(pair) for it in chunk for opt in (it["options"] + (it.get("domain") or [])) for pair in opt}
            n = sum(len(cont.encode()) + 1 for _, cont in pairs)
        per_block.append(n)
    kept = 0 if entry["kind"] == "generate" else sum(per_block)
    return kept, max(per_block, default=0)


def task_join_rows(items: list[dict], cfg: dict, chunks: int) -> int:
    """Rows (``task_queries``) of the largest of a task's chunks: the job joining them holds one array of one
    chunk at a time."""
    return max(task_queries(items[a:b], cfg)[0] for a, b in chunk_bounds(len(items), chunks, task_block(cfg)))


def code_bytes(cfg: dict) -> int:
    """Bytes per key in an IVFPQ inverted list: its PQ code and its 8-byte id."""
    return -(-cfg["m"] * cfg["nbits"] // 8) + 8


def search_config(index_meta: dict, distances: str) -> dict:
    """The index config that a search's plan reads, off a built index's meta (index.json: ``exact``, ``factory``)."""
    if index_meta["exact"]:
        return {"type": "Flat", "distances": distances}
    nlist, m, nbits = map(int, re.fullmatch(r"IVF(\d+),PQ(\d+)x(\d+)", index_meta["factory"]).groups())
    return {"type": "IVFPQ", "distances": distances, "nlist": nlist, "m": m, "nbits": nbits}


def _search_parts(cfg: dict, k_max: int, d: int, rows: int) -> dict:
    """What a search holds beside its results: one batch of candidates, the gathered keys of an exact re-rank
    (IVFPQ), one range of keys (sharded Flat)."""
    ivf = cfg["type"] != "Flat"
    return {
        "IVFPQ precomputed distance table": (
            min(cfg["nlist"] * cfg["m"] * (1 << cfg["nbits"]) * 4, PRECOMPUTED_TABLE_MAX) if ivf else 0
        ),
        "one search batch (candidates, merge)": SEARCH_BATCH * k_max * 12 * 3,
        "exact re-rank: gathered float32 keys": (
            SEARCH_BATCH * k_max * d * 4 if ivf and cfg.get("distances") == "exact" else 0
        ),
        "one range of float32 keys (sharded Flat)": 0 if ivf else min(rows * d * 4, RANGE_BYTES),
    }


def estimate_mb(
    rule: str, manifest: dict | None, cfg: dict, k_max: int = 0, n_queries: int = 0, task: dict | None = None
) -> tuple[int, str]:
    """(MiB, what it counts) for one job of ``rule``. Without a manifest (the DAG is built before the datastore
    exists), a placeholder of BASE_MB; Snakemake asks again before it schedules the job.

    ``score_task`` / ``score_task_chunk``: ``n_queries`` bounds the query and token rows the job keeps to its end
    (``task_queries``), ``task`` says the rest: ``block_queries`` (rows of one block, held while it is scored),
    ``window`` (tasks' block_size), ``batch``, ``vocab``, ``device``; ``model: False`` for the job joining chunks,
    which only holds the chunks' arrays and their join."""
    if manifest is None:
        return BASE_MB, "placeholder until the manifest exists"
    d, rows = manifest["dim"], manifest["rows"]
    shard = max(s["rows"] for s in manifest["shards"])
    ivf = cfg["type"] != "Flat"
    if rule == "train_index":
        n = min(rows, cfg.get("train_sample", 0)) if ivf else 0
        parts = {"float32 sample x3 (sample, k-means, PQ training)": 3 * n * d * 4,
                 "centroids": cfg.get("nlist", 0) * d * 4}
    elif rule == "add_shard":
        parts = {"float32 chunk of keys": min(shard, ADD_ROWS) * d * 4,
                 "codes + ids of the largest shard x2 (growth, write)": 2 * shard * code_bytes(cfg) if ivf else 0}
    elif rule == "merge_index":
        parts = {"list sizes and offsets": 64 * cfg.get("nlist", 0)}  # the lists themselves are memory-mapped
    elif rule == "retrieve":
        parts = {"cache arrays (dists, vals, ids, float16 queries)": n_queries * (k_max * 16 + d * 2)}
        parts |= _search_parts(cfg, k_max, d, rows)
    elif rule in ("score_task", "score_task_chunk"):
        t = task or {}
        if not t.get("model", True):  # the job joining chunks: one chunk's member at a time, and its shifted copy
            parts = {"one chunk's largest array (int64 ids) x2 (read, shifted)": 2 * n_queries * max(k_max, 1) * 8}
        else:
            window, nb = t.get("window", 0), t.get("block_queries", 0)
            parts = {"cache arrays kept to the end (dists, vals, ids, float16 keys, token rows)":
                     n_queries * (k_max * 16 + d * 2 + TOKEN_ROW_BYTES)}
            parts |= _search_parts(cfg, k_max, d, rows)
            parts["one block: its search results x2 (copies), prefixes, per-token lists"] = (
                nb * (k_max * 32 + 8 * window + 256)
            )
            if t.get("device") != "cuda":  # on a GPU the logits stay in its memory
                parts["one forward batch's float32 logits"] = t.get("batch", 0) * window * t.get("vocab", 0) * 4
    else:
        raise ValueError(f"no memory plan for rule {rule}")
    mb = BASE_MB + sum(parts.values()) // MiB
    what = ", ".join(f"{k} {v // MiB} MiB" for k, v in parts.items() if v) or "libraries only"
    return int(mb), f"{BASE_MB} MiB base + {what}"


def read_manifest(path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def npy_rows(path) -> int:
    """The first dimension of a .npy file, read off its header (any format version, without numpy)."""
    with open(path, "rb") as f:
        magic = f.read(8)
        if magic[:6] != b"\x93NUMPY":
            raise ValueError(f"{path}: not a .npy file")
        size = struct.unpack("<H" if magic[6] == 1 else "<I", f.read(2 if magic[6] == 1 else 4))[0]
        shape = ast.literal_eval(f.read(size).decode("latin1"))["shape"]
    return shape[0] if shape else 1


def available_mb() -> tuple[int, str]:
    """The memory this job may use, in MiB, and where that comes from: Slurm's allocation, the cgroup's limit, or the
    machine's total."""
    if os.environ.get("SLURM_MEM_PER_NODE"):
        return int(os.environ["SLURM_MEM_PER_NODE"]), "SLURM_MEM_PER_NODE"
    if os.environ.get("SLURM_MEM_PER_CPU") and os.environ.get("SLURM_CPUS_ON_NODE"):
        return int(os.environ["SLURM_MEM_PER_CPU"]) * int(os.environ["SLURM_CPUS_ON_NODE"]), "SLURM_MEM_PER_CPU"
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = Path(f).read_text().strip()
        except OSError:
            continue
        if v.isdigit() and int(v) < 1 << 60:
            return int(v) // MiB, f
    with open("/proc/meminfo") as fh:
        total = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    return total // 1024, "/proc/meminfo MemTotal"


def check(
    rule: str, manifest: dict, cfg: dict, key: str, k_max: int = 0, n_queries: int = 0, task: dict | None = None
) -> int:
    """Log the job's estimate; stop with one line naming it and ``key`` (the config key that lowers it) when the
    machine or allocation has less."""
    mb, what = estimate_mb(rule, manifest, cfg, k_max, n_queries, task)
    have, source = available_mb()
    log.info("memory plan for %s: about %d MiB (%s); %d MiB available (%s)", rule, mb, what, have, source)
    if mb > have:
        raise NotEnoughMemory(
            f"{rule} needs about {mb} MiB ({what}), but this machine or allocation has {have} MiB ({source}); "
            f"lower {key}, or give the job more memory (snakemake --set-resources {rule}:mem_mb={mb})"
        )
    return mb
