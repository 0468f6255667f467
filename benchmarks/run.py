"""Performance benchmarks of the kNN-LM pipeline: ``python benchmarks/run.py [--quick]`` from the project root.

Everything runs on synthetic inputs built here, in a temporary directory: a randomly initialised GPT-2 of the
default shape, Zipf-distributed token streams, datastores written by ``extract_shard`` + ``write_manifest``.
Each target is a ratio of two timings taken in the same run (both warmed up once), so a slower or busier
machine moves both sides. Wall time and peak memory per stage come from subprocesses (this file, ``--child``),
whose peak RSS is reset (``/proc/self/clear_refs``) after setup so that it covers the timed stage only.
Results: a table on stdout, ``benchmarks/results.csv`` and ``benchmarks/scale.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from workflow_scripts import cli, datastore, forward, index, job_environment, knnlm, lm, retrieval_cache  # noqa: E402
from workflow_scripts.artifacts import save_npy, write_json  # noqa: E402
from workflow_scripts.extraction import extract_shard  # noqa: E402

THREADS, VOCAB, BLOCK, BATCH, K, SHARDS = 2, 2048, 128, 32, 2048, 2
GEN_THREADS = 1  # measure 7 (greedy decoding of one prompt): see generate_decoding
GRID = {"lambdas": [0.1, 0.2, 0.3], "ks": [1600, 2048], "sigmas": [1, 3, 5, 10]}  # paper 1: 24 points
# sizes: datastore sizes in tokens for the scale curve (5; the last two are S and 2S for measure 2);
# ratio_size: the datastore (one of sizes) that measures 1, 3 and 4 use; queries: eval queries for measures
# 1, 3 and the IVFPQ perplexity; scale_queries: queries per search stage of the scale curve (exact search
# costs O(N) per query); recall_queries: queries for the recall of measure 4; extract: tokens for measure 2;
# ivfpq: the IVFPQ index's shape. Full mode takes about 25 minutes on 2 busy cores.
MODES = {
    "full": {
        "sizes": [250_000, 1_000_000, 2_000_000],
        "ratio_size": 1_000_000,
        "queries": 512,
        "scale_queries": 256,
        "recall_queries": 512,
        "extract": 32_768,
        "ivfpq": {"nlist": 256, "m": 16, "nbits": 8, "nprobe": 16, "train_sample": 20_000},
        "task_items": 8,
        "generate": {"prompt": 1000, "new": 512, "keys": 65_536},
        "small_call_keys": 524_288,
        "pair": {"tokens": 1_000_000, "queries": 2048},
        "rescore_items": 1200,
        "freed": 262_144,
    },
    "quick": {
        "sizes": [8_192, 16_384, 32_768],
        "ratio_size": 32_768,
        "queries": 256,
        "scale_queries": 256,
        "recall_queries": 128,
        "extract": 8_192,
        "ivfpq": {"nlist": 32, "m": 16, "nbits": 6, "nprobe": 16, "train_sample": 4_096},
        "task_items": 4,
        "generate": {"prompt": 1000, "new": 64, "keys": 16_384},
        "small_call_keys": 65_536,
        "pair": {"tokens": 32_768, "queries": 4096},
        "rescore_items": 300,
        "freed": 65_536,
    },
}
OUT = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ helpers
def perf(fn, *args, repeat: int = 1, **kw):
    """(best wall time over ``repeat`` calls, last result)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn(*args, **kw)
        best = min(best, time.perf_counter() - t)
    return best, out


def best_of(fns: dict, repeat: int = 3) -> dict:
    """Best wall time of each function, the calls interleaved round-robin so that a change in the machine's
    load during the measure hits every function alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best


def proc_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> float:
    """Reset this process's peak RSS (VmHWM) to its current RSS; return that RSS in MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak also covers the setup before the timed stage
    return proc_mb("VmRSS")


def row(measure, value, target="", ok=None):
    status = "info" if ok is None else ("pass" if ok else "FAIL")
    return {
        "measure": measure,
        "value": f"{value:.3g}" if isinstance(value, float) else value,
        "target": target,
        "status": status,
    }


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def search_and_write(idx, ds, queries, exact: bool, outdir: Path, extra: dict) -> None:
    """index.search, then the cache written by ``retrieval_cache.write_cache``, as ``retrieval.retrieve`` does
    (each array saved and hashed, then meta.json)."""
    dists, ids = index.search(idx, ds, queries, K, exact=exact)
    retrieval_cache.write_cache(outdir, {**extra, "dists": dists, "vals": ds.gather_vals(ids), "ids": ids}, {})


# ------------------------------------------------------------------------------------------------ inputs
def make_model(tmp: Path):
    """A random GPT-2 (4 layers, n_embd 128, 4 heads, vocab 2048, block 128) saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {lm.EOS: 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=lm.EOS)),
        eos_token=lm.EOS,
        bos_token=lm.EOS,
        unk_token=lm.EOS,
    )
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config).eval()
    path = tmp / "model"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    ident = lm.describe(model, tok, {"source": "local", "path": str(path)})
    write_json(tmp / "model.json", ident)
    return model, ident


def zipf_tokens(n: int, seed: int) -> np.ndarray:
    p = 1.0 / (np.arange(VOCAB) + 10.0) ** 1.1
    return np.random.default_rng(seed).choice(VOCAB, size=n, p=p / p.sum()).astype(np.int32)


def make_queries(model, ident, n: int, tmp: Path) -> dict:
    """Queries (float16-rounded, as retrieve caches them), targets and log p_lm over an eval stream."""
    tokens = zipf_tokens(n + 1, seed=1)
    q, lp = np.empty((n, ident["dim"]), np.float16), np.empty(n, np.float32)
    for first, keys, p in forward.run_model(model, ident["hook_point"], tokens, 0, n, BLOCK, BATCH, True):
        q[first : first + len(keys)], lp[first : first + len(keys)] = keys, p
    save_npy(tmp / "queries.npy", q)
    return {"queries": q, "targets": tokens[1:], "lm_logprob": lp}


# ------------------------------------------------------------------------------------------------ children
def child(args: dict) -> dict:
    """One pipeline stage in a fresh process: setup, warm-up, then the timed stage with its peak RSS. With ``go``
    (measure 10), the timed stage waits, once set up, for that file, so that two processes start it together."""
    threads = int(args.get("threads", THREADS))
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    d, stage = Path(args["dir"]), args["stage"]
    if stage == "extract":
        model, _, ident = lm.load_checked(args["model_json"], device="cpu")
        tokens = np.load(d / "tokens.npy")
        for _ in forward.run_model(model, ident["hook_point"], tokens, 0, BLOCK * BATCH, BLOCK, BATCH, False):
            pass  # warm-up
        files = [(d / f"keys_{s}.npy", d / f"vals_{s}.npy", d / f"shard_{s}.json") for s in range(SHARDS)]

        def run():
            for s, (k, v, m) in enumerate(files):
                extract_shard(model, ident, d / "tokens.npy", s, SHARDS, BLOCK, BATCH, k, v, m)
    elif stage == "build":

        def run():
            index.build_index(d / "manifest.json", args["cfg"], 0, d / "ivfpq.faiss", d / "ivfpq.json", THREADS)
    else:  # search-Flat | search-IVFPQ: index.search + cache writing for the eval queries
        ds = datastore.Datastore(d / "manifest.json")
        queries = np.load(args["queries"])[: args["n_queries"]].astype(np.float32)
        if stage == "search-Flat":
            idx, exact = faiss.IndexFlatL2(ds.dim), True
            for keys in ds.keys:
                idx.add(np.asarray(keys, np.float32))
        else:
            idx, exact = index.load_index(d / "ivfpq.faiss", d / "ivfpq.json", ds, args["cfg"]["nprobe"])[0], False
        index.search(idx, ds, queries[:16], K, exact=exact)  # warm-up

        def run():
            search_and_write(idx, ds, queries, exact, d / f"cache-{stage}{args.get('tag', '')}", {})

    base = reset_peak()
    if args.get("go"):
        Path(f"{args['go']}.ready{args['tag']}").touch()
        while not Path(args["go"]).exists():
            time.sleep(0.01)
    use0 = resource.getrusage(resource.RUSAGE_SELF)
    seconds, _ = perf(run)
    use = resource.getrusage(resource.RUSAGE_SELF)
    return {"seconds": seconds, "peak_mb": proc_mb("VmHWM"), "base_mb": base, "end": time.time(),
            "cpu": use.ru_utime + use.ru_stime - use0.ru_utime - use0.ru_stime, "sys": use.ru_stime - use0.ru_stime,
            "faults": use.ru_minflt - use0.ru_minflt}


def start(env: dict | None = None, **args) -> subprocess.Popen:
    """The child process of stage ``args``; ``env``: its environment (None: this process's)."""
    return subprocess.Popen([sys.executable, __file__, "--child", json.dumps(args, default=str)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=env)


def result(proc: subprocess.Popen, stage: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"child {stage} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def spawn(env: dict | None = None, **args) -> dict:
    return result(start(env, **args), args["stage"])


# ------------------------------------------------------------------------------------------------ measures
def scale_curve(tmp: Path, ident: dict, m: dict) -> list[dict]:
    """5. Wall time and peak RSS of extraction, IVFPQ build and retrieval (Flat, IVFPQ) at 3 datastore sizes."""
    stream = zipf_tokens(m["sizes"][-1] + 1, seed=0)
    rows = []
    for n in m["sizes"]:
        d = tmp / f"ds{n}"
        save_npy(d / "tokens.npy", stream[: n + 1])
        cfg = {"type": "IVFPQ", **m["ivfpq"]}
        for stage in ("extract", "build", "search-Flat", "search-IVFPQ"):
            r = spawn(
                stage=stage,
                dir=d,
                model_json=tmp / "model.json",
                queries=tmp / "queries.npy",
                n_queries=m["scale_queries"],
                cfg=cfg,
            )
            if stage == "extract":
                shards = [
                    (str(d / f"keys_{s}.npy"), str(d / f"vals_{s}.npy"), str(d / f"shard_{s}.json"))
                    for s in range(SHARDS)
                ]
                datastore.write_manifest(ident, d / "tokens.npy", shards, d / "manifest.json")
            items = m["scale_queries"] if stage.startswith("search") else n
            rows.append(
                {
                    "stage": stage,
                    "datastore_tokens": n,
                    "seconds": round(r["seconds"], 2),
                    "items_per_s": round(items / r["seconds"]),
                    "peak_rss_mb": round(r["peak_mb"]),
                    "rss_before_mb": round(r["base_mb"]),
                }
            )
            log(f"scale {stage:13s} {n:>8d} tokens: {r['seconds']:7.2f} s, peak RSS {r['peak_mb']:.0f} MiB")
    return rows


def extraction(model, ident, tmp: Path, n: int, scale: list[dict], sizes: list[int]) -> list[dict]:
    """2. extract_shard throughput vs a plain batched forward pass; peak RSS at datastore sizes S and 2S."""
    d = tmp / "extract"
    save_npy(d / "tokens.npy", zipf_tokens(n + 1, seed=2))
    tokens = np.load(d / "tokens.npy")
    wins = forward.windows(0, n, BLOCK)  # n is a multiple of BLOCK: every batch is BATCH x BLOCK
    xs = [
        torch.from_numpy(np.stack([tokens[a:b] for a, b in wins[i : i + BATCH]]).astype(np.int64))
        for i in range(0, len(wins), BATCH)
    ]

    def plain():
        with torch.inference_mode():
            for x in xs:
                model(input_ids=x)

    def extract():
        extract_shard(
            model, ident, d / "tokens.npy", 0, 1, BLOCK, BATCH, d / "keys.npy", d / "vals.npy", d / "shard.json"
        )

    def hook_only():  # run_model alone: the same early-stopping forward, without the shard writing
        for _ in forward.run_model(model, ident["hook_point"], tokens, 0, n, BLOCK, BATCH, False):
            pass

    with torch.inference_mode():
        model(input_ids=xs[0])  # warm-up
    t = best_of({"forward": plain, "extract": extract, "hook": hook_only})
    t_fwd, t_ext, t_hook = t["forward"], t["extract"], t["hook"]
    peak = {r["datastore_tokens"]: r["peak_rss_mb"] for r in scale if r["stage"] == "extract"}
    s1, s2 = sizes[-2], sizes[-1]
    change = peak[s2] / peak[s1] - 1
    return [
        row("extract: forward tokens/s (plain model, inference_mode)", n / t_fwd),
        row("extract: extract_shard tokens/s", n / t_ext),
        row("extract: extract_shard / forward throughput", t_fwd / t_ext, ">= 0.9", t_fwd / t_ext >= 0.9),
        row("extract: extract_shard time / run_model alone - 1 (fp16 cast + shard writes)", t_ext / t_hook - 1),
        row(f"extract: peak RSS MiB at {s1} / {s2} tokens", f"{peak[s1]} / {peak[s2]}"),
        row(f"extract: peak RSS change from S to {s2 / s1:g}S", change, "< 0.10", change < 0.10),
    ]


def index_compare(tmp: Path, ds_dir: Path, qs: np.ndarray, ivfpq: dict, t_ivf: float):
    """4. IVFPQ vs exact Flat on the same model-extracted keys: recall of the exact top-64, build time, bytes.

    The IVFPQ index is the one the scale curve built in ``ds_dir`` (``build_index``, in ``t_ivf`` seconds).
    Returns (rows, Flat index, IVFPQ index, datastore)."""
    manifest = ds_dir / "manifest.json"
    ds = datastore.Datastore(manifest)
    cfg, f = {"type": "IVFPQ", **ivfpq}, index.factory_string({"type": "IVFPQ", **ivfpq}, ds.dim)
    t_flat, _ = perf(index.build_index, manifest, {"type": "Flat"}, 0, tmp / "flat.faiss", tmp / "flat.json", THREADS)
    poly = {**cfg, "polysemous": True}  # build_index trains without it unless index.polysemous asks
    t_poly, _ = perf(index.build_index, manifest, poly, 0, tmp / "poly.faiss", tmp / "poly.json", THREADS)
    flat = index.load_index(tmp / "flat.faiss", tmp / "flat.json", ds)[0]
    ivf = index.load_index(ds_dir / "ivfpq.faiss", ds_dir / "ivfpq.json", ds, cfg["nprobe"])[0]

    def exact_d(ids):  # exact squared L2 from the stored keys; missing neighbours (-1) count as misses
        d = index.exact_sq_l2(qs, ds.gather_keys(np.maximum(ids, 0)))
        return np.where(ids < 0, np.inf, d)

    kth = exact_d(flat.search(qs, 64)[1]).max(axis=1, keepdims=True) * (1 + 1e-5)  # ties count as hits
    recall_pq = np.mean(exact_d(ivf.search(qs, 64)[1]) <= kth)
    recall_rr = np.mean(index.search(ivf, ds, qs, K, exact=False)[0][:, :64] <= kth)
    keys_b = sum(s["keys_bytes"] for s in ds.manifest["shards"])
    flat_b, ivf_b = (tmp / "flat.faiss").stat().st_size, (ds_dir / "ivfpq.faiss").stat().st_size
    rows = [
        row(f"index: {f} nprobe {cfg['nprobe']} recall@64 (PQ order, {len(qs)} queries)", recall_pq),
        row(f"index: {f} recall@64 after exact re-rank of K={K} (index.search)", recall_rr),
        row(f"index: build s Flat / {f} ({ds.rows} keys, build_index)", f"{t_flat:.2f} / {t_ivf:.2f}"),
        row(f"index: build s {f} with polysemous training (index.polysemous: true)", t_poly),
        row(f"index: build time with / without polysemous training ({f})", t_poly / t_ivf),
        row("index: Flat bytes / fp16 keys bytes", flat_b / keys_b),
        row(f"index: {f} bytes / fp16 keys bytes", ivf_b / keys_b),
    ]
    return rows, flat, ivf, ds


def sweep_vs_search(flat, ds, q: dict) -> tuple[list[dict], list[dict]]:
    """1. knnlm.sweep over the 24-point grid vs one exact retrieval pass for the same queries (and vs 24 passes)."""
    queries = q["queries"].astype(np.float32)
    index.search(flat, ds, queries[:64], K, exact=True)  # warm-up
    t_search, (dists, ids) = perf(index.search, flat, ds, queries, K, exact=True, repeat=2)
    vals, args = ds.gather_vals(ids), (q["targets"], q["lm_logprob"])
    knnlm.sweep(dists[:64], vals[:64], args[0][:64], args[1][:64], **GRID)  # warm-up
    t_sweep, rows = perf(knnlm.sweep, dists, vals, *args, **GRID, repeat=2)
    assert len(rows) == 24
    r = t_sweep / t_search
    return [
        row(f"sweep: seconds for 24 points, N={len(queries)} K={K}", t_sweep),
        row(f"sweep: seconds for one Flat retrieval pass over {ds.rows} keys", t_search),
        row("sweep: sweep / one retrieval pass", r, "<= 1.2", r <= 1.2),
        row("sweep: speed-up vs naive (24 x measured search)", 24 / r, ">= 10", 24 / r >= 10),
    ], rows


def ppl_ivfpq_vs_flat(ivf, ds, q: dict, flat_grid: list[dict], name: str) -> list[dict]:
    """4b. The 24-point sweep on an IVFPQ cache (approximate search, exact re-rank) vs on the exact Flat cache:
    best perplexity over the grid. The model is random and the tokens Zipf, so only the difference means much."""
    dists, ids = index.search(ivf, ds, q["queries"].astype(np.float32), K, exact=False)
    grid = knnlm.sweep(dists, ds.gather_vals(ids), q["targets"], q["lm_logprob"], **GRID)
    best_f, best_i = min(r["ppl"] for r in flat_grid), min(r["ppl"] for r in grid)
    worst = max(abs(a["ppl"] / b["ppl"] - 1) for a, b in zip(grid, flat_grid, strict=True))
    return [
        row(
            f"index: best-grid ppl Flat / {name} (base ppl {flat_grid[0]['base_ppl']:.4g})",
            f"{best_f:.5g} / {best_i:.5g}",
        ),
        row(f"index: best-grid ppl {name} / Flat - 1", best_i / best_f - 1),
        row(f"index: largest |ppl {name} / Flat - 1| over the 24 points", worst),
    ]


def retrieval_vs_faiss(flat, ds, q: dict, tmp: Path) -> list[dict]:
    """3. index.search + writing the cache vs raw faiss index.search, same index, queries and K."""
    queries = q["queries"].astype(np.float32)
    extra = {"targets": q["targets"], "lm_logprob": q["lm_logprob"], "queries": q["queries"]}
    flat.search(queries[:64], K)  # warm-up
    t = best_of(
        {
            "raw": lambda: flat.search(queries, K),
            "e2e": lambda: search_and_write(flat, ds, queries, True, tmp / "cache", extra),
        },
        repeat=2,
    )
    t_raw, t_e2e = t["raw"], t["e2e"]
    r = t_raw / t_e2e
    return [
        row("retrieval: raw faiss queries/s", len(queries) / t_raw),
        row("retrieval: search + cache write queries/s", len(queries) / t_e2e),
        row("retrieval: end-to-end / raw faiss throughput", r, ">= 0.8", r >= 0.8),
    ]


def memory_task_scoring(model, ident, flat, ds, n_items: int) -> list[dict]:
    """6. A CR-shaped memory task (448 synonyms of 1-2 tokens, premises of 32 tokens) scored the paper's way
    (``protocol: last_token``: one forward and one query per premise) vs whole-word continuations (one
    sequence per synonym, a query per distinct scored position). Items/s for the base LM (forward passes only)
    and the kNN-LM (plus the searches), on the same model and Flat index."""
    from workflow_scripts.tasks import scoring

    rng = np.random.default_rng(7)
    premises = [rng.integers(1, VOCAB, 32).tolist() for _ in range(n_items)]
    synonyms = [rng.integers(1, VOCAB, int(rng.integers(1, 3))).tolist() for _ in range(448)]
    slots = sorted({w[0] for w in synonyms})

    search = scoring._search(flat, ds, K, True)  # what score_task searches with

    def no_search(q):  # the base LM: forward passes only
        z = np.zeros((len(q), K), np.float32)
        return z, z.astype(np.int32), z.astype(np.int64)

    seqs = [p + w for p in premises for w in synonyms]
    starts = [len(p) for p in premises for _ in synonyms]
    hook = ident["hook_point"]
    fns = {
        ("last_token", "base"): lambda: scoring.last_token_cache(model, hook, premises, slots, no_search, BATCH),
        ("last_token", "kNN"): lambda: scoring.last_token_cache(model, hook, premises, slots, search, BATCH),
        ("continuation", "base"): lambda: scoring.score_cache(model, hook, seqs, starts, no_search, BATCH),
        ("continuation", "kNN"): lambda: scoring.score_cache(model, hook, seqs, starts, search, BATCH),
    }
    t = {key: perf(fn)[0] for key, fn in fns.items()}
    out = [row(f"memory task: {p} items/s ({lm_})", n_items / t[(p, lm_)]) for p, lm_ in fns]
    for lm_ in ("base", "kNN"):
        r = t[("continuation", lm_)] / t[("last_token", lm_)]
        out.append(row(f"memory task: last_token / continuation items/s ({lm_})", r, ">= 50", r >= 50))
    return out


class _FullPrefix(torch.nn.Module):
    """The model without its key/value cache argument: ``greedy_generate`` then forwards every prefix whole at every
    step, the decoder before the cache (its hook point is ``m.`` + the model's)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask=None):
        return self.m(input_ids=input_ids, attention_mask=attention_mask)


def generate_decoding(g: dict) -> list[dict]:
    """7. Greedy decoding of ``g['new']`` tokens after a ``g['prompt']``-token prompt (paper 1's GSM8K: ≈ 850 + 512)
    by ``scoring.greedy_generate`` with the model's key/value cache vs the full-prefix decoder (every step forwards
    the whole prefix), for the base LM and the kNN-LM (λ 0.25, k = K = 1024, σ 1: a Flat index over random keys, one
    search a step). A random GPT-2 of the default shape with a window of 1536; new tokens/s of one prompt, on one
    thread (torch and FAISS): a cached step's operations are small, and on 2 threads of a busy machine their
    synchronisation dominates (2026-12-07, load 4-6: 18 against 1.6 new tokens/s for the base LM, 11.6x)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from workflow_scripts.tasks import scoring

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=1536, n_embd=128, n_layer=4, n_head=4, bos_token_id=0,
                     eos_token_id=0)
    model, hook = GPT2LMHeadModel(cfg).eval(), "transformer.h.3.mlp"
    rng = np.random.default_rng(11)
    flat, k_nn = faiss.IndexFlatL2(cfg.n_embd), 1024
    flat.add(rng.standard_normal((g["keys"], cfg.n_embd)).astype(np.float32))
    vals = rng.integers(0, VOCAB, g["keys"]).astype(np.int32)

    def search(q):
        d, i = flat.search(np.ascontiguousarray(q, np.float32), k_nn)
        return d, vals[i], i

    prompt = [zipf_tokens(g["prompt"], seed=12).tolist()]
    decoders = {"cached": (model, hook), "full prefix": (_FullPrefix(model), "m." + hook)}
    points = {"base": None, "kNN": (0.25, k_nn, 1.0)}

    def run(which, lm_, n):
        m, h = decoders[which]
        return scoring.greedy_generate(m, h, prompt, [points[lm_]], search, VOCAB, n, lambda ids: False, 1)

    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(GEN_THREADS)
    faiss.omp_set_num_threads(GEN_THREADS)
    try:
        run("cached", "kNN", 4), run("full prefix", "kNN", 4)  # warm-up
        t, out = {}, {}
        for lm_ in points:
            for which in decoders:
                t[which, lm_], res = perf(run, which, lm_, g["new"])
                out[which, lm_] = res["outputs"][points[lm_]][0]
    finally:
        torch.set_num_threads(threads[0])
        faiss.omp_set_num_threads(threads[1])
    same = {lm_: out["cached", lm_] == out["full prefix", lm_] for lm_ in points}
    rows = []
    for lm_ in points:
        rate = {w: g["new"] / t[w, lm_] for w in decoders}
        r = rate["cached"] / rate["full prefix"]
        rows += [
            row(f"generate: new tokens/s, {g['new']} after {g['prompt']} prompt tokens, full prefix ({lm_})",
                rate["full prefix"]),
            row(f"generate: new tokens/s, cached ({lm_})", rate["cached"]),
            row(f"generate: cached / full-prefix new tokens/s ({lm_})", r, ">= 10", r >= 10),
            row(f"generate: cached tokens == full-prefix tokens ({lm_})", str(same[lm_])),
        ]
    return rows


# ------------------------------------------------------------------------------------------------ main
def code_index() -> list[dict]:
    """Measure 8: what every Snakemake start and every job learn about the package (its steps, their arguments,
    each module's imports): parsed from the sources, or read from the index ``cli._index`` keeps in __pycache__
    (the package's digest included)."""
    root = cli.PACKAGE

    def parse():
        cli._tree.cache_clear()
        cli._parse_index(root)

    def kept():
        cli._index.cache_clear()
        cli._index(root)

    kept()  # written here if it was missing
    best = best_of({"parse": parse, "kept": kept}, repeat=5)
    ratio = best["parse"] / best["kept"]
    return [
        row("code index: parse the package's modules, s", best["parse"]),
        row("code index: read the kept index (digest included), s", best["kept"]),
        row("code index: parse / kept", ratio, ">= 5", ratio >= 5),
    ]


def small_call_search(n_keys: int) -> list[dict]:
    """Measure 9: one exact search call of 950 queries (a task block of score_task) at K, with FAISS's own
    threshold (under 1000 queries at dim 128 its per-pair loop) vs the GEMM (``index.gemm_distances``, as task scoring
    searches)."""
    rng = np.random.default_rng(9)
    keys = rng.standard_normal((n_keys, 128), dtype=np.float32)
    q = rng.standard_normal((950, 128), dtype=np.float32)

    def gemm():
        with index.gemm_distances():
            faiss.knn(q, keys, K)

    best = best_of({"loop": lambda: faiss.knn(q, keys, K), "gemm": gemm}, repeat=2)
    ratio = best["loop"] / best["gemm"]
    return [
        row(f"exact search, 950 queries x {n_keys} keys: FAISS's default path, s", best["loop"]),
        row(f"exact search, 950 queries x {n_keys} keys: GEMM (gemm_distances), s", best["gemm"]),
        row("exact search of a small call: FAISS's default / GEMM", ratio, ">= 2", ratio >= 2),
    ]


def paired_searches(tmp: Path, m: dict) -> list[dict]:
    """Measure 10: two retrievals (``index.search`` at K over the Flat datastore, then the cache written), one after
    the other on THREADS threads each, against side by side on one thread each, as the default run schedules them
    (``SEARCH_THREADS`` in rules/common.smk: a job asking for two threads runs alone on 2 cores)."""
    d, n = tmp / f"ds{m['pair']['tokens']}", m["pair"]["queries"]
    q = np.load(tmp / "queries.npy")
    np.save(tmp / "pair_queries.npy", np.resize(q, (n, q.shape[1])))  # the eval queries repeated: a search's cost
    args = {"stage": "search-Flat", "dir": d, "queries": tmp / "pair_queries.npy", "n_queries": n}
    after = sum(spawn(**args, threads=THREADS, tag="-seq")["seconds"] for _ in range(2))
    go = tmp / "go"
    procs = [start(**args, threads=1, go=go, tag=i) for i in range(2)]
    while not all(Path(f"{go}.ready{i}").exists() for i in range(2)):
        if any(p.poll() for p in procs):
            break  # a child failed: result() below reports it
        time.sleep(0.01)
    t0 = time.time()
    go.touch()
    side = max(result(p, "search-Flat")["end"] for p in procs) - t0
    ratio = after / side
    return [
        row(f"two retrievals of {n} queries x {m['pair']['tokens']} keys, one after the other on {THREADS} threads, s",
            after),
        row(f"two retrievals of {n} queries x {m['pair']['tokens']} keys, side by side on 1 thread each, s", side),
        row("two retrievals: one after the other on 2 threads / side by side on 1", ratio, ">= 1.1", ratio >= 1.1),
    ]


def task_rescoring(n_items: int) -> list[dict]:
    """Measure 11: a task sweep's work at one grid point, the predictions of ``n_items`` classify items (15 labels of
    one pair each, domain-conditional PMI: synth_occupation's shape) from the pairs' log-probabilities, by the
    arrays of ``rescoring.predictor`` (the items' layout built once per task, as ``task_sweep`` does) against one
    ``predictor`` call per item (its layout and numpy calls item by item: the shape of the former per-option loop's
    cost, which issued about four numpy calls per option)."""
    from workflow_scripts.tasks import rescoring

    rng, labels = np.random.default_rng(11), 15
    items = [{"options": [[2 * labels * i + j] for j in range(labels)],
              "domain": [[2 * labels * i + labels + j] for j in range(labels)]} for i in range(n_items)]
    lp = rng.uniform(-20, 0, 2 * labels * n_items)
    length = np.ones(lp.size, np.int64)
    whole = rescoring.predictor(items, length, pmi=True)
    best = best_of({"arrays": lambda: whole(lp),
                    "items": lambda: [rescoring.predictor([it], length, pmi=True)(lp) for it in items]}, repeat=3)
    ratio, what = best["items"] / best["arrays"], f"task rescoring, {n_items} items x {labels} labels with PMI"
    return [
        row(f"{what}, one grid point: item by item, s", best["items"]),
        row(f"{what}, one grid point: arrays, s", best["arrays"]),
        row("task rescoring: item by item / arrays", ratio, ">= 10", ratio >= 10),
    ]


def freed_memory(tmp: Path, ident: dict, n: int) -> list[dict]:
    """Measure 12: what the jobs' allocator settings (``job_environment``, which the Snakefile gives every job) save,
    on the extraction of ``n`` tokens (batches of 32 windows of 128, as the default run's extract_keys): CPU seconds
    (user + system) and minor page faults of the timed stage, in fresh processes with and without them, in turn
    (best of 2). By default glibc maps, faults in and zeroes the batches' activations anew; in the default run that
    system time was about a tenth of all CPU time, a quarter of extract_keys'."""
    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    d = tmp / "freed"
    save_npy(d / "tokens.npy", zipf_tokens(n + 1, seed=12))
    best = {}
    for _ in range(2):
        for reuse in (False, True):
            env = plain | job_environment.job_environment(plain) if reuse else plain
            r = spawn(env, stage="extract", dir=d, model_json=tmp / "model.json")
            if reuse not in best or r["cpu"] < best[reuse]["cpu"]:
                best[reuse] = r
    off, on = best[False], best[True]
    ratio = off["cpu"] / on["cpu"]
    return [
        row(f"freed memory, extraction of {n} tokens: CPU s / system s / minor faults, glibc's default",
            f"{off['cpu']:.2f} / {off['sys']:.2f} / {off['faults']}"),
        row(f"freed memory, extraction of {n} tokens: CPU s / system s / minor faults, reused",
            f"{on['cpu']:.2f} / {on['sys']:.2f} / {on['faults']}"),
        row("freed memory: extraction CPU s, glibc's default / reused", ratio, ">= 1.05", ratio >= 1.05),
    ]


def print_table(rows: list[dict]) -> None:
    cols = list(rows[0])
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(width[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(width[c]) for c in cols))


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes)")
    p.add_argument("--only", choices=["generate"], help="run measure 7 (greedy decoding) alone")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    torch.set_num_threads(THREADS)
    faiss.omp_set_num_threads(THREADS)
    mode = "quick" if a.quick else "full"
    m, t0, load0 = MODES[mode], time.perf_counter(), os.getloadavg()[0]
    if a.only == "generate":
        rows = generate_decoding(m["generate"])
        rows.append(row("run: mode / wall s / load avg (1 min) start, end",
                        f"{mode} generate / {time.perf_counter() - t0:.0f} / {load0:.1f}, {os.getloadavg()[0]:.1f}"))
        print_table(rows)
        return
    with tempfile.TemporaryDirectory(prefix="knnlm-bench-") as tmp:
        tmp = Path(tmp)
        model, ident = make_model(tmp)
        q = make_queries(model, ident, m["queries"], tmp)
        log(f"{mode} mode: datastores of {m['sizes']} tokens, {m['queries']} queries, K={K}")
        scale = scale_curve(tmp, ident, m)
        rows = extraction(model, ident, tmp, m["extract"], scale, m["sizes"])
        log("extraction done")
        n = m["ratio_size"]
        t_ivf = next(r["seconds"] for r in scale if r["stage"] == "build" and r["datastore_tokens"] == n)
        qs = q["queries"][: m["recall_queries"]].astype(np.float32)
        index_rows, flat, ivf, ds = index_compare(tmp, tmp / f"ds{n}", qs, m["ivfpq"], t_ivf)
        log("index done")
        sweep_rows, grid = sweep_vs_search(flat, ds, q)
        log("sweep done")
        index_rows += ppl_ivfpq_vs_flat(ivf, ds, q, grid, index.factory_string({"type": "IVFPQ", **m["ivfpq"]}, ds.dim))
        rows = sweep_rows + rows + retrieval_vs_faiss(flat, ds, q, tmp) + index_rows
        rows += memory_task_scoring(model, ident, flat, ds, m["task_items"])
        log("memory task done")
        rows += generate_decoding(m["generate"])
        log("generate done")
        rows += code_index()
        rows += small_call_search(m["small_call_keys"])
        rows += paired_searches(tmp, m)
        rows += task_rescoring(m["rescore_items"])
        rows += freed_memory(tmp, ident, m["freed"])
    rows.append(
        row(
            "run: mode / wall s / load avg (1 min) start, end",
            f"{mode} / {time.perf_counter() - t0:.0f} / {load0:.1f}, {os.getloadavg()[0]:.1f}",
        )
    )
    print("\nScale curve (per stage, subprocess; items = tokens for extract/build, queries for search)")
    print_table(scale)
    print(f"\nBenchmarks ({mode})")
    print_table(rows)
    write_csv(rows, OUT / "results.csv")
    write_csv(scale, OUT / "scale.csv")


if __name__ == "__main__":
    main()
