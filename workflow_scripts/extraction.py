"""A datastore's extraction: one shard of keys (the model run over its slice of the token stream with the key hook,
``forward.run_model``) and its values, streamed to disk (``extract_keys``), and the manifest over the shards with
the model's identity (``manifest``). The artifact itself, its checks and its plan are ``datastore.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .artifacts import atomic_path, load_npy, open_npy_for_writing
from .cli import step
from .datastore import (
    KEY_DTYPE,
    VAL_DTYPE,
    check_slice,
    shard_digests,
    shard_ranges,
    window_record,
    write_manifest,
    write_shard_meta,
)
from .forward import run_model

log = logging.getLogger(__name__)


def extract_shard(
    model,
    ident: dict,
    tokens_npy,
    shard: int,
    n_shards: int,
    block: int,
    batch: int,
    keys_out,
    vals_out,
    meta_out,
    span: dict | None = None,
    stride: int | None = None,
) -> int:
    """Extract shard ``shard`` of ``n_shards`` equal ranges (``shard_ranges``), or with ``span`` (a
    ``shard_plan`` entry: start, end, slice_sha256) that range, its token slice checked against the plan. With
    ``stride``, each key is computed in the sliding window that scores its position (``strided_windows``)."""
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    if span is None:
        a, b = shard_ranges(tokens.size, n_shards, block)[shard]
        digest = None
    else:
        a, b, digest = span["start"], span["end"], span["slice_sha256"]
        check_slice(tokens, shard, a, b, digest, tokens_npy,
                    "the shard plan is stale: rerun plan_shards (snakemake --forcerun "
                    f"{Path(meta_out).parent / 'plan.json'})", window_record(block, stride))
    n, d = b - a, ident["dim"]
    log.info("shard %d: positions [%d, %d), %d keys", shard, a, b, n)
    with atomic_path(keys_out, ".npy") as ktmp, atomic_path(vals_out, ".npy") as vtmp:
        keys = open_npy_for_writing(ktmp, KEY_DTYPE, (n, d))
        vals = open_npy_for_writing(vtmp, VAL_DTYPE, (n,))
        vals[:] = tokens[a + 1 : b + 1]
        for first, k, _ in run_model(
            model,
            ident["hook_point"],
            tokens,
            a,
            b,
            block,
            batch,
            False,
            desc=f"extract shard {shard}" + (f"/{n_shards}" if n_shards else f" [{a}, {b})"),
            stride=stride,
        ):
            keys[first - a : first - a + len(k)] = k.astype(KEY_DTYPE)
        keys.flush()
        vals.flush()
        del keys, vals
        digests = shard_digests(ktmp, vtmp)
    write_shard_meta(meta_out, ident, shard, a, b, digests, slice_digest=digest, window=window_record(block, stride))
    return n


@step
def extract_keys(
    params: dict, model_json: Path, tokens: Path, keys: Path, vals: Path, meta: Path, threads: int = 1
) -> None:
    """Extract one key/value shard of a datastore, streamed to disk."""
    from .devices import model_dtype
    from .lm import load_checked, torch_threads

    torch_threads(threads)
    device = params["device"]
    dtype = model_dtype(device, params["dtype"])
    model, _, ident = load_checked(model_json, device=device, dtype=dtype, block_size=params["block_size"])
    extract_shard(
        model, ident, tokens, params["shard"], params.get("shards"), params["block_size"], params["batch_size"],
        keys, vals, meta, span=params.get("span"), stride=params.get("stride"),
    )


@step
def manifest(model_json: Path, tokens: Path, keys: list[Path], vals: list[Path], meta: list[Path], out: Path) -> None:
    """Write a datastore's manifest from its shards (sizes, sha256, model identity), checking each shard."""
    from .lm import load_identity

    write_manifest(load_identity(model_json), tokens, list(zip(keys, vals, meta, strict=True)), out)
