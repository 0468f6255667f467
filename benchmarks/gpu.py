"""GPU measurements (issue 20) in one call: ``python benchmarks/gpu.py [--quick] [--ppl-on-cpu]`` from the root.

1. extraction: ``extraction.extract_shard`` tokens/s with the model in float16 and in float32 on the same GPU,
   for a random GPT-2 of the default shape and one of GPT-2 small's shape, and how far the float16 keys are
   from the float32 ones;
2. search: queries/s of the same Flat and IVFPQ index on the CPU and on the GPUs (handed over by
   ``devices.search_index``, as retrieval does), and how many of the CPU's neighbours the GPU returns;
3. the perplexity table (``results/tables/perplexity_summary.csv``) of tests/configs/micro.yaml run through
   Snakemake with ``extraction.device: cuda`` and ``extraction.dtype`` float32, then float16 (the second run
   reuses the first's corpus and model): the largest relative difference per column.

Where torch or FAISS sees no GPU, each GPU side prints ``skipped: <why>`` and its CPU side still runs, so the
script itself is checked on any machine. Part 3 needs a GPU; ``--ppl-on-cpu`` runs it with
``extraction.device: cpu`` instead, a check of its plumbing only (on the CPU both dtypes compute in float32, so
the two tables must be equal). Prints a table and writes ``benchmarks/gpu.csv`` (not tracked).
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import BATCH, BLOCK, ROOT, log, row, zipf_tokens  # noqa: E402

from workflow_scripts import devices, lm  # noqa: E402
from workflow_scripts.artifacts import write_json  # noqa: E402
from workflow_scripts.extraction import extract_shard  # noqa: E402

OUT = Path(__file__).resolve().parent / "gpu.csv"
SHAPES = {"default (4 x 128)": (4, 128, 4), "GPT-2 small (12 x 768)": (12, 768, 12)}  # layers, width, heads
MODES = {
    "full": {"extract_gpu": 1 << 20, "extract_cpu": 1 << 14, "keys": 1_000_000, "queries": 4096, "k": 1024,
             "ivfpq": "IVF1024,PQ16x8", "nprobe": 32},
    "quick": {"extract_gpu": 1 << 16, "extract_cpu": 1 << 12, "keys": 50_000, "queries": 512, "k": 256,
              "ivfpq": "IVF64,PQ16x8", "nprobe": 8},
}


def skipped(measure: str, why: str) -> dict:
    log(f"skipped: {measure}: {why}")
    return {"measure": measure, "value": "skipped", "target": "", "status": f"skipped: {why}"}


def random_model(tmp: Path, layers: int, width: int, heads: int) -> Path:
    """A random GPT-2 of this shape (vocab 2048, block 128), saved with a word-level tokenizer; its model.json."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {lm.EOS: 0, **{f"t{i}": i for i in range(1, 2048)}}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token=lm.EOS)),
                                  eos_token=lm.EOS, bos_token=lm.EOS, unk_token=lm.EOS)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=BLOCK, n_embd=width, n_layer=layers,
                                       n_head=heads, bos_token_id=0, eos_token_id=0)).eval()
    path = tmp / f"model-{layers}x{width}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    write_json(path / "model.json", lm.describe(model, tok, {"source": "local", "path": str(path)}))
    return path / "model.json"


def extract_rate(model_json: Path, device: str, dtype: str, tokens_npy: Path, n: int, out: Path):
    """(tokens/s of extract_shard over ``n`` tokens after a warm-up, the keys as float32)."""
    model, _, ident = lm.load_checked(model_json, device=device, dtype=dtype)
    files = [out / f"{dtype}-{device}.{x}" for x in ("keys.npy", "vals.npy", "json")]
    extract_shard(model, ident, tokens_npy, 0, max(2, n // (BLOCK * BATCH)), BLOCK, BATCH, *files)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    extract_shard(model, ident, tokens_npy, 0, 1, BLOCK, BATCH, *files)
    rate = n / (time.perf_counter() - t)
    return rate, np.load(files[0]).astype(np.float32)


def extraction(tmp: Path, m: dict) -> list[dict]:
    """1. float16 vs float32 extraction on the GPU; the CPU's float32 rate beside it."""
    rows = []
    refusal = devices.cuda_refusal("cuda")
    for name, shape in SHAPES.items():
        model_json = random_model(tmp, *shape)
        n_cpu = m["extract_cpu"]
        np.save(tmp / "tokens_cpu.npy", zipf_tokens(n_cpu + 1, seed=2))
        cpu_rate, _ = extract_rate(model_json, "cpu", "float32", tmp / "tokens_cpu.npy", n_cpu, tmp)
        rows.append(row(f"extract {name}: CPU float32 tokens/s ({torch.get_num_threads()} threads)", cpu_rate))
        if refusal:
            rows.append(skipped(f"extract {name}: GPU float16 / float32 tokens/s", refusal))
            continue
        n = m["extract_gpu"]
        np.save(tmp / "tokens_gpu.npy", zipf_tokens(n + 1, seed=2))
        r32, k32 = extract_rate(model_json, "cuda", "float32", tmp / "tokens_gpu.npy", n, tmp)
        r16, k16 = extract_rate(model_json, "cuda", "float16", tmp / "tokens_gpu.npy", n, tmp)
        rel = np.linalg.norm(k16 - k32, axis=1) / np.maximum(np.linalg.norm(k32, axis=1), 1e-12)
        rows += [
            row(f"extract {name}: GPU float32 tokens/s ({torch.cuda.get_device_name()})", r32),
            row(f"extract {name}: GPU float16 tokens/s", r16),
            row(f"extract {name}: float16 / float32 throughput", r16 / r32),
            row(f"extract {name}: |key16 - key32| / |key32|, median / max", f"{np.median(rel):.2e} / {rel.max():.2e}"),
        ]
    return rows


def search(m: dict) -> list[dict]:
    """2. queries/s of the same Flat and IVFPQ index on the CPU and on the GPUs; the GPU's recall of the CPU's
    top-k (Flat: exact on both sides, so ties aside they agree)."""
    import faiss

    rng = np.random.default_rng(0)
    d, k = 128, m["k"]
    centres = rng.normal(size=(256, d)).astype(np.float32)  # a Gaussian mixture, as keys cluster
    keys = centres[rng.integers(0, 256, m["keys"])] + 0.3 * rng.normal(size=(m["keys"], d)).astype(np.float32)
    queries = centres[rng.integers(0, 256, m["queries"])] + 0.3 * rng.normal(size=(m["queries"], d)).astype(
        np.float32)
    flat = faiss.IndexFlatL2(d)
    flat.add(keys)
    ivf = faiss.index_factory(d, m["ivfpq"])
    ivf.train(keys[rng.choice(len(keys), min(len(keys), 100_000), replace=False)])
    ivf.add(keys)
    faiss.extract_index_ivf(ivf).nprobe = m["nprobe"]
    rows, gpu_why = [], None
    if devices.faiss_gpus() == 0:
        gpu_why = f"{devices.faiss_build()}: no GPU for FAISS"
    for name, idx in (("Flat", flat), (f"{m['ivfpq']} nprobe {m['nprobe']}", ivf)):
        idx.search(queries[:64], k)  # warm-up
        t = time.perf_counter()
        d_cpu, i_cpu = idx.search(queries, k)
        cpu_qps = len(queries) / (time.perf_counter() - t)
        rows.append(row(f"search {name} ({len(keys)} keys, k={k}): CPU queries/s ({faiss.omp_get_max_threads()} "
                        "threads)", cpu_qps))
        if gpu_why:
            rows.append(skipped(f"search {name}: GPU queries/s", gpu_why))
            continue
        on_gpu = devices.search_index(idx, "cuda", shard_above_gb=4)
        if on_gpu is idx:
            rows.append(skipped(f"search {name}: GPU queries/s", "FAISS refused this index on the GPU (log above)"))
            continue
        on_gpu.search(queries[:64], k)
        t = time.perf_counter()
        d_gpu, i_gpu = on_gpu.search(queries, k)
        gpu_qps = len(queries) / (time.perf_counter() - t)
        worst = float(np.abs(d_gpu - d_cpu)[:, -1].max())
        recall = np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(i_cpu, i_gpu, strict=True)])
        rows += [
            row(f"search {name}: GPU queries/s ({devices.faiss_gpus()} GPU)", gpu_qps),
            row(f"search {name}: GPU / CPU throughput", gpu_qps / cpu_qps),
            row(f"search {name}: GPU recall of the CPU top-{k}", recall),
            row(f"search {name}: max |GPU - CPU| distance of the k-th neighbour", worst),
        ]
    return rows


def ppl_tables(tmp: Path, device: str) -> list[dict]:
    """3. The perplexity table of the micro config with extraction.dtype float32, then float16."""
    import polars as pl

    cfg = yaml.safe_load((ROOT / "tests/configs/micro.yaml").read_text())
    tables = {}
    for dtype in ("float32", "float16"):
        work = tmp / f"micro-{dtype}"
        if dtype == "float16":  # reuse the corpus, tokens and model: only extraction onward reruns
            shutil.copytree(tmp / "micro-float32", work, symlinks=True)
        work.mkdir(exist_ok=True)
        cfg["extraction"].update(device=device, dtype=dtype)
        (work / "config.yaml").write_text(yaml.safe_dump(cfg))
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "snakemake", "results/tables/perplexity_summary.csv", "--cores", "all",
               "--snakefile", ROOT / "Snakefile", "--directory", work, "--configfile", work / "config.yaml"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"snakemake ({dtype}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        log(f"micro run, extraction.dtype {dtype} on {device}: {time.perf_counter() - t:.0f} s")
        tables[dtype] = pl.read_csv(work / "results/tables/perplexity_summary.csv")
        print(tables[dtype])
    a, b = tables["float32"], tables["float16"]
    rows = []
    for col in [c for c in a.columns if a[c].dtype.is_float()]:
        diff = float(((b[col] - a[col]).abs() / a[col].abs()).max())
        rows.append(row(f"perplexity table ({device}): max |float16 / float32 - 1| of {col}", diff))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a few minutes on 2 CPU cores)")
    ap.add_argument("--ppl-on-cpu", action="store_true", help="run part 3 on the CPU where no GPU answers")
    args = ap.parse_args()
    m = MODES["quick" if args.quick else "full"]
    log(devices.describe(devices.torch_device("auto"), "float32"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="knnlm-gpu-bench-") as tmp:
        tmp = Path(tmp)
        rows += extraction(tmp, m)
        rows += search(m)
        refusal = devices.cuda_refusal("cuda")
        if not refusal:
            rows += ppl_tables(tmp, "cuda")
        elif args.ppl_on_cpu:
            rows.append(skipped("perplexity table float16 vs float32 on a GPU", f"{refusal}; run on the CPU instead"))
            rows += ppl_tables(tmp, "cpu")
        else:
            rows.append(skipped("perplexity table float16 vs float32", refusal))
    with OUT.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["measure", "value", "target", "status"])
        w.writeheader()
        w.writerows(rows)
    width = max(len(r["measure"]) for r in rows)
    print("\n".join(f"{r['measure']:<{width}}  {r['value']:>12}  {r['status']}" for r in rows))
    log(f"wrote {OUT}")


if __name__ == "__main__":
    main()
