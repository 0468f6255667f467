"""The datastore artifact: keys are the input of the last block's feed-forward sublayer (after its layer norm),
captured by a forward pre-hook (``forward.py`` runs the model, ``extraction.py`` writes the shards and the
manifest); values are the next token ids. A manifest records what built the shards and their sizes and sha256,
and every consumer checks it before trusting a shard. Imports numpy, not torch: the steps that read a datastore
start without it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .artifacts import (
    ArtifactError,
    load_npy,
    read_json,
    sha256_file,
    sha256_json,
    write_json,
)
from .cli import step

log = logging.getLogger(__name__)
KEY_DTYPE, VAL_DTYPE = np.float16, np.int32
IDENTITY_KEYS = ("model_sha256", "tokenizer_sha256", "hook_point")


def shard_ranges(n_tokens: int, n_shards: int, block: int) -> list[tuple[int, int]]:
    """Positions [0, n_tokens-1) in ``n_shards`` contiguous ranges whose starts are multiples of ``block``,
    so the keys do not depend on the number of shards."""
    n_pos = n_tokens - 1
    if n_pos < n_shards:
        raise ValueError(f"{n_tokens} tokens cannot fill {n_shards} shards")
    n_blocks = -(-n_pos // block)
    if n_blocks < n_shards:
        raise ValueError(f"{n_tokens} tokens make {n_blocks} blocks of {block}, fewer than {n_shards} shards")
    cuts = [min(n_pos, round(i * n_blocks / n_shards) * block) for i in range(n_shards + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(n_shards)]


def strided_windows(start: int, end: int, block: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """The model windows that score positions [start, end) (position i predicts token i+1): (context start, first,
    end), the window's input being tokens[context start:end] and its scored positions [first, end).

    ``stride`` None or ``block``: non-overlapping blocks of ``block`` positions counted from ``start``, each scored
    whole (the last position's target is the next block's first token). ``stride`` < ``block``: run_clm.py's
    sliding windows (``group_texts``; paper 1, knn-transformers): window k holds tokens [max(ks+s-B, 0), ks+s) and
    scores the targets [ks, ks+s) it holds, i.e. positions [max(ks-1, 0), ks+s-1), counted from token 0 of the
    stream whatever ``start`` is; each clipped to [start, end). Every position is scored exactly once, by the first
    window that holds it and its target, with at least B-s-1 positions of context before it."""
    if stride is None or stride == block:
        return [(a, a, min(a + block, end)) for a in range(start, end, block)]
    if not 0 < stride < block:
        raise ValueError(f"stride {stride} is not in [1, block_size = {block}]")
    out = []
    for k in range(max((start + 1) // stride - 1, 0), end // stride + 2):
        a, b = max(k * stride - 1, 0, start), min(k * stride + stride - 1, end)
        if a < b:
            out.append((max(k * stride + stride - block, 0), a, b))
    return out


def context_start(position: int, block: int, stride: int | None = None) -> int:
    """The first token the window scoring ``position`` reads (``strided_windows``; blocks counted from 0)."""
    if stride is None or stride == block:
        return position - position % block
    return strided_windows(position, position + 1, block, stride)[0][0]


def window_record(block: int, stride: int | None) -> dict:
    """What a strided datastore or retrieval cache records of its windows ({} for non-overlapping blocks, the
    record of every artifact written before strides existed): {"window": {"block_size": B, "stride": s}}."""
    return {} if stride is None or stride == block else {"window": {"block_size": block, "stride": stride}}


def token_shard_ranges(n_tokens: int, shard_tokens: int, block: int) -> list[tuple[int, int]]:
    """Positions [0, n_tokens-1) in shards of ``shard_tokens`` positions (``datastores.<name>.shard_tokens``), the
    last one shorter: shard i is [i*S, min((i+1)*S, n_pos)). The cuts do not depend on the stream's length, so a
    stream that grows at its end keeps every shard before its old last one, range and keys alike."""
    if shard_tokens <= 0 or shard_tokens % block:
        raise ValueError(f"shard_tokens {shard_tokens} is not a positive multiple of extraction.block_size {block}")
    n_pos = n_tokens - 1
    if n_pos < 1:
        raise ValueError(f"{n_tokens} tokens: no position with a next token")
    return [(a, min(a + shard_tokens, n_pos)) for a in range(0, n_pos, shard_tokens)]


def slice_sha256(tokens: np.ndarray, start: int, end: int, window: dict | None = None) -> str:
    """sha256 of the tokens a shard of positions [start, end) depends on, as int32: its keys and its values (the
    next tokens), tokens[start:end+1] (each block's context lies inside the shard, as shards start on block
    multiples); with a strided ``window`` (``window_record``) from the context start of its first window on."""
    w = (window or {}).get("window")
    first = context_start(start, w["block_size"], w["stride"]) if w else start
    return hashlib.sha256(np.ascontiguousarray(tokens[first : end + 1], dtype=VAL_DTYPE).tobytes()).hexdigest()


def shard_plan(tokens_npy, shard_tokens: int, block: int, stride: int | None = None) -> dict:
    """The shards of a ``shard_tokens`` datastore over a token file: each one's range and the sha256 of its slice
    (``slice_sha256``), which extract_keys' params carry: a shard whose slice is unchanged keeps its files."""
    tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
    ranges = token_shard_ranges(tokens.size, shard_tokens, block)
    window = window_record(block, stride)
    shards = [{"shard": i, "start": a, "end": b, "slice_sha256": slice_sha256(tokens, a, b, window)}
              for i, (a, b) in enumerate(tqdm(ranges, desc="hash shard slices", mininterval=10))]
    return {"n_tokens": int(tokens.size), "shard_tokens": shard_tokens, "block_size": block, **window,
            "shards": shards}


def check_slice(tokens: np.ndarray, shard: int, start: int, end: int, want: str, tokens_npy, fix: str,
                window: dict | None = None) -> None:
    """Refuse a shard whose token slice is not the one it was planned (or extracted) from."""
    if end > tokens.size - 1:
        raise ArtifactError(f"{tokens_npy}: shard {shard} covers positions [{start}, {end}), but the stream has "
                            f"{tokens.size} tokens (it was cut from a longer one); {fix}")
    if slice_sha256(tokens, start, end, window) != want:
        raise ArtifactError(f"{tokens_npy}: tokens {start}..{end} of shard {shard} differ from those it was "
                            f"planned or extracted from (sha256 of the slice); {fix}")



def shard_digests(keys_path, vals_path) -> dict:
    """Hashed as written, so that the manifest can refuse a shard altered between extraction and manifest."""
    return {"keys_sha256": sha256_file(keys_path), "values_sha256": sha256_file(vals_path)}


def write_shard_meta(meta_out, ident: dict, shard: int, start: int, end: int, digests: dict,
                     slice_digest: str | None = None, window: dict | None = None) -> None:
    """The shard's json: its position range, digests and the identity of the model that made it; for a
    ``shard_tokens`` datastore also the sha256 of the token slice it was extracted from (``slice_sha256``); for a
    strided one its windows (``window_record``)."""
    write_json(
        meta_out,
        {"shard": shard, "start": start, "end": end, "rows": end - start, **digests,
         **{k: ident[k] for k in IDENTITY_KEYS}, **({"slice_sha256": slice_digest} if slice_digest else {}),
         **(window or {})},
    )


def write_manifest(ident: dict, tokens_npy, shard_files: list[tuple[str, str, str]], out, extra=None) -> dict:
    """``shard_files``: (keys, vals, meta json) per shard in order. Paths are stored relative to the manifest.
    ``extra``: more top-level fields (a subsample's record of its parent), covered by the manifest's own digest."""
    out = Path(out)
    shards, rows = [], 0
    tokens = None
    first = read_json(shard_files[0][2])
    window = {"window": first["window"]} if "window" in first else {}  # every shard's alike, checked below
    for i, (keys_p, vals_p, meta_p) in enumerate(shard_files):
        meta = read_json(meta_p)
        for k in IDENTITY_KEYS:
            if meta[k] != ident[k]:
                raise ArtifactError(
                    f"{meta_p}: shard built with {k}={meta[k]}, model says {ident[k]}; rerun it"
                )
        if meta.get("window") != window.get("window"):
            raise ArtifactError(
                f"{meta_p}: shard extracted with windows {meta.get('window', 'of non-overlapping blocks')}, shard 0 "
                f"({shard_files[0][2]}) with {window.get('window', 'non-overlapping blocks')}; a datastore's keys come "
                f"from one stride: rerun extract_keys for it (snakemake --forcerun {keys_p})"
            )
        if "slice_sha256" in meta:  # a shard_tokens shard: extracted from the current token stream?
            tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1) if tokens is None else tokens
            if meta["start"] != rows:
                raise ArtifactError(f"{meta_p}: shard {meta['shard']} starts at position {meta['start']}, but the "
                                    f"shards before it end at {rows}; rerun plan_shards and extract_keys")
            check_slice(tokens, meta["shard"], meta["start"], meta["end"], meta["slice_sha256"], tokens_npy,
                        f"shard {meta['shard']} ({keys_p}) was extracted from other tokens: rerun extract_keys for it "
                        f"(snakemake --forcerun {keys_p})", window)
            if i == len(shard_files) - 1 and meta["end"] != tokens.size - 1:
                raise ArtifactError(f"{meta_p}: the last shard ends at position {meta['end']}, but {tokens_npy} "
                                    f"has {tokens.size - 1} positions; rerun plan_shards (snakemake --forcerun "
                                    f"{Path(meta_p).parent / 'plan.json'})")
        keys = load_npy(keys_p, mmap=True, dtype=KEY_DTYPE, ndim=2)
        vals = load_npy(vals_p, mmap=True, dtype=VAL_DTYPE, ndim=1)
        if keys.shape != (meta["rows"], ident["dim"]) or vals.shape != (meta["rows"],):
            raise ArtifactError(
                f"{keys_p}: shape {keys.shape}/{vals.shape}, expected ({meta['rows']}, {ident['dim']})"
            )
        digests = {"keys_sha256": sha256_file(keys_p), "values_sha256": sha256_file(vals_p)}
        for kind, path in (("keys", keys_p), ("values", vals_p)):
            if digests[f"{kind}_sha256"] != meta[f"{kind}_sha256"]:
                raise ArtifactError(
                    f"{path}: sha256 differs from the one recorded at extraction in {meta_p} (altered since); "
                    f"delete it and rerun extract_keys"
                )
        shards.append(
            {
                "keys": str(Path(keys_p).relative_to(out.parent)),
                "values": str(Path(vals_p).relative_to(out.parent)),
                "rows": meta["rows"],
                "start": meta["start"],
                "end": meta["end"],
                "keys_bytes": Path(keys_p).stat().st_size,
                "values_bytes": Path(vals_p).stat().st_size,
                **digests,
            }
        )
        rows += meta["rows"]
    manifest = {
        "model": {k: ident.get(k) for k in ("source", "path", "revision", "architecture")},
        **{k: ident[k] for k in IDENTITY_KEYS},
        "dim": ident["dim"],
        "vocab_size": ident["vocab_size"],
        "dtype": np.dtype(KEY_DTYPE).name,
        "values_dtype": np.dtype(VAL_DTYPE).name,
        "tokens_sha256": sha256_file(tokens_npy),
        "rows": rows,
        "shards": shards,
        **window,
        **(extra or {}),
    }
    manifest[SELF_DIGEST] = self_digest(manifest)
    write_json(out, manifest)
    return manifest


def manifest_hash(manifest_path) -> str:
    return sha256_json(read_json(manifest_path))


SELF_DIGEST = "self_sha256"  # the manifest's own digest: a reader tells an edited manifest from an altered shard


def self_digest(manifest: dict) -> str:
    """sha256 of the manifest's JSON (sorted keys) without its ``self_sha256`` field."""
    return sha256_json({k: v for k, v in manifest.items() if k != SELF_DIGEST})


def shard_file(manifest_path: Path, i: int, kind: str, rel) -> Path:
    """The file of shard ``i``'s ``kind`` ('keys' or 'values'), refused unless its manifest path is relative and
    stays inside the datastore directory (the manifest's), through no symbolic link below that directory."""
    base = manifest_path.parent
    where = f"manifest {manifest_path}: shard {i} {kind} path {rel!r}"
    fix = (
        f"shard files are written by extract_keys inside {base}; the manifest was edited, rewrite it "
        f"(rerun datastore_manifest: snakemake --forcerun {manifest_path})"
    )
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"{where} is not a file name; {fix}")
    if Path(rel).is_absolute():
        raise ArtifactError(f"{where} is absolute; {fix}")
    parts = Path(rel).parts
    if ".." in parts:
        raise ArtifactError(f"{where} leads outside {base} ('..'); {fix}")
    f = base
    for part in parts:
        f = f / part
        if f.is_symlink():
            raise ArtifactError(
                f"{where} is a symbolic link (to {f.readlink()}) at {f}; a shard must be a file of its own "
                f"datastore: rerun extract_keys for {base.name} (snakemake --forcerun {f})"
            )
    if not f.resolve().is_relative_to(base.resolve()):
        raise ArtifactError(f"{where} leads outside {base}; {fix}")
    return f


class Datastore:
    """A verified, memory-mapped view of a datastore's shards."""

    def __init__(self, manifest_path, deep: bool = True):
        self.path = Path(manifest_path)
        self.manifest = read_json(self.path)
        self.hash = sha256_json(self.manifest)
        self.rows = self.manifest["rows"]
        self.dim = self.manifest["dim"]
        self.offsets = np.cumsum([0] + [s["rows"] for s in self.manifest["shards"]])
        self.keys, self.vals = [], []
        kinds = (("keys", KEY_DTYPE, 2), ("values", VAL_DTYPE, 1))
        files = [  # every path checked before any file is opened
            {kind: shard_file(self.path, i, kind, s.get(kind)) for kind, _, _ in kinds}
            for i, s in enumerate(self.manifest["shards"])
        ]
        recorded = self.manifest.get(SELF_DIGEST)
        if recorded is not None and recorded != self_digest(self.manifest):
            raise ArtifactError(
                f"manifest {self.path} was edited after it was written: its contents no longer match its own "
                f"{SELF_DIGEST}, so its sizes and digests are no evidence against the shards; rewrite it (rerun "
                f"datastore_manifest: snakemake --forcerun {self.path})"
            )
        for s, paths in zip(self.manifest["shards"], files, strict=True):
            for kind, dtype, ndim in kinds:
                f = paths[kind]
                if not f.exists():
                    raise ArtifactError(
                        f"{f}: shard file missing; rerun extract_keys for {self.path.parent.name}"
                    )
                size = f.stat().st_size
                if size != s[f"{kind}_bytes"]:
                    raise ArtifactError(self._disagree(
                        f, f"{size} bytes, manifest {self.path} says {s[kind + '_bytes']}", "truncated or altered",
                        recorded is not None,
                    ))
                if deep and sha256_file(f) != s[f"{kind}_sha256"]:
                    raise ArtifactError(self._disagree(
                        f, f"sha256 differs from manifest {self.path}", "altered", recorded is not None
                    ))
                arr = load_npy(f, mmap=True, dtype=dtype, ndim=ndim)
                expect = (s["rows"], self.dim) if ndim == 2 else (s["rows"],)
                if arr.shape != expect:
                    raise ArtifactError(f"{f}: shape {arr.shape}, manifest says {expect}")
                (self.keys if kind == "keys" else self.vals).append(arr)

    def _disagree(self, f: Path, what: str, verdict: str, intact: bool) -> str:
        """A shard that disagrees with its manifest. The manifest is intact (its own digest checks out): the shard is
        the altered file, delete it. No digest of its own (an older manifest): either may have been altered."""
        if intact:
            return f"{f}: {what} ({verdict}); delete it and rerun extract_keys"
        return (
            f"{f}: {what}: the manifest and the file disagree, and the manifest may be the altered one (it has no "
            f"{SELF_DIGEST} of its own to tell); rerun extract_keys for {self.path.parent.name} "
            f"(snakemake --forcerun {f})"
        )

    def check_window(self, block: int, stride: int | None, key: str) -> None:
        """Refuse a datastore whose keys were computed in other windows than ``block``/``stride`` (config ``key``)."""
        got, want = self.manifest.get("window"), window_record(block, stride).get("window")
        if got != want:
            raise ArtifactError(
                f"datastore {self.path} was extracted with windows {got or 'of non-overlapping blocks'}, but {key} "
                f"asks for {want or f'non-overlapping blocks of {block}'}; rerun extract_keys for it (snakemake "
                f"--forcerun {self.path})"
            )

    def check_model(self, ident: dict, ident_path="model.json") -> None:
        """Refuse a model, tokenizer or hook point other than the one that built the datastore."""
        for k in IDENTITY_KEYS:
            if self.manifest[k] != ident[k]:
                raise ArtifactError(
                    f"datastore {self.path} was built with {k}={self.manifest[k]}, but "
                    f"{ident_path} has {k}={ident[k]}; rebuild the datastore or use its model"
                )

    def _gather(self, parts: list[np.ndarray], ids: np.ndarray, out: np.ndarray) -> np.ndarray:
        flat = ids.reshape(-1)
        if len(parts) == 1:
            out[:] = parts[0][flat]
            return out
        for s in range(len(parts)):  # a mask per shard's row range: no sort of the ids, no search of the offsets
            m = (flat >= self.offsets[s]) & (flat < self.offsets[s + 1])
            if m.any():
                out[m] = np.asarray(parts[s])[flat[m] - self.offsets[s]]
        return out

    def gather_keys(self, ids: np.ndarray) -> np.ndarray:
        """Keys (float32) for global row ids of any shape; shards are concatenated in manifest order."""
        out = self._gather(self.keys, ids, np.empty((ids.size, self.dim), np.float32))
        return out.reshape(*ids.shape, self.dim)

    def gather_vals(self, ids: np.ndarray) -> np.ndarray:
        return self._gather(self.vals, ids, np.empty(ids.size, np.int32)).reshape(ids.shape)


# --------------------------------------------------------------------------------------------- steps

@step
def plan_shards(params: dict, tokens: Path, out: Path) -> None:
    """Cut a ``shard_tokens`` datastore's token stream into its shards: each one's range and the sha256 of its
    token slice (--params: shard_tokens, block_size), for extract_keys' params."""
    plan = shard_plan(tokens, params["shard_tokens"], params["block_size"], params.get("stride"))
    write_json(out, plan)
    log.info("%d tokens: %d shards of up to %d positions", plan["n_tokens"], len(plan["shards"]),
             params["shard_tokens"])


@step
def verify_datastore(manifest: Path, out: Path) -> None:
    """Check a datastore as its consumers do (Datastore(deep=True): every shard's path, size and sha256 against the
    manifest, the manifest's own digest) and write a marker (--out) naming what was checked. A job before
    build_index: when the check fails, Snakemake does not start build_index, which would remove its index first."""
    ds = Datastore(manifest, deep=True)
    write_json(out, {
        "checked": "datastore", "manifest": str(manifest), "manifest_sha256": ds.hash,
        "sha256": {s[kind]: s[f"{kind}_sha256"] for s in ds.manifest["shards"] for kind in ("keys", "values")},
    })
