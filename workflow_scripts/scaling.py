"""Datastore-size scaling from one retrieval: perplexity at fractions of a datastore, exact, without rebuilding it.

Row r of a datastore (its global id: shards concatenated in manifest order) gets a fixed pseudo-random number
``u(r) = uniform(seed, r)`` in [0, 1); the fraction-f datastore is the rows with u < f. The subsets are nested
(f < g: every row of the f subset is in the g subset) and do not depend on the eval set, the task, the shard layout
or the order in which rows are visited, because u is a function of (seed, r) alone: the r-th output of a splitmix64
stream seeded with ``seed`` (a counter-based hash, ``uniform``).

Subsample after retrieve: the top-k of the fraction-f datastore for a query are the first k of its K_max cached
neighbours (nearest first) with u < f, whenever at least k of them fall in the subset. A position with fewer is
searched again, restricted to the subset (``SubsetSearch``): with a Flat index, an exact search over a Flat index of
the subset's keys (the index a datastore built from those rows would have), so every number is exact; with an
approximate (IVF) index, the parent index searched with an ID selector of the subset, which differs from an index
trained on the subset. Each table says how many positions needed that second search.

Then every (λ, k, σ) of the sweep grid is a rescoring, through ``knnlm`` (``knnlm.sweep``), as the sweep stage does.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import faiss
import numpy as np
import polars as pl

from . import knnlm
from .artifacts import (
    ArtifactError,
    atomic_path,
    open_npy_for_writing,
    read_json,
    read_table,
    sha256_file,
    write_json,
    write_table,
)
from .cli import step
from .datastore import KEY_DTYPE, VAL_DTYPE, Datastore, shard_digests, write_manifest
from .index import search
from .retrieval_cache import load_cache
from .sweep import summarize_frames

log = logging.getLogger(__name__)

# splitmix64 (Steele, Lea, Flood 2014; the seeding generator of xoshiro): state += γ, then two xor-shift-multiply
# rounds. u(seed, r) is the (r + 1)-th output of the stream whose state starts at mix(seed): a counter-based hash
# of (seed, r), so any row's number is computed alone, in any order, by any job.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, rows) -> np.ndarray:
    """u(row) in [0, 1) (float64, 53 random bits) for global datastore rows of any shape, from (seed, row) alone."""
    rows = np.asarray(rows)
    if rows.size and (rows.min() < 0):
        raise ValueError(f"datastore rows must be >= 0 (got {int(rows.min())})")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed {seed} outside 0..2^63-1")
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2^64, as splitmix64 wants
        state = _mix(np.full(1, seed, np.uint64) + _GAMMA)[0]
        x = _mix(state + (rows.astype(np.uint64) + np.uint64(1)) * _GAMMA)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def in_subset(seed: int, fraction: float, rows) -> np.ndarray:
    """Whether each row is in the fraction-``fraction`` datastore: u(row) < fraction (every row at fraction 1)."""
    return uniform(seed, rows) < fraction


def subset_rows(n_rows: int, fraction: float, seed: int, chunk: int = 1 << 22) -> np.ndarray:
    """The global rows (ascending) of the fraction-f datastore of a datastore of ``n_rows`` rows."""
    parts = [np.flatnonzero(in_subset(seed, fraction, np.arange(a, min(a + chunk, n_rows)))) + a
             for a in range(0, n_rows, chunk)]
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def fraction_name(fraction: float) -> str:
    """The fraction as written in paths and tables (0.01, 0.3, 1)."""
    return f"{float(fraction):g}"


# --------------------------------------------------------------------------------------------- the second search
class _Restricted:
    """An index whose ``search`` passes FAISS search parameters (an ID selector) to the wrapped index."""

    def __init__(self, index, params):
        self.index, self.params = index, params

    def search(self, q, k):
        return self.index.search(q, k, params=self.params)


class SubsetSearch:
    """Search restricted to the fraction-f rows of a datastore, returning global rows, nearest first.

    ``exact`` (the parent index is Flat): a Flat L2 index over the subset's keys, in row order, ids mapped back;
    that is the index a datastore built from exactly those rows has, and it is cheaper than a selector on the parent
    (a selector turns FAISS's blocked matrix product into a scan of every row). Otherwise the parent's approximate
    index searched with an ID selector of the subset (``SearchParametersIVF``): what that index returns among the
    subset's rows, which differs from an index trained on the subset."""

    def __init__(self, ds: Datastore, rows: np.ndarray, index=None, exact: bool = True, distances: str = "exact",
                 nprobe: int | None = None):
        self.ds, self.rows, self.exact, self.distances = ds, np.asarray(rows, np.int64), exact, distances
        if exact:
            self.index = faiss.IndexFlatL2(ds.dim)
            for a in range(0, len(self.rows), 1 << 18):  # bounded memory: float32 keys in chunks
                self.index.add(ds.gather_keys(self.rows[a : a + (1 << 18)]))
        else:
            if index is None:
                raise ValueError("an approximate index is needed to search its subset")
            sel = faiss.IDSelectorBatch(self.rows)
            params = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe or faiss.extract_index_ivf(index).nprobe)
            self._sel = sel  # kept alive while the parameters refer to it
            self.index = _Restricted(index, params)

    def __call__(self, queries: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        d, i = search(self.index, self.ds, q, K, exact=self.exact, distances=self.distances)
        return d, (self.rows[i] if self.exact else i)


def subsample_neighbours(dists, ids, queries, keep, need: int, search_subset, chunk: int = 2048):
    """The first ``need`` neighbours of each query in a subset of the datastore, nearest first.

    ``dists``, ``ids`` [N, K]: cached neighbours (ascending); ``keep(ids)``: bool mask of the ids in the subset;
    ``search_subset(queries, need)``: (dists, ids) of a search restricted to the subset. A row whose cached list holds
    at least ``need`` subset neighbours keeps them, in cached order; the others are searched again. Returns (dists
    [N, need] float32, ids [N, need] int64, searched [N] bool: the rows searched again)."""
    n, K = ids.shape
    if need > K:
        raise ValueError(f"{need} neighbours asked of a cache of K = {K}")
    out_d = np.empty((n, need), np.float32)
    out_i = np.empty((n, need), np.int64)
    searched = np.zeros(n, bool)
    for a in range(0, n, chunk):
        i = np.asarray(ids[a : a + chunk])
        m = keep(i)
        order = np.argsort(~m, axis=1, kind="stable")[:, :need]  # subset neighbours first, in cached order
        out_i[a : a + len(i)] = np.take_along_axis(i, order, 1)
        out_d[a : a + len(i)] = np.take_along_axis(np.asarray(dists[a : a + chunk]), order, 1)
        searched[a : a + len(i)] = m.sum(axis=1) < need
    redo = np.flatnonzero(searched)
    if len(redo):
        d, i = search_subset(np.asarray(queries[redo], dtype=np.float32), need)
        out_d[redo], out_i[redo] = d, i
    return out_d, out_i, searched


# --------------------------------------------------------------------------------------------- one fraction
def scale_sweep(cache_dir, manifest_json, index_path, index_meta, p: dict, out_npz, csv, parquet, out_meta,
                tokens_npy=None) -> dict:
    """Perplexity at every (λ, k, σ) of the grid on the fraction-f datastore, from the full datastore's retrieval
    cache; per position, log p_knn(target) at every (σ, k) and how often the target occurs in the subset's values."""
    from .index import load_index

    t0 = time.time()
    f, seed = float(p["fraction"]), int(p["seed"])
    g = p["grid"]
    ks, sigmas = sorted(int(k) for k in g["ks"]), sorted(float(s) for s in g["sigmas"])
    c = load_cache(cache_dir, manifest_json, tokens_npy=tokens_npy)
    ds = Datastore(manifest_json)
    need = max(ks)
    if need > c["meta"]["K"]:
        raise ValueError(f"sweep.ks {need} exceeds the {c['meta']['K']} neighbours cached in {cache_dir}")
    rows = subset_rows(ds.rows, f, seed)
    if len(rows) < need:
        raise ValueError(
            f"scaling.fractions {fraction_name(f)}: {len(rows)} of the {ds.rows} rows of {manifest_json} "
            f"(seed {seed}), fewer than the largest k of the grid ({need}); drop this fraction or the larger k"
        )
    exact = c["meta"]["index"] == "Flat"
    index = None
    if not exact:
        index, imeta = load_index(index_path, index_meta, ds, p.get("nprobe"))
        exact = imeta["exact"]
    sub = SubsetSearch(ds, rows, index, exact, p.get("distances") or "exact", p.get("nprobe"))
    dists, ids, searched = subsample_neighbours(
        c["dists"], c["ids"], c["queries"], lambda i: in_subset(seed, f, i), need, sub
    )
    vals = ds.gather_vals(ids)
    targets, lm_logprob = np.asarray(c["targets"]), np.asarray(c["lm_logprob"])
    table = pl.DataFrame(knnlm.sweep(dists, vals, targets, lm_logprob, g["lambdas"], ks, sigmas))
    table = table.select(["lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens"]).sort(["lambda", "k", "sigma"])
    write_table(table, csv, parquet)
    knn = np.stack([np.stack([v for _, v in sorted(knnlm.knn_target_logprobs(dists, vals, targets, ks, s).items())])
                    for s in sigmas])
    counts = np.bincount(ds.gather_vals(rows), minlength=int(max(ds.manifest.get("vocab_size") or 0,
                                                                  int(targets.max()) + 1)))
    with atomic_path(out_npz, ".npz") as tmp:
        np.savez(tmp, knn_logprob=knn, lm_logprob=lm_logprob.astype(np.float64), target_count=counts[targets],
                 searched=searched, targets=targets)
        digest = sha256_file(tmp)
    meta = {
        "fraction": f, "seed": seed, "rows": int(len(rows)), "datastore_rows": int(ds.rows), "ks": ks,
        "sigmas": sigmas, "n_tokens": int(len(targets)), "second_search": int(searched.sum()),
        "subset_search": "exact (Flat over the subset's keys)" if exact else
        "approximate: the parent index with an ID selector (differs from an index trained on the subset)",
        "retrieval_sha256": c["meta"]["sha256"], "npz_sha256": digest, "seconds": round(time.time() - t0, 2),
    }
    write_json(out_meta, meta)
    log.info("fraction %s: %d rows, %d of %d positions searched again (%.1fs)", fraction_name(f), len(rows),
             meta["second_search"], len(targets), meta["seconds"])
    return meta


def load_positions(npz, meta_json) -> tuple[dict, dict]:
    """A fraction's per-position arrays, checked against the sha256 its meta.json recorded."""
    meta = read_json(meta_json)
    if sha256_file(npz) != meta.get("npz_sha256"):
        raise ArtifactError(f"{npz}: sha256 differs from the one recorded in {meta_json}; rerun scaling_sweep for it "
                            f"(snakemake --forcerun {meta_json})")
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, meta


# --------------------------------------------------------------------------------------------- fits and intervals
def loglinear_fit(x_tokens, y) -> tuple[float, float]:
    """Least-squares fit y = a + b·log10(tokens): (slope b per decade of datastore tokens, intercept a). Along the
    last axis of ``y``, so that bootstrap replicates [B, F] fit at once."""
    x = np.log10(np.asarray(x_tokens, np.float64))
    y = np.asarray(y, np.float64)
    xc = x - x.mean()
    b = (y * xc).sum(axis=-1) / (xc * xc).sum()
    return b, y.mean(axis=-1) - b * x.mean()


def block_bootstrap_means(values, block: int, n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates [n_boot, F] of the mean of each row of ``values`` [F, N], resampling whole blocks of
    ``block`` consecutive positions (a retrieval window: neighbouring positions share their context, so they are not
    independent draws), the same blocks for every row; each replicate is the mean over the positions of its blocks."""
    values = np.asarray(values, np.float64)
    n = values.shape[1]
    starts = np.arange(0, n, block)
    sums = np.add.reduceat(values, starts, axis=1)  # [F, n_blocks]
    sizes = np.diff(np.append(starts, n))
    pick = np.random.default_rng(seed).integers(0, len(starts), size=(n_boot, len(starts)))
    return np.stack([sums[:, p].sum(axis=1) / sizes[p].sum() for p in pick])


FREQ_BUCKETS = [(0, 0), (1, 9), (10, 99), (100, 999), (1000, 9999), (10000, None)]


def bucket_label(lo: int, hi: int | None) -> str:
    return f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi is not None else f">={lo}")


# --------------------------------------------------------------------------------------------- the summary
def summarize_scaling(runs: dict[tuple[str, str], tuple[Path, Path, Path]], p: dict, out: dict) -> dict:
    """The scaling tables of one datastore from its (eval set, fraction) runs (sweep parquet, npz, meta): the grid
    at every fraction; per (eval set, fraction) the base LM, the kNN-LM at the point chosen on the selection set at
    that size (and the oracle), with a block-bootstrap 95% CI; the log-linear fit of each eval set's curve with its
    bootstrap CI; and the perplexity gain by how often the target occurs in the subset."""
    ds, select_on = p["datastore"], p["select_on"]
    n_boot, seed, block = int(p["n_boot"]), int(p["seed"]), int(p["block_size"])
    fracs = sorted({f for _, f in runs}, key=float)
    evalsets = sorted({e for e, _ in runs})
    sweeps, pos = {}, {}
    for (e, f), (sweep_parquet, npz, meta_json) in runs.items():
        sweeps[e, f] = read_table(sweep_parquet)
        pos[e, f] = load_positions(npz, meta_json)
    chosen = {}  # (eval set, fraction) -> the summary row at that size
    for f in fracs:
        frames = {(e, ds): sweeps[e, f] for e in evalsets if (e, f) in sweeps}
        for r in summarize_frames(frames, {ds: select_on}).iter_rows(named=True):
            chosen[r["eval_set"], f] = r
    rows, fits, freq = [], [], []
    for e in evalsets:
        fs = [f for f in fracs if (e, f) in chosen]
        lps = []
        for f in fs:
            r, (arrays, meta) = chosen[e, f], pos[e, f]
            knn = arrays["knn_logprob"][meta["sigmas"].index(r["sigma"]), meta["ks"].index(r["k"])]
            lp, base_lp = knnlm.interpolate(arrays["lm_logprob"], knn, r["lambda"]), arrays["lm_logprob"]
            lps.append(lp)
            cnt = arrays["target_count"]
            for lo, hi in FREQ_BUCKETS:
                m = (cnt >= lo) & (cnt <= (hi if hi is not None else np.iinfo(np.int64).max))
                if m.any():
                    freq.append({"eval_set": e, "fraction": float(f), "datastore_tokens": meta["rows"],
                                 "bucket": bucket_label(lo, hi), "bucket_min": lo, "n_tokens": int(m.sum()),
                                 "base_ppl": knnlm.perplexity(base_lp[m]), "knn_ppl": knnlm.perplexity(lp[m]),
                                 "gain_nats": float(np.mean(lp[m] - base_lp[m]))})
        lps = np.stack(lps)  # [F, N]: the same positions at every fraction, so one resample serves all of them
        boot = np.exp(-block_bootstrap_means(lps, block, n_boot, seed))  # [B, F] perplexities
        ci = np.quantile(boot, [0.025, 0.975], axis=0).T
        x = np.asarray([pos[e, f][1]["rows"] for f in fs], np.float64)
        for f, (lo, hi) in zip(fs, ci, strict=True):
            meta = pos[e, f][1]
            rows.append({"datastore": ds, "fraction": float(f), "datastore_tokens": meta["rows"], **chosen[e, f],
                         "knn_ppl_lo": float(lo), "knn_ppl_hi": float(hi), "second_search": meta["second_search"],
                         "subset_search": meta["subset_search"]})
        if len(fs) >= 2:
            y = np.asarray([chosen[e, f]["knn_ppl"] for f in fs])
            slope, icpt = loglinear_fit(x, y)
            lo, hi = np.quantile(loglinear_fit(x, boot)[0], [0.025, 0.975])
            fits.append({"datastore": ds, "curve": "kNN-LM perplexity", "group": e, "n_points": len(fs),
                         "slope_per_decade": float(slope), "lo": float(lo), "hi": float(hi), "intercept": float(icpt),
                         "ci": f"block bootstrap over positions ({block}-token blocks, {n_boot} replicates)"})
    cols = ["datastore", "eval_set", "fraction", "datastore_tokens", "n_tokens", "base_ppl", "knn_ppl", "knn_ppl_lo",
            "knn_ppl_hi", "lambda", "k", "sigma", "chosen_on", "oracle_ppl", "oracle_lambda", "oracle_k",
            "oracle_sigma", "second_search", "subset_search"]
    grid = pl.concat([
        df.with_columns(pl.lit(e).alias("eval_set"), pl.lit(float(f)).alias("fraction"),
                        pl.lit(pos[e, f][1]["rows"]).alias("datastore_tokens"))
        for (e, f), df in sweeps.items()
    ]).select(["eval_set", "fraction", "datastore_tokens", "lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens"])
    tables = {
        "perplexity": pl.DataFrame(rows).select(cols).sort(["eval_set", "fraction"]),
        "grid": grid.sort(["eval_set", "fraction", "lambda", "k", "sigma"]),
        "fits": pl.DataFrame(fits, schema=FIT_SCHEMA),
        "frequency": pl.DataFrame(freq).sort(["eval_set", "fraction", "bucket_min"]),
    }
    for name, df in tables.items():
        write_table(df, out[name + "_csv"], out[name + "_parquet"])
    return tables


FIT_SCHEMA = {"datastore": pl.Utf8, "curve": pl.Utf8, "group": pl.Utf8, "n_points": pl.Int64,
              "slope_per_decade": pl.Float64, "lo": pl.Float64, "hi": pl.Float64, "intercept": pl.Float64,
              "ci": pl.Utf8}


# --------------------------------------------------------------------------------------------- a real subsample
def write_subsample(parent_manifest, fraction: float, seed: int, model_json, tokens_npy, out_dir) -> dict:
    """A datastore of exactly the fraction-f rows of ``parent_manifest`` (u(row) < f), copied from its shards (no
    extraction): one shard per parent shard, rows in global order, then its manifest (``manifest.json``, with a
    ``subsample`` record: the parent, its manifest digest, fraction, seed) and ``rows.npy``, the parent's global id of
    each row."""
    from .lm import load_identity

    parent = Datastore(parent_manifest)
    out_dir = Path(out_dir)
    ident = load_identity(model_json)
    parent.check_model(ident, model_json)
    files, all_rows = [], []
    for s, (keys, vals) in enumerate(zip(parent.keys, parent.vals, strict=True)):
        a = int(parent.offsets[s])
        local = np.flatnonzero(in_subset(seed, fraction, np.arange(a, a + len(keys))))
        all_rows.append(local + a)
        kp, vp, mp = (out_dir / "subset" / f"{n}_{s:03d}.{x}" for n, x in (("keys", "npy"), ("vals", "npy"),
                                                                           ("shard", "json")))
        with atomic_path(kp, ".npy") as ktmp, atomic_path(vp, ".npy") as vtmp:
            k = open_npy_for_writing(ktmp, KEY_DTYPE, (len(local), parent.dim))
            v = open_npy_for_writing(vtmp, VAL_DTYPE, (len(local),))
            for b in range(0, len(local), 1 << 18):
                k[b : b + (1 << 18)] = keys[local[b : b + (1 << 18)]]
            v[:] = vals[local]
            k.flush()
            v.flush()
            del k, v
            digests = shard_digests(ktmp, vtmp)
        start = sum(len(r) for r in all_rows[:-1])
        write_json(mp, {"shard": s, "start": start, "end": start + len(local), "rows": len(local), **digests,
                        **{k: ident[k] for k in ("model_sha256", "tokenizer_sha256", "hook_point")},
                        **{k: parent.manifest[k] for k in ("window",) if k in parent.manifest}})  # its keys' windows
        files.append((str(kp), str(vp), str(mp)))
    rows = np.concatenate(all_rows).astype(np.int64)
    with atomic_path(out_dir / "rows.npy", ".npy") as tmp:
        np.save(tmp, rows, allow_pickle=False)
        rows_digest = sha256_file(tmp)
    record = {"of": str(parent_manifest), "manifest_sha256": parent.hash, "fraction": float(fraction),
              "seed": int(seed), "rows_sha256": rows_digest}
    return write_manifest(ident, tokens_npy, files, out_dir / "manifest.json", extra={"subsample": record})


# --------------------------------------------------------------------------------------------- steps
@step
def scaling_sweep(
    params: dict, cache: Path, manifest: Path, tokens: Path, index: Path, index_meta: Path, npz: Path, csv: Path,
    parquet: Path, meta: Path, threads: int = 1,
) -> None:
    """Perplexity over the λ/k/σ grid on one fraction of a datastore (--params: fraction, seed, grid), from the full
    datastore's retrieval cache (--cache: its meta.json, checked against the eval set's --tokens); positions short
    of subset neighbours searched again."""
    faiss.omp_set_num_threads(threads)
    scale_sweep(cache.parent, manifest, index, index_meta, params, npz, csv, parquet, meta, tokens)


@step
def scaling_summary(
    params: dict, sweeps: list[Path], npz: list[Path], meta: list[Path], perplexity_csv: Path,
    perplexity_parquet: Path, grid_csv: Path, grid_parquet: Path, fits_csv: Path, fits_parquet: Path,
    frequency_csv: Path, frequency_parquet: Path,
) -> None:
    """The scaling tables of one datastore (--params: keys [(eval set, fraction)], select_on, seed): perplexity per
    fraction at the point chosen at that size, the grid, log-linear fits with CIs, the gain by target frequency."""
    keys = [tuple(k) for k in params["keys"]]
    runs = dict(zip(keys, zip(sweeps, npz, meta, strict=True), strict=True))
    out = {"perplexity_csv": perplexity_csv, "perplexity_parquet": perplexity_parquet, "grid_csv": grid_csv,
           "grid_parquet": grid_parquet, "fits_csv": fits_csv, "fits_parquet": fits_parquet,
           "frequency_csv": frequency_csv, "frequency_parquet": frequency_parquet}
    summarize_scaling(runs, params, out)


@step
def subsample_datastore(params: dict, parent: Path, model_json: Path, tokens: Path, out: Path) -> None:
    """Build a datastore from the fraction-f rows of --parent (u(row) < f for --params seed), copying its shards'
    rows (no extraction); writes its shards (under subset/), rows.npy and its manifest (--out)."""
    write_subsample(parent, params["fraction"], params["seed"], model_json, tokens, out.parent)
