"""Atomic file writing, hashing and safe loading: every stage writes its outputs through these helpers.

An output appears under its final name only once it is complete (temp file in the same directory + rename),
so an interrupted job never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


class ArtifactError(RuntimeError):
    """A file on disk is missing, corrupt or does not match what its consumer expects."""


def _remove_stale_temps(path: Path, suffix: str) -> None:
    """Delete the temp files of ``path`` that a killed writer left behind (a killed job never reaches the
    ``finally`` below; its temp file, as large as the output, would stay forever). Only one job writes an
    output at a time (Snakemake locks outputs), so any earlier temp file of this very name is stale."""
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp{re.escape(suffix)}")
    for f in path.parent.glob(f".{glob.escape(path.name)}.*.tmp{glob.escape(suffix)}"):
        if stale.fullmatch(f.name):
            with contextlib.suppress(FileNotFoundError):
                f.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path}: not valid JSON ({e}); delete it and rerun the rule that makes it"
        ) from e


def save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)


def open_npy_for_writing(path, dtype, shape):
    """A writable memory map for a ``.npy`` file of known shape, at a temporary name (see ``atomic_path``).

    The file's blocks are reserved before it is returned: writing into a sparse memory-mapped file on a full
    disk kills the process with SIGBUS (no exception, temp file left behind); reserving raises ``OSError``.
    """
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        size = os.path.getsize(path)
        try:
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                del arr
                raise OSError(e.errno, f"{e.strerror} (reserving {size} bytes)", str(path)) from e
            # the file system cannot reserve space (e.g. EOPNOTSUPP): write into the sparse file as before
    return arr


def load_npy(path, *, mmap: bool = False, dtype=None, ndim: int | None = None) -> np.ndarray:
    """Load an array without pickle, checking dtype and rank; a truncated file raises ``ArtifactError``."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ArtifactError(f"{path}: unreadable or truncated .npy ({e})") from e
    if dtype is not None and arr.dtype != np.dtype(dtype):
        raise ArtifactError(f"{path}: dtype {arr.dtype}, expected {np.dtype(dtype)}")
    if ndim is not None and arr.ndim != ndim:
        raise ArtifactError(f"{path}: shape {arr.shape}, expected {ndim} dimensions")
    return arr


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


TABLE_DIGEST = "csv_sha256"  # parquet metadata key: the sha256 of the csv written beside it, which is its frame


def write_table(df, csv, parquet) -> None:
    """Write a polars frame to ``csv`` and to ``parquet``, each atomically. The parquet's metadata records the
    csv's sha256: ``read_table`` checks a parquet against it (the csv of the frame read back) and a csv too."""
    text = df.write_csv()
    with atomic_path(csv) as tmp:
        tmp.write_text(text)
    with atomic_path(parquet) as tmp:
        df.write_parquet(tmp, metadata={TABLE_DIGEST: hashlib.sha256(text.encode()).hexdigest()})


def read_table(path):
    """A table ``write_table`` wrote, as a polars frame, checked: a ``.parquet`` against the sha256 its metadata
    records, a ``.csv`` against the one its parquet (beside it) records. A truncated, edited or hand-written
    table, or a csv and parquet that disagree, raise ``ArtifactError`` naming the file."""
    import polars as pl

    path = Path(path)
    parquet = path.with_suffix(".parquet")
    rerun = f"rerun the job that writes it (snakemake --forcerun {path})"
    if not path.exists():
        raise ArtifactError(f"{path}: missing; {rerun}")
    try:
        recorded = pl.read_parquet_metadata(parquet).get(TABLE_DIGEST)
        df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    except (OSError, pl.exceptions.PolarsError) as e:
        raise ArtifactError(f"{path}: unreadable, truncated or missing beside it ({e}); {rerun}") from e
    if recorded is None:
        raise ArtifactError(f"{parquet}: no {TABLE_DIGEST} in its metadata (written by hand or by an older "
                            f"version); {rerun}")
    got = sha256_file(path) if path.suffix == ".csv" else hashlib.sha256(df.write_csv().encode()).hexdigest()
    if got != recorded:
        raise ArtifactError(
            f"{path}: its contents differ from the sha256 recorded in {parquet} when the table was written (the "
            f"file, or its csv/parquet twin, was altered since); {rerun}"
        )
    return df
