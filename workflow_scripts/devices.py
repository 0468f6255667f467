"""Which devices a job computes on: the torch device and dtype of its model, the FAISS build and the GPUs it
sees, the one line every job that uses torch or FAISS logs about them, and the refusals.

``extraction.device`` (auto | cpu | cuda) decides. ``cuda`` where torch sees no CUDA device is refused, at
start, naming the key (``cuda_refusal``; the Snakefile asks the same before any job when jobs run on this
machine). A job that runs on a GPU but whose FAISS is the CPU build (``faiss-cpu``), or sees no GPU, refuses to
search when the config says ``cuda`` and warns loudly when it says ``auto``, instead of searching on the CPU
without a word. torch and faiss are imported inside the functions: the Snakefile imports this module while it
builds the DAG, which imports neither.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

log = logging.getLogger(__name__)

KEY = "extraction.device"
# GPU IVFPQ keeps a lookup table of m * 2**nbits floats per query in shared memory (48 KiB on every card):
# larger tables need float16 lookup tables (GpuClonerOptions.useFloat16)
GPU_SHARED_MEMORY = 48 * 1024
# FAISS's GPU indexes return at most this many neighbours per query (GPU k-selection)
GPU_MAX_K = 2048


class DeviceError(RuntimeError):
    """A device the config asks for is not there, or a GPU job would search on the CPU."""


# --------------------------------------------------------------------------------------------- torch
def cuda_refusal(requested: str, key: str = KEY) -> str | None:
    """Why ``requested`` cannot run on this machine, or None when it can: only ``cuda`` with no CUDA device
    visible to torch is refused."""
    if requested != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is a CPU build"
    else:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        why = f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU" + (
            f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        )
    return (
        f"{key}: cuda, but {why} on {socket.gethostname()}. Run on a GPU node (on Slurm the GPU rules ask for "
        f"one: docs/cluster.md), install the CUDA build (./install.sh --gpu), or set {key} to auto (a GPU when "
        "there is one, else the CPU) or cpu"
    )


def torch_device(requested: str = "auto", key: str = KEY):
    """The torch device for ``extraction.device`` = ``requested``: ``auto`` is cuda when torch sees a GPU, else
    cpu; ``cuda`` without one raises ``DeviceError`` naming ``key``."""
    import torch

    msg = cuda_refusal(requested, key)
    if msg:
        raise DeviceError(msg)
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def model_dtype(requested: str, dtype: str) -> str:
    """The dtype keys and queries are computed in for ``extraction.device`` = ``requested`` and
    ``extraction.dtype`` = ``dtype``: ``dtype`` wherever a GPU may run the model (``torch_dtype`` turns it into
    float32 on the CPU), the same for extraction and retrieval, so that keys and queries have one precision."""
    return "float32" if requested == "cpu" else dtype


def torch_dtype(device, requested: str = "float32") -> str:
    """float16 only on a GPU: a CPU job computes in float32 whatever was asked."""
    return requested if getattr(device, "type", device) == "cuda" else "float32"


# --------------------------------------------------------------------------------------------- FAISS
def faiss_gpus() -> int:
    """GPUs FAISS can use: 0 for the CPU build (faiss-cpu), where none is visible, or without FAISS."""
    try:
        import faiss
    except ImportError:
        return 0

    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        return 0
    return int(faiss.get_num_gpus())


def faiss_build() -> str:
    """'FAISS 1.15.1, CPU build' or 'FAISS 1.15.1, GPU build, 2 GPUs visible' (or 'FAISS not installed')."""
    try:
        import faiss
    except ImportError:
        return "FAISS not installed"

    if not hasattr(faiss, "StandardGpuResources"):
        return f"FAISS {faiss.__version__}, CPU build"
    n = faiss_gpus()
    return f"FAISS {faiss.__version__}, GPU build, {n} GPU{'s' if n != 1 else ''}" + (" visible" if n else "")


def describe(device=None, dtype: str | None = None) -> str:
    """The line a job logs at start: its torch device and dtype (or that it runs no model) and the FAISS build."""
    if device is None:
        part = "torch: no model"
    else:
        import torch

        part = f"torch {torch.__version__} on {device}, {dtype}"
        if getattr(device, "type", device) == "cuda":
            part += f" ({torch.cuda.get_device_name(device)}, {torch.cuda.device_count()} visible)"
    return f"devices: {part}; {faiss_build()}"


def log_devices(device=None, dtype: str | None = None) -> str:
    line = describe(device, dtype)
    log.info("%s", line)
    return line


def index_bytes(index) -> int:
    """What an index's vectors occupy: codes (and ids, for an inverted file) of every stored vector."""
    import faiss

    per = index.sa_code_size()
    if faiss.try_extract_index_ivf(index) is not None:
        ivf = faiss.extract_index_ivf(index)
        per = ivf.code_size + 8  # sa_code_size also counts the list number; the lists store a 64-bit id
    return int(index.ntotal) * int(per)


def cloner_options(index, shard: bool):
    """GpuMultipleClonerOptions for searching ``index`` on several GPUs: ``shard`` splits the vectors across
    them (each GPU holds 1/n, every query visits all), else each GPU holds a replica and takes 1/n of the
    queries. An IVFPQ whose float32 lookup tables exceed a GPU's shared memory gets float16 tables; a flat
    index stays float32 (its distances are exact)."""
    import faiss

    co = faiss.GpuMultipleClonerOptions()
    co.shard = bool(shard)
    ivf = faiss.try_extract_index_ivf(index)
    pq = getattr(faiss.downcast_index(ivf), "pq", None) if ivf is not None else None
    if pq is not None and pq.M * (1 << pq.nbits) * 4 > GPU_SHARED_MEMORY:
        co.useFloat16 = True
    return co


def _gpu_job() -> bool:
    """Whether this job runs on a GPU (torch sees one): where a CPU search is worth a warning."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def search_index(index, requested: str, shard_above_gb: float, k: int | None = None, key: str = KEY):
    """The index to search for ``k`` neighbours: moved to every GPU FAISS sees (sharded when it holds more than
    ``shard_above_gb`` GB, replicated below), or the CPU index unchanged (``requested`` cpu, or no GPU). A GPU
    job whose FAISS cannot use a GPU raises ``DeviceError`` when ``requested`` is cuda and warns when it is
    auto; an index the GPU implementation refuses (e.g. IVFPQ with nbits other than 8), or a ``k`` above what
    a GPU search returns (``GPU_MAX_K``), is searched on the CPU, with a warning."""
    if requested == "cpu":
        return index
    if not hasattr(index, "this"):  # not a FAISS index: index.ShardedFlat, the exact search over the keys on disk
        log.info("exact search over the datastore's keys, range by range, on the CPU")
        return index
    n = faiss_gpus()
    if n == 0:
        if requested == "cuda" or _gpu_job():
            msg = (
                f"{faiss_build()}: this job runs its model on a GPU but would search on the CPU. Install the "
                f"GPU build of FAISS (./install.sh --gpu installs faiss-gpu instead of faiss-cpu)"
            )
            if requested == "cuda":
                raise DeviceError(f"{key}: cuda, but {msg}, or set {key}: auto to accept a CPU search")
            log.warning("!!! %s; searching on the CPU (%s: auto) !!!", msg, key)
        return index
    if k is not None and k > GPU_MAX_K:
        log.warning("!!! k_max = %d exceeds the %d neighbours a FAISS GPU search returns; searching on the CPU !!!",
                    k, GPU_MAX_K)
        return index
    import faiss

    size = index_bytes(index)
    shard = n > 1 and size > shard_above_gb * 1e9
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=cloner_options(index, shard))
    except RuntimeError as e:
        log.warning("!!! FAISS cannot search this index on a GPU (%s); searching on the CPU !!!", e)
        return index
    log.info("index (%.2f GB) on %d GPU%s, %s", size / 1e9, n, "s" if n > 1 else "",
             "sharded" if shard else "replicated" if n > 1 else "whole")
    return gpu_index


@contextmanager
def training_on_gpus(index):
    """Within the block, an inverted-file index trains its coarse quantizer's k-means on every GPU FAISS sees
    (FAISS's ``clustering_index``); the index stays a CPU index, so the rest of training, the adds and the file
    written are the CPU path's. Nothing changes on the CPU build or without a GPU."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None or faiss_gpus() == 0:
        yield False
        return
    ivf.clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
    try:
        yield True
    finally:
        ivf.clustering_index = None
