"""Index stages at scale on synthetic keys: ``python benchmarks/index_scale.py [--sizes 1M 4M 16M]`` from the root.

Keys are drawn from a Gaussian mixture of the default dimension (128; 256 centres), written as float16 datastore
shards of a fixed size (``--shard-rows``, 500K) with a manifest (``datastore.write_manifest``), so that no model is
needed. Each stage then runs as the pipeline runs it, one process per job (``python -m workflow_scripts
train-index | add-shard | merge-index``), and a search process loads the merged index (``index.load_index``: its
inverted lists memory-mapped) and searches ``--queries`` queries from the same mixture at a fixed nprobe.
nlist grows with N (N / 1000, a power of two), so the lists keep about 1000 keys each, unless ``--nlist`` fixes it
(then the build's cost is linear in N). Per job: wall time and
peak RSS (the child's own, from GNU ``time``). Results: a table on stdout and ``benchmarks/index_scale.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workflow_scripts.artifacts import open_npy_for_writing, save_npy  # noqa: E402
from workflow_scripts.datastore import shard_digests, write_manifest, write_shard_meta  # noqa: E402

DIM, CENTRES, THREADS = 128, 256, 2
IDENT = {"model_sha256": "synthetic", "tokenizer_sha256": "synthetic", "hook_point": "synthetic", "dim": DIM,
         "vocab_size": 1, "source": "synthetic", "path": "", "revision": None, "architecture": "none"}
OUT = Path(__file__).resolve().parent


def parse_size(s: str) -> int:
    s = s.upper()
    return int(float(s[:-1]) * {"K": 1e3, "M": 1e6}[s[-1]]) if s[-1] in "KM" else int(s)


def mixture(rng, centres, n: int) -> np.ndarray:
    return (centres[rng.integers(0, len(centres), n)] + rng.normal(size=(n, DIM)).astype(np.float32)).astype(
        np.float16
    )


def make_datastore(d: Path, n: int, shard_rows: int, centres) -> Path:
    """Shards of ``shard_rows`` float16 keys (the last one shorter), values all 0, and their manifest."""
    rng = np.random.default_rng(n)
    save_npy(d / "tokens.npy", np.zeros(n + 1, np.int32))
    files = []
    for s, a in enumerate(range(0, n, shard_rows)):
        b = min(a + shard_rows, n)
        k, v, m = (d / "shards" / f"{kind}_{s:03d}.{ext}" for kind, ext in
                   (("keys", "npy"), ("vals", "npy"), ("shard", "json")))
        k.parent.mkdir(parents=True, exist_ok=True)
        keys = open_npy_for_writing(k, np.float16, (b - a, DIM))
        for i in range(0, b - a, 1 << 18):
            keys[i : i + (1 << 18)] = mixture(rng, centres, min(1 << 18, b - a - i))
        keys.flush()
        del keys
        save_npy(v, np.zeros(b - a, np.int32))
        write_shard_meta(m, IDENT, s, a, b, shard_digests(k, v))
        files.append((str(k), str(v), str(m)))
    write_manifest(IDENT, d / "tokens.npy", files, d / "manifest.json")
    return d / "manifest.json"


def job(argv: list[str]) -> tuple[float, float, str]:
    """Run one process; (wall seconds, its peak RSS in MiB, its stdout). The peak comes from GNU time, whose own
    child is forked from a small process: Linux carries a process's RSS high-water mark over fork and exec, so a
    child forked from this (large) process would report this process's peak as its own."""
    t = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], cwd=ROOT, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv[:4])} failed:\n{proc.stderr[-3000:]}")
        peak_kb = int(rss.read().split()[-1])
    return time.perf_counter() - t, peak_kb / 1024, proc.stdout


def step(name: str, *args: str) -> tuple[float, float]:
    secs, rss, _ = job([sys.executable, "-m", "workflow_scripts", name, "--threads", str(THREADS), *args])
    return secs, rss


def search_child(args: dict) -> dict:
    """In a fresh process: load the merged index (lists memory-mapped) and time ``index.search`` of the queries."""
    import faiss

    from workflow_scripts.datastore import Datastore
    from workflow_scripts.index import load_index

    faiss.omp_set_num_threads(THREADS)
    d = Path(args["dir"])
    index, _ = load_index(d / "index.faiss", d / "index.json", Datastore(d / "manifest.json", deep=False),
                          args["nprobe"])
    q = np.load(args["queries"]).astype(np.float32)
    index.search(q[:64], args["k"])  # warm-up
    t = time.perf_counter()
    _, ids = index.search(q, args["k"])
    secs = time.perf_counter() - t
    return {"seconds": secs, "found": float((ids >= 0).mean())}


def run_size(tmp: Path, n: int, a) -> list[dict]:
    centres = np.random.default_rng(0).normal(size=(CENTRES, DIM)).astype(np.float32) * 2
    d = tmp / f"n{n}"
    t = time.perf_counter()
    manifest = make_datastore(d, n, a.shard_rows, centres)
    t_data = time.perf_counter() - t
    shards = json.loads(manifest.read_text())["shards"]
    nlist = a.nlist or 1 << max(4, round(np.log2(n / 1000)))
    cfg = {"type": "IVFPQ", "nlist": nlist, "m": a.m, "nbits": 8, "nprobe": a.nprobe,
           "train_sample": min(n, 39 * nlist), "polysemous": False}
    ix = d / "index"
    rows = []

    def rec(stage, secs, rss, items):
        rows.append({"keys": n, "nlist": nlist, "stage": stage, "seconds": round(secs, 2),
                     "items_per_s": round(items / secs) if secs else "", "peak_rss_mb": round(rss),
                     "keys_mb": round(n * DIM * 2 / 2**20)})
        print(f"[{time.strftime('%H:%M:%S')}] {n:>9d} keys {stage:12s} {secs:8.1f} s  peak RSS {rss:7.0f} MiB",
              flush=True)

    rec("data", t_data, 0, n)
    secs, rss = step("train-index", "--params", json.dumps({"index": cfg, "seed": 0}), "--manifest", str(manifest),
                     "--index", str(ix / "trained.faiss"), "--index-meta", str(ix / "trained.json"))
    rec("train_index", secs, rss, cfg["train_sample"])
    worst, total = 0.0, 0.0
    for s in range(len(shards)):
        secs, rss = step("add-shard", "--trained", str(ix / "trained.faiss"), "--trained-meta",
                         str(ix / "trained.json"), "--keys", str(d / "shards" / f"keys_{s:03d}.npy"),
                         "--shard-meta", str(d / "shards" / f"shard_{s:03d}.json"),
                         "--part", str(ix / f"part_{s:03d}.faiss"), "--part-meta", str(ix / f"part_{s:03d}.json"))
        worst, total = max(worst, rss), total + secs
    rec(f"add_shard x{len(shards)}", total, worst, n)
    parts = [str(ix / f"part_{s:03d}.faiss") for s in range(len(shards))]
    metas = [str(ix / f"part_{s:03d}.json") for s in range(len(shards))]
    secs, rss = step("merge-index", "--params", json.dumps({"index": cfg}), "--manifest", str(manifest),
                     "--index", str(d / "index.faiss"), "--index-meta", str(d / "index.json"),
                     "--trained", str(ix / "trained.faiss"), "--trained-meta", str(ix / "trained.json"),
                     "--parts", *parts, "--part-metas", *metas)
    rec("merge_index", secs, rss, n)
    for p in ix.glob("part_*.faiss"):
        p.unlink()  # the parts are not needed by search; free the disk for the next size
    save_npy(d / "queries.npy", mixture(np.random.default_rng(1), centres, a.queries))
    child = {"dir": str(d), "queries": str(d / "queries.npy"), "nprobe": a.nprobe, "k": a.k}
    secs, rss, out = job([sys.executable, __file__, "--child", json.dumps(child)])
    r = json.loads(out.strip().splitlines()[-1])
    rec(f"search nprobe {a.nprobe}", r["seconds"], rss, a.queries)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["1M", "4M"], help="datastore sizes in keys (16M: see README)")
    p.add_argument("--shard-rows", type=int, default=500_000)
    p.add_argument("--m", type=int, default=16, help="PQ sub-quantizers (code bytes)")
    p.add_argument("--nlist", type=int, help="one nlist for every size (default: N / 1000, a power of two)")
    p.add_argument("--nprobe", type=int, default=16)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(search_child(json.loads(a.child))))
        return
    load0, t0, rows = os.getloadavg()[0], time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="knnlm-index-scale-", dir=os.environ.get("TMPDIR")) as tmp:
        for s in a.sizes:
            rows += run_size(Path(tmp), parse_size(s), a)
    load1 = os.getloadavg()[0]
    print(f"\nwall {time.perf_counter() - t0:.0f} s, load average (1 min) start {load0:.1f}, end {load1:.1f}")
    cols = list(rows[0])
    print("  ".join(cols))
    for r in rows:
        print("  ".join(str(r[c]) for c in cols))
    with (OUT / "index_scale.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
