"""The datastore-size scaling study (workflow_scripts/scaling.py): u(row), subsample after retrieve, the fits."""

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts import scaling
from workflow_scripts.artifacts import read_json


# ------------------------------------------------------------------------------------------ u(row)
def test_u_is_a_function_of_seed_and_row_alone():
    rows = np.arange(50_000)
    u = scaling.uniform(7, rows)
    assert u.dtype == np.float64 and ((u >= 0) & (u < 1)).all()
    # the same numbers in any order, any chunking, any shape (shard layout, eval set, job)
    perm = np.random.default_rng(0).permutation(rows)
    np.testing.assert_array_equal(scaling.uniform(7, perm), u[perm])
    np.testing.assert_array_equal(np.concatenate([scaling.uniform(7, c) for c in np.array_split(rows, 7)]), u)
    np.testing.assert_array_equal(scaling.uniform(7, rows.reshape(100, 500)), u.reshape(100, 500))
    # another seed, other numbers
    assert (scaling.uniform(8, rows) != u).mean() > 0.999


def test_u_matches_a_scalar_splitmix64_written_out():
    def mix(x):
        m = (1 << 64) - 1
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
        return x ^ (x >> 31)

    g = 0x9E3779B97F4A7C15
    for seed in (0, 1, 12345, 2**62):
        state = mix((seed + g) & ((1 << 64) - 1))
        for r in (0, 1, 2, 1000, 2**40):
            want = (mix((state + (r + 1) * g) & ((1 << 64) - 1)) >> 11) / 2**53
            assert scaling.uniform(seed, [r])[0] == want


def test_u_is_uniform_and_subsets_are_nested():
    u = scaling.uniform(3, np.arange(200_000))
    counts, _ = np.histogram(u, bins=20, range=(0, 1))
    assert np.abs(counts / 10_000 - 1).max() < 0.05  # each bin within 5% of 10k
    fracs = [0.01, 0.03, 0.1, 0.3, 1.0]
    subs = [set(scaling.subset_rows(200_000, f, 3).tolist()) for f in fracs]
    for small, big in zip(subs, subs[1:], strict=False):
        assert small < big
    assert subs[-1] == set(range(200_000))
    for f, s in zip(fracs, subs, strict=True):
        assert abs(len(s) / 200_000 - f) < 4 * np.sqrt(f * (1 - f) / 200_000) + 1e-9
    # subset_rows in chunks is the same as in one piece
    np.testing.assert_array_equal(scaling.subset_rows(200_000, 0.1, 3, chunk=999),
                                  np.flatnonzero(u < 0.1))


def test_u_refuses_negative_rows():
    with pytest.raises(ValueError, match="rows must be >= 0"):
        scaling.uniform(0, [-1, 2])


# ------------------------------------------------------------------------------------------ subsample after retrieve
def brute_force(keys, queries, K):
    d = ((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
    order = np.argsort(d, axis=1, kind="stable")[:, :K]
    return np.take_along_axis(d, order, 1).astype(np.float32), order


@settings(max_examples=40, deadline=None)
@given(n=st.integers(20, 200), K=st.integers(1, 20), need=st.integers(1, 20), fraction=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**31), q=st.integers(1, 30))
def test_subsample_after_retrieve_equals_a_search_of_the_subset(n, K, need, fraction, seed, q):
    """The first `need` subset neighbours taken from a K-neighbour cache, or searched again when the cache holds too
    few, are exactly the `need` nearest rows of the subset by brute force."""
    need = min(need, K)
    rng = np.random.default_rng(seed)
    keys, queries = rng.normal(size=(n, 4)), rng.normal(size=(q, 4))
    rows = scaling.subset_rows(n, fraction, seed)
    if len(rows) < need:
        return
    dists, ids = brute_force(keys, queries, min(K, n))
    calls = []

    def search_subset(qs, k):
        calls.append(len(qs))
        d, i = brute_force(keys[rows], qs, k)
        return d, rows[i]

    d, i, searched = scaling.subsample_neighbours(
        dists, ids, queries, lambda x: scaling.in_subset(seed, fraction, x), need, search_subset, chunk=7
    )
    want_d, want_i = brute_force(keys[rows], queries, need)
    np.testing.assert_array_equal(i, rows[want_i])
    np.testing.assert_allclose(d, want_d, rtol=1e-6)
    in_cache = scaling.in_subset(seed, fraction, ids).sum(axis=1)
    np.testing.assert_array_equal(searched, in_cache < need)
    assert sum(calls) == searched.sum() and len(calls) == int(searched.any())


class _Keys:
    """The part of a Datastore that the subset search reads: its dimension and its keys by global row."""

    def __init__(self, keys):
        self.keys, self.dim = keys, keys.shape[1]

    def gather_keys(self, ids):
        return self.keys[ids].astype(np.float32)


@pytest.mark.parametrize("exact", [True, False])
def test_the_subset_search_returns_the_subsets_nearest_rows(exact):
    """Flat: a Flat index over the subset's keys; IVF: the parent index with an ID selector of the subset (here
    probing every list, so it must find the exact answer too, distances recomputed from the keys)."""
    import faiss

    rng = np.random.default_rng(4)
    keys, queries = rng.normal(size=(3000, 8)).astype(np.float32), rng.normal(size=(40, 8)).astype(np.float32)
    rows = scaling.subset_rows(3000, 0.2, 9)
    index = None
    if not exact:
        index = faiss.index_factory(8, "IVF16,Flat")
        index.train(keys)
        index.add(keys)
    search = scaling.SubsetSearch(_Keys(keys), rows, index, exact=exact, nprobe=16)
    d, i = search(queries, 25)
    want_d, want_i = brute_force(keys[rows], queries, 25)
    np.testing.assert_array_equal(i, rows[want_i])
    np.testing.assert_allclose(d, want_d, rtol=1e-4, atol=1e-5)
    assert scaling.in_subset(9, 0.2, i).all()


def test_loglinear_fit_recovers_a_line_and_fits_replicates_at_once():
    x = np.array([1e3, 1e4, 1e5, 1e6])
    y = 5.0 - 0.25 * np.log10(x)
    b, a = scaling.loglinear_fit(x, y)
    assert b == pytest.approx(-0.25) and a == pytest.approx(5.0)
    ys = np.stack([y, 2 * y, y + 1])
    bs, _ = scaling.loglinear_fit(x, ys)
    np.testing.assert_allclose(bs, [-0.25, -0.5, -0.25])
    # against numpy's least squares
    rng = np.random.default_rng(0)
    y = rng.normal(size=4)
    assert scaling.loglinear_fit(x, y)[0] == pytest.approx(np.polyfit(np.log10(x), y, 1)[0])


def test_block_bootstrap_means_resample_whole_blocks_shared_by_every_row():
    rng = np.random.default_rng(2)
    values = rng.normal(size=(3, 103))
    got = scaling.block_bootstrap_means(values, 10, 40, seed=1)
    # by hand: the same block draws, each replicate the mean over the positions of its blocks
    pick = np.random.default_rng(1).integers(0, 11, size=(40, 11))
    for b, p in enumerate(pick):
        idx = np.concatenate([np.arange(10 * j, min(10 * j + 10, 103)) for j in p])
        np.testing.assert_allclose(got[b], values[:, idx].mean(axis=1), rtol=1e-12)
    # constant rows give constant replicates
    assert np.allclose(scaling.block_bootstrap_means(np.ones((2, 50)), 7, 20, 0), 1.0)


# ------------------------------------------------------------------------------------------ against a real datastore
FRACTIONS = [0.01, 0.03, 0.1, 0.3, 1.0]


def real_and_subsampled(work, fraction, ks, seed, out):
    """(sweep table, per-position log p_knn [σ, k, N]) on the fraction-f datastore two ways: subsample-after-retrieve
    from the full datastore's cache (scaling.scale_sweep), and a datastore built for real from the same rows
    (scaling.write_subsample: its own Flat index, its own retrieval of the eval set, the sweep stage's run_sweep).
    Run from the run directory ``work`` (model.json's paths are relative to it)."""
    import polars as pl

    from workflow_scripts import index, knnlm, retrieval, retrieval_cache, sweep

    r = Path("results")
    manifest, model = r / "datastores/micro/manifest.json", r / "models/micro-gpt2/model.json"
    grid = {"lambdas": [0.0, 0.25, 0.5], "ks": ks, "sigmas": [1.0, 10.0]}
    p = {"fraction": fraction, "seed": seed, "grid": grid}
    sub = out / "sub"
    scaling.scale_sweep(r / "retrieval/valid/micro", manifest, r / "datastores/micro/index.faiss",
                        r / "datastores/micro/index.json", p, sub / "positions.npz", sub / "ppl.csv",
                        sub / "ppl.parquet", sub / "meta.json")
    arrays, meta = scaling.load_positions(sub / "positions.npz", sub / "meta.json")
    real = out / "real"
    scaling.write_subsample(manifest, fraction, seed, model, r / "tokens/micro-gpt2/micro/train.npy", real)
    index.build_index(real / "manifest.json", {"type": "Flat"}, 0, real / "index.faiss", real / "index.json")
    cfg = {"k_max": 32, "max_tokens": 300, "block_size": 32, "batch_size": 8, "device": "cpu", "dtype": "float16",
           "gpu_shard_above_gb": 4}
    retrieval.retrieve(model, real / "manifest.json", real / "index.faiss", real / "index.json",
                       r / "tokens/micro-gpt2/micro/valid.npy", cfg, real / "cache")
    want = sweep.run_sweep(real / "cache", real / "manifest.json", grid, real / "ppl.csv", real / "ppl.parquet")
    c = retrieval_cache.load_cache(real / "cache")
    want_lp = np.stack([np.stack([v for _, v in sorted(knnlm.knn_target_logprobs(
        c["dists"], c["vals"], c["targets"], ks, s).items())]) for s in grid["sigmas"]])
    return pl.read_parquet(sub / "ppl.parquet"), want, arrays, want_lp, meta


@pytest.mark.slow
@pytest.mark.parametrize("fraction", FRACTIONS)
def test_subsample_after_retrieve_equals_a_datastore_built_from_the_same_rows(micro_run, tmp_path, fraction,
                                                                              monkeypatch):
    """At every fraction, the whole grid's perplexity and every position's log p_knn from the full datastore's one
    retrieval equal those of a datastore built for real from the fraction's rows (its own Flat index and retrieval),
    to float precision. With the grid's largest k at 32 = K_max, every position below fraction 1 needs the second
    search; with k up to 8 of the 32 cached, some positions are served from the cache and others searched again."""
    monkeypatch.chdir(micro_run)
    for ks in ([1, 8, 32], [1, 8]):
        got, want, arrays, want_lp, meta = real_and_subsampled(micro_run, fraction, ks, 11, tmp_path / str(len(ks)))
        assert got.select("lambda", "k", "sigma").equals(want.select("lambda", "k", "sigma"))
        np.testing.assert_allclose(got["ppl"].to_numpy(), want["ppl"].to_numpy(), rtol=1e-6)
        np.testing.assert_array_equal(got["base_ppl"].to_numpy(), want["base_ppl"].to_numpy())
        np.testing.assert_allclose(arrays["knn_logprob"], want_lp, rtol=1e-5, atol=1e-6)
        n = meta["n_tokens"]
        assert meta["rows"] == len(scaling.subset_rows(meta["datastore_rows"], fraction, 11))
        if fraction == 1.0:
            assert meta["second_search"] == 0
        elif ks[-1] == 32:
            assert meta["second_search"] == n
        elif fraction >= 0.3:  # both paths taken: cached subset neighbours for some positions, a search for others
            assert 0 < meta["second_search"] < n
        assert arrays["searched"].sum() == meta["second_search"]


# ------------------------------------------------------------------------------------------ the pipeline (full run)
@pytest.mark.slow
def test_a_subsample_datastore_built_for_real_retrieves_what_subsample_after_retrieve_gives(full_run):
    """datastores.micro_tenth (subsample of micro, fraction 0.1, seed 5) is built by copying micro's rows; its own
    index, retrieval and sweep give the grid the scaling study computes at fraction 0.1 from micro's one retrieval."""
    import polars as pl

    from workflow_scripts.datastore import Datastore

    r = full_run[0] / "results"
    parent = Datastore(r / "datastores/micro/manifest.json")
    child = Datastore(r / "datastores/micro_tenth/manifest.json")
    rows = np.load(r / "datastores/micro_tenth/rows.npy")
    np.testing.assert_array_equal(rows, scaling.subset_rows(parent.rows, 0.1, 5))
    np.testing.assert_array_equal(child.gather_keys(np.arange(child.rows)), parent.gather_keys(rows))
    np.testing.assert_array_equal(child.gather_vals(np.arange(child.rows)), parent.gather_vals(rows))
    assert child.manifest["subsample"]["manifest_sha256"] == parent.hash
    for e in ("valid", "test"):
        real = pl.read_parquet(r / f"sweeps/{e}/micro_tenth/perplexity.parquet")
        sub = pl.read_parquet(r / f"scaling/{e}/micro/0.1/perplexity.parquet")
        assert real.select("lambda", "k", "sigma").equals(sub.select("lambda", "k", "sigma"))
        np.testing.assert_allclose(sub["ppl"].to_numpy(), real["ppl"].to_numpy(), rtol=1e-6)


@pytest.mark.slow
def test_the_scaling_tables_agree_with_the_full_datastore_and_hold_their_invariants(full_run):
    """At fraction 1 the study is the ordinary sweep and task stages (same perplexity, same chosen point, same task
    Δ); the subsets are the same for every eval set; the frequency buckets partition the eval positions."""
    import polars as pl

    r = full_run[0] / "results"
    ppl = pl.read_parquet(r / "tables/scaling/micro/perplexity.parquet")
    assert sorted(ppl["fraction"].unique().to_list()) == FRACTIONS
    summary = pl.read_parquet(r / "tables/perplexity_summary.parquet").filter(pl.col("datastore") == "micro")
    full = ppl.filter(pl.col("fraction") == 1.0).sort("eval_set")
    for c in ("knn_ppl", "base_ppl", "oracle_ppl", "lambda", "k", "sigma"):
        np.testing.assert_allclose(full[c].to_numpy(), summary.sort("eval_set")[c].to_numpy(), rtol=1e-12)
    assert (full["second_search"] == 0).all() and (ppl.filter(pl.col("fraction") < 1)["second_search"] == 300).all()
    for f in FRACTIONS:  # one subset per fraction, whatever the eval set
        metas = [read_json(r / f"scaling/{e}/micro/{scaling.fraction_name(f)}/meta.json") for e in ("valid", "test")]
        assert metas[0]["rows"] == metas[1]["rows"] == len(scaling.subset_rows(metas[0]["datastore_rows"], f, 5))
    sizes = ppl.group_by("fraction").agg(pl.col("datastore_tokens").n_unique())["datastore_tokens"]
    assert (sizes == 1).all() and ppl.sort("fraction")["datastore_tokens"].is_sorted()
    freq = pl.read_parquet(r / "tables/scaling/micro/frequency.parquet")
    assert (freq.group_by("eval_set", "fraction").agg(pl.col("n_tokens").sum())["n_tokens"] == 300).all()
    # task Δ at fraction 1: the task stages' own, at the same perplexity-chosen point
    tasks = pl.read_parquet(r / "tables/task_summary.parquet").filter(pl.col("datastore") == "micro")
    delta = pl.read_parquet(r / "tables/scaling/micro/task_delta.parquet")
    at1 = delta.filter((pl.col("fraction") == 1.0) & (pl.col("level") == "task")).sort("group")
    np.testing.assert_allclose(at1["delta"].to_numpy(), tasks.sort("task")["delta"].to_numpy(), atol=1e-12)
    assert at1["lambda"].to_list() == tasks.sort("task")["lambda"].to_list()
    assert (delta.filter(pl.col("fraction") == 1.0)["second_search"] == 0).all()
    assert set(delta.filter(pl.col("level") == "category")["group"]) == {"memory", "reasoning"}
    assert ((delta["lo"] <= delta["delta"]) & (delta["delta"] <= delta["hi"])).all()
    fits = pl.read_parquet(r / "tables/scaling/micro/task_fits.parquet")
    assert set(fits.filter(pl.col("curve") == "task Δ (category)")["group"]) == {"memory", "reasoning"}
    assert ((fits["lo"] <= fits["slope_per_decade"]) & (fits["slope_per_decade"] <= fits["hi"])).all()
    for fig in ("perplexity", "tasks", "frequency"):
        assert (r / f"figures/scaling/micro/{fig}.png").stat().st_size > 0


@pytest.mark.slow
def test_a_rerun_of_one_fraction_gives_the_same_arrays(full_run, tmp_path):
    """u(row) and the second search are deterministic: the study's per-position arrays, computed again, are equal."""
    r = full_run[0] / "results"
    p = {"fraction": 0.03, "seed": 5, "grid": {"lambdas": [0.0, 0.25, 0.5], "ks": [1, 8, 32], "sigmas": [1, 10]}}
    ds = r / "datastores/micro"
    scaling.scale_sweep(r / "retrieval/test/micro", ds / "manifest.json", ds / "index.faiss", ds / "index.json", p,
                        tmp_path / "p.npz", tmp_path / "p.csv", tmp_path / "p.parquet", tmp_path / "meta.json")
    again, _ = scaling.load_positions(tmp_path / "p.npz", tmp_path / "meta.json")
    run = r / "scaling/test/micro/0.03"
    first, _ = scaling.load_positions(run / "positions.npz", run / "meta.json")
    for k in first:
        np.testing.assert_array_equal(again[k], first[k])


@pytest.mark.slow
def test_adding_a_fraction_reruns_only_the_scaling_stages(full_run, tmp_path):
    """The plan with one more fraction, beside the plan of the same run without it: the extra jobs are the new
    fraction's sweeps (one per eval set), the study's tables and figures, and the table of job times."""
    import yaml
    from conftest import config_path, job_stats, snakemake

    work = full_run[0]
    cfg = yaml.safe_load(config_path("full").read_text())
    (tmp_path / "same.yaml").write_text(yaml.safe_dump(cfg))
    cfg["scaling"]["fractions"] = [*FRACTIONS, 0.5]
    (tmp_path / "more.yaml").write_text(yaml.safe_dump(cfg))
    plans = {}
    for name in ("same", "more"):
        proc = snakemake(work, "-n", "--configfile", str(tmp_path / f"{name}.yaml"))
        plans[name] = job_stats(proc.stdout + proc.stderr)
    extra = {r: n - plans["same"].get(r, 0) for r, n in plans["more"].items() if n > plans["same"].get(r, 0)}
    assert extra.pop("scaling_sweep") == 2  # the new fraction, for each eval set
    # the study's stages, and the table of every job's time, which reads their benchmark files
    assert set(extra) <= {"scaling_summary", "scaling_tasks", "figure_scaling_perplexity", "figure_scaling_tasks",
                          "figure_scaling_frequency", "stage_times", "all"}
    assert {"scaling_summary", "scaling_tasks"} <= set(extra)
