"""The kNN-LM math against an independent brute force, its invariants, retrieval order, and shard ranges."""

import math
import warnings

import faiss
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from workflow_scripts import knnlm
from workflow_scripts.artifacts import ArtifactError
from workflow_scripts.datastore import shard_ranges
from workflow_scripts.forward import windows
from workflow_scripts.index import exact_sq_l2, search

FAST = settings(max_examples=40, deadline=None)
FLT_MAX = np.finfo(np.float32).max


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Tiny indexes: OpenMP start-up dominates (seconds per search on a busy machine), so use one thread."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------------------------------------- helpers


def random_cache(rng, n=40, K=12, V=7, scale=20.0):
    """Ascending float32 distances, values with duplicates (small V), targets; some rows lack the target."""
    dists = np.sort(rng.uniform(0, scale, (n, K)), axis=1).astype(np.float32)
    dists[::5, 1:3] = dists[::5, 1:2]  # exact ties in distance
    vals = rng.integers(0, V, (n, K)).astype(np.int32)
    targets = rng.integers(0, V, n).astype(np.int32)
    vals[::4] = np.where(vals[::4] == targets[::4, None], (vals[::4] + 1) % V, vals[::4])  # target absent
    lm = np.log(rng.uniform(0.01, 1.0, n)).astype(np.float32)
    return dists, vals, targets, lm


def brute_p_knn(d_row, v_row, target, k, sigma):
    """p_knn(target) with plain loops, straight from the definition (weights not shifted)."""
    num = den = 0.0
    for i in range(k):
        w = math.exp(-float(d_row[i]) / sigma)
        den += w
        if int(v_row[i]) == int(target):
            num += w
    return num / den


def brute_ppl(dists, vals, targets, lm, k, sigma, lam):
    total = 0.0
    for r in range(len(targets)):
        p = lam * brute_p_knn(dists[r], vals[r], targets[r], k, sigma) + (1 - lam) * math.exp(float(lm[r]))
        if p == 0.0:
            return math.inf
        total += math.log(p)
    return math.exp(-total / len(targets))


def brute_distribution(d_row, v_row, k, sigma, V):
    """Full p_knn over the vocabulary; neighbours with value -1 (missing) carry no weight at all."""
    p = [0.0] * V
    for i in range(k):
        if v_row[i] >= 0:
            p[int(v_row[i])] += math.exp(-float(d_row[i]) / sigma)
    s = sum(p)
    return [x / s for x in p]


# ------------------------------------------------------------------------------ brute-force agreement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_knn_target_logprobs_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    dists, vals, targets, _ = random_cache(rng)
    ks, sigma = [1, 3, 7, 12], [0.5, 2.0, 10.0][seed]
    out = knnlm.knn_target_logprobs(dists, vals, targets, ks, sigma)
    assert sorted(out) == ks
    n_absent = 0
    for k in ks:
        assert out[k].dtype == np.float64 and out[k].shape == (len(targets),)
        for r in range(len(targets)):
            p = brute_p_knn(dists[r], vals[r], targets[r], k, sigma)
            if p == 0.0:
                n_absent += 1
                assert out[k][r] == -np.inf
            else:
                assert out[k][r] == pytest.approx(math.log(p), rel=1e-10, abs=1e-12)
    assert n_absent > 0  # the absent-target rows were exercised
    assert (vals[:, :, None] == vals[:, None, :]).sum() > vals.size  # duplicate values were exercised


def test_knn_target_logprobs_chunking_and_k_order_do_not_matter():
    rng = np.random.default_rng(5)
    dists, vals, targets, _ = random_cache(rng, n=23)
    full = knnlm.knn_target_logprobs(dists, vals, targets, [4, 1, 4, 9], 3.0)
    chunked = knnlm.knn_target_logprobs(dists, vals, targets, [9, 1, 4], 3.0, chunk=4)
    assert sorted(full) == [1, 4, 9]
    for k in full:
        np.testing.assert_array_equal(full[k], chunked[k])


def test_sweep_matches_brute_force():
    rng = np.random.default_rng(11)
    dists, vals, targets, lm = random_cache(rng, n=30, K=10)
    lambdas, ks, sigmas = [0.0, 0.25, 0.7, 1.0], [10, 2, 5], [1.0, 4.0]
    rows = knnlm.sweep(dists, vals, targets, lm, lambdas, ks, sigmas)
    assert len(rows) == len(lambdas) * len(ks) * len(sigmas)
    assert {(r["lambda"], r["k"], r["sigma"]) for r in rows} == {(a, b, c) for a in lambdas for b in ks
                                                                   for c in sigmas}
    base = brute_ppl(dists, vals, targets, lm, 1, 1.0, 0.0)
    for r in rows:
        want = brute_ppl(dists, vals, targets, lm, r["k"], r["sigma"], r["lambda"])
        if r["lambda"] == 1.0:
            assert want == math.inf  # some rows lack the target, so pure kNN assigns them zero probability
            assert r["ppl"] == math.inf
        else:
            assert r["ppl"] == pytest.approx(want, rel=1e-9)
        assert r["base_ppl"] == pytest.approx(base, rel=1e-12)
        assert r["n_tokens"] == len(targets)


def test_lambda_zero_is_bitwise_base_lm_and_lambda_one_is_pure_knn():
    rng = np.random.default_rng(3)
    dists, vals, targets, lm = random_cache(rng, n=25, K=8)
    vals[:, 0] = targets  # the target is always present, so the pure kNN perplexity is finite
    rows = knnlm.sweep(dists, vals, targets, lm, [0.0, 1.0, 0.5], [1, 8], [2.0])
    base = float(np.exp(-np.mean(lm.astype(np.float64))))
    for r in rows:
        if r["lambda"] == 0.0:
            assert r["ppl"] == r["base_ppl"] == knnlm.perplexity(lm) == base  # bitwise
        if r["lambda"] == 1.0:
            knn = knnlm.knn_target_logprobs(dists, vals, targets, [r["k"]], 2.0)[r["k"]]
            assert r["ppl"] == knnlm.perplexity(knn)
            assert r["ppl"] == pytest.approx(brute_ppl(dists, vals, targets, lm, r["k"], 2.0, 1.0), rel=1e-10)
            if r["k"] == 1:
                assert r["ppl"] == 1.0  # the nearest neighbour always carries the target
    lp = knnlm.knn_target_logprobs(dists, vals, targets, [8], 2.0)[8]
    lp[::3] = -np.inf  # even where the kNN gives the target no probability
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the end points are exact cases, not log(0) arithmetic
        np.testing.assert_array_equal(knnlm.interpolate(lm, lp, 0.0), lm.astype(np.float64))
        np.testing.assert_array_equal(knnlm.interpolate(lm, lp, 1.0), lp)
        assert knnlm.sweep(dists, vals, targets, lm, [0.0], [8], [2.0])[0]["ppl"] == knnlm.perplexity(lm)


def test_knn_distribution_normalised_and_consistent_with_target_logprobs():
    rng = np.random.default_rng(8)
    V = 9
    dists, vals, targets, _ = random_cache(rng, n=30, K=10, V=V)
    for k, sigma in [(1, 1.0), (4, 0.7), (10, 5.0)]:
        p = knnlm.knn_distribution(dists, vals, k, sigma, V)
        assert p.shape == (30, V)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
        assert (p >= 0).all()
        lp = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
        np.testing.assert_allclose(p[np.arange(30), targets], np.exp(lp), rtol=1e-10, atol=1e-300)
        for r in range(0, 30, 3):
            np.testing.assert_allclose(p[r], brute_distribution(dists[r], vals[r], k, sigma, V), rtol=1e-10)


def test_missing_neighbours_at_the_tail_like_faiss_returns_them():
    """faiss pads with id -1 at distance FLT_MAX: such neighbours carry no weight in either function."""
    rng = np.random.default_rng(4)
    V = 6
    dists, vals, targets, _ = random_cache(rng, n=20, K=8, V=V, scale=5.0)
    dists[:, 5:], vals[:, 5:] = FLT_MAX, -1
    lp = knnlm.knn_target_logprobs(dists, vals, targets, [5, 8], 1.0)
    np.testing.assert_array_equal(lp[5], lp[8])
    p = knnlm.knn_distribution(dists, vals, 8, 1.0, V)
    np.testing.assert_allclose(p, knnlm.knn_distribution(dists, vals, 5, 1.0, V), rtol=1e-12, atol=0)
    np.testing.assert_allclose(p[np.arange(20), targets], np.exp(lp[8]), rtol=1e-10)


def test_knn_distribution_missing_nearest_neighbour_does_not_underflow_the_rest():
    """Regression: the softmax shift used the nearest neighbour even when it was missing (-1), so with a small
    σ every real weight underflowed and the row came out NaN."""
    dists = np.array([[13.0, 14.9, 15.0]], np.float32)
    vals = np.array([[-1, 0, 2]], np.int32)
    p = knnlm.knn_distribution(dists, vals, 3, 0.01, 3)
    d = dists[0].astype(np.float64)
    w2 = math.exp(-(d[2] - d[1]) / 0.01)  # weight of value 2 relative to value 0
    np.testing.assert_allclose(p[0], [1 / (1 + w2), 0.0, w2 / (1 + w2)], rtol=1e-12)
    np.testing.assert_allclose(knnlm.knn_distribution(dists, vals, 3, 1.0, 3)[0],
                               brute_distribution(dists[0], vals[0], 3, 1.0, 3), rtol=1e-12)


def test_knn_probs_at_missing_nearest_neighbour_does_not_underflow_the_rest():
    """Issue 30 (mutation gap): knn_probs_at must shift by the nearest *real* neighbour. A version shifting by the
    missing neighbour's distance (0 here) underflows both real weights (exp(-1000)) and returns NaN."""
    dists = np.array([[0.0, 1000.0, 1001.0]], np.float32)
    vals = np.array([[-1, 5, 6]], np.int32)
    p = knnlm.knn_probs_at(dists, vals, [5, 6, 7], [3], 1.0)[3]
    e = math.exp(-1.0)
    np.testing.assert_allclose(p[0], [1 / (1 + e), e / (1 + e), 0.0], rtol=1e-12)
    np.testing.assert_allclose(p[0], knnlm.knn_distribution(dists, vals, 3, 1.0, 8)[0, [5, 6, 7]], rtol=1e-12)


# ------------------------------------------------------------------------------------ properties


@st.composite
def caches(draw, allow_missing=True):
    n = draw(st.integers(1, 12))
    K = draw(st.integers(1, 10))
    V = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.0, 1e-3, 1.0, 50.0, 1e4]))
    rng = np.random.default_rng(seed)
    dists = np.sort(rng.uniform(0, scale, (n, K)), axis=1).astype(np.float32)
    if draw(st.booleans()):
        dists = np.round(dists)  # many exact ties
    low = -1 if allow_missing else 0
    vals = rng.integers(low, V, (n, K)).astype(np.int32)
    targets = rng.integers(0, V, n).astype(np.int32)
    lm = np.log(rng.uniform(1e-6, 1.0, n)).astype(np.float32)
    k = draw(st.integers(1, K))
    sigma = draw(st.sampled_from([1e-3, 0.1, 1.0, 7.5, 1e3]))
    return dists, vals, targets, lm, k, sigma, V


@FAST
@given(caches())
def test_p_knn_is_a_probability_and_ignores_missing_neighbours(c):
    dists, vals, targets, _, k, sigma, _ = c
    lp = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
    assert not np.isnan(lp).any()
    assert (lp <= 0.0).all()  # p_knn <= 1, exactly
    p = np.exp(lp)
    assert ((p >= 0) & (p <= 1)).all()
    hit = (vals[:, :k] == targets[:, None]).any(axis=1)
    assert np.isneginf(lp[~hit]).all()  # zero when no neighbour among the first k carries the target
    first_hit = np.where(hit, np.argmax(vals[:, :k] == targets[:, None], axis=1), 0)
    gap = (dists[np.arange(len(vals)), first_hit].astype(np.float64) - dists[:, 0]) / sigma
    assert np.isfinite(lp[hit & (gap < 700)]).all()  # and only then (unless its weight underflows)
    # neighbours with value -1 never carry probability: turning a target-carrying neighbour into a missing one
    # can only lower p_knn(target), and all-missing rows give zero probability
    masked = np.where(vals == targets[:, None], -1, vals).astype(np.int32)
    lp_masked = knnlm.knn_target_logprobs(dists, masked, targets, [k], sigma)[k]
    assert np.isneginf(lp_masked).all()
    all_missing = np.full_like(vals, -1)
    assert np.isneginf(knnlm.knn_target_logprobs(dists, all_missing, targets, [k], sigma)[k]).all()


@FAST
@given(caches(allow_missing=True))
def test_knn_distribution_gives_no_mass_to_missing_neighbours(c):
    dists, vals, targets, _, k, sigma, V = c
    assume((vals[:, :k] >= 0).any(axis=1).all())  # every row keeps at least one real neighbour
    p = knnlm.knn_distribution(dists, vals, k, sigma, V)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    present = np.zeros_like(p, dtype=bool)
    for r in range(len(vals)):
        for v in vals[r, :k]:
            if v >= 0:
                present[r, v] = True
    assert (p[~present] == 0).all()  # only values of real neighbours get mass
    assert (p[present] > 0).all() or scale_underflows(dists, k, sigma)


def scale_underflows(dists, k, sigma):
    d = dists[:, :k].astype(np.float64)
    return bool(((d - d[:, :1]) / sigma > 700).any())


@FAST
@given(caches(allow_missing=False))
def test_knn_distribution_agrees_with_target_logprobs(c):
    dists, vals, targets, _, k, sigma, V = c
    p = knnlm.knn_distribution(dists, vals, k, sigma, V)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    lp = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
    np.testing.assert_allclose(p[np.arange(len(targets)), targets], np.exp(lp), rtol=1e-9, atol=1e-300)


@FAST
@given(caches(), st.floats(0.0, 1.0))
def test_interpolation_lies_between_its_components(c, lam):
    dists, vals, targets, lm, k, sigma, _ = c
    knn = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
    mix = knnlm.interpolate(lm, knn, lam)
    lo = np.minimum(knn, lm.astype(np.float64))
    hi = np.maximum(knn, lm.astype(np.float64))
    tol = 1e-12 * (1 + np.abs(np.where(np.isfinite(lo), lo, 0)))
    assert (mix <= hi + tol).all()
    assert (mix >= lo - tol).all()
    if 0 < lam < 1:
        assert np.isfinite(mix).all()  # the LM part keeps every token's probability positive
        np.testing.assert_allclose(np.exp(mix), lam * np.exp(knn) + (1 - lam) * np.exp(lm.astype(np.float64)),
                                   rtol=1e-10)


@FAST
@given(caches(allow_missing=False), st.lists(st.floats(0.0, 1.0), min_size=2, max_size=5, unique=True))
def test_perplexity_sanity_in_lambda(c, lambdas):
    dists, vals, targets, lm, k, sigma, _ = c
    knn = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
    lm64 = lm.astype(np.float64)
    lambdas = sorted(lambdas)
    ppl = [knnlm.perplexity(knnlm.interpolate(lm, knn, lam)) for lam in lambdas]
    ppl_lm, ppl_knn = knnlm.perplexity(lm), knnlm.perplexity(knn)
    for lam, p in zip(lambdas, ppl, strict=True):
        # Jensen (log is concave): ppl(λ) <= ppl_knn^λ · ppl_lm^(1-λ) <= max(ppl_knn, ppl_lm)
        assert p <= max(ppl_lm, ppl_knn) * (1 + 1e-9)
        if np.isfinite(ppl_knn) and 0 < lam < 1:
            assert p <= ppl_knn**lam * ppl_lm ** (1 - lam) * (1 + 1e-9)
    # where p_knn >= p_lm on every token, more kNN weight can only help (and conversely)
    if (knn >= lm64).all():
        assert all(b <= a * (1 + 1e-9) for a, b in zip(ppl, ppl[1:], strict=False))
    if (knn <= lm64).all():
        assert all(b >= a * (1 - 1e-9) for a, b in zip(ppl, ppl[1:], strict=False))


@FAST
@given(caches(allow_missing=False))
def test_perplexity_monotone_when_knn_dominates(c):
    dists, vals, targets, _, k, sigma, _ = c
    knn = knnlm.knn_target_logprobs(dists, vals, targets, [k], sigma)[k]
    assume(np.isfinite(knn).all())
    lm = knn - 0.5  # p_lm < p_knn on every token, so perplexity strictly falls as λ grows
    rows = knnlm.sweep(dists, vals, targets, lm, [0.0, 0.3, 0.6, 1.0], [k], [sigma])
    ppl = [r["ppl"] for r in sorted(rows, key=lambda r: r["lambda"])]
    assert all(b < a for a, b in zip(ppl, ppl[1:], strict=False))
    assert ppl[0] == pytest.approx(math.exp(0.5) * ppl[-1], rel=1e-9)


# ----------------------------------------------------------------------------------- invalid input


def test_invalid_input_raises_value_error():
    rng = np.random.default_rng(0)
    dists, vals, targets, lm = random_cache(rng, n=10, K=5)
    bad = dists.copy()
    bad[7, 2], bad[7, 3] = bad[7, 3] + 1, bad[7, 2]  # row 7 not ascending
    with pytest.raises(ValueError, match="ascending"):
        knnlm.knn_target_logprobs(bad, vals, targets, [5], 1.0)
    with pytest.raises(ValueError, match="ascending"):
        knnlm.knn_target_logprobs(bad, vals, targets, [5], 1.0, chunk=3)  # in a later chunk
    with pytest.raises(ValueError, match="ascending"):
        knnlm.sweep(bad, vals, targets, lm, [0.5], [5], [1.0])
    with pytest.raises(ValueError, match="ascending"):
        knnlm.knn_distribution(bad, vals, 5, 1.0, 7)
    for k in (0, 6, -1):
        with pytest.raises(ValueError, match="outside"):
            knnlm.knn_target_logprobs(dists, vals, targets, [1, k], 1.0)
        with pytest.raises(ValueError, match="outside"):
            knnlm.knn_distribution(dists, vals, k, 1.0, 7)
        with pytest.raises(ValueError, match="outside"):
            knnlm.sweep(dists, vals, targets, lm, [0.5], [k], [1.0])
    for sigma in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            knnlm.knn_target_logprobs(dists, vals, targets, [3], sigma)
        with pytest.raises(ValueError, match="sigma"):
            knnlm.knn_distribution(dists, vals, 3, sigma, 7)
        with pytest.raises(ValueError, match="sigma"):
            knnlm.sweep(dists, vals, targets, lm, [0.5], [3], [1.0, sigma])
    lp = knnlm.knn_target_logprobs(dists, vals, targets, [3], 1.0)[3]
    for lam in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="lambda"):
            knnlm.interpolate(lm, lp, lam)
        with pytest.raises(ValueError, match="lambda"):
            knnlm.sweep(dists, vals, targets, lm, [0.5, lam], [3], [1.0])
    with pytest.raises(ValueError, match="must be equal"):
        knnlm.knn_target_logprobs(dists, vals[:, :4], targets, [3], 1.0)
    with pytest.raises(ValueError, match="must be equal"):
        knnlm.knn_distribution(dists[0], vals[0], 1, 1.0, 7)



def test_error_messages_in_full_and_the_smallest_word_count():
    """The refusals' messages are what a user reads: checked whole, not by a fragment."""
    rng = np.random.default_rng(0)
    dists, vals, targets, lm = random_cache(rng, n=6, K=4)
    bad = dists[:, ::-1].copy()
    unsorted = r"^neighbour distances must be sorted ascending per row$"
    with pytest.raises(ValueError, match=unsorted):
        knnlm.knn_target_logprobs(bad, vals, targets, [4], 1.0)
    with pytest.raises(ValueError, match=unsorted):
        knnlm.knn_distribution(bad, vals, 4, 1.0, 7)
    with pytest.raises(ValueError, match=unsorted):
        knnlm.knn_probs_at(bad, vals, [1, 2], [4], 1.0)
    with pytest.raises(ValueError, match=r"^word perplexity over 0 words$"):
        knnlm.word_perplexity(lm, 0)
    lp = np.log([0.5, 0.25])
    assert knnlm.word_perplexity(lp, 1) == pytest.approx(8.0, rel=1e-12)  # one word: exp(-(log .5 + log .25))


def test_interpolation_is_computed_in_float64_from_float32_caches():
    """The caches store log-probabilities as float32; the mixture is computed in float64 (a float32 mixture would
    be off by ~1e-7 relative, enough to reorder close grid points)."""
    rng = np.random.default_rng(1)
    lm = np.log(rng.uniform(0.01, 1, 50)).astype(np.float32)
    knn = np.log(rng.uniform(0.01, 1, 50)).astype(np.float32)
    got = knnlm.interpolate(lm, knn, 0.3)
    want = np.log(0.3 * np.exp(knn.astype(np.float64)) + 0.7 * np.exp(lm.astype(np.float64)))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    assert knnlm.interpolate(lm, knn, 0.0).dtype == np.float64 and knnlm.interpolate(lm, knn, 1.0).dtype == np.float64


# ------------------------------------------------------------------------------------------- retrieval


def _flat(xb):
    index = faiss.IndexFlatL2(xb.shape[1])
    index.add(xb)
    return index


def _brute_sq_l2(q, xb):
    return ((q.astype(np.float64)[:, None, :] - xb.astype(np.float64)[None, :, :]) ** 2).sum(-1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(5, 80), st.integers(1, 8), st.integers(1, 30),
       st.integers(1, 30), st.booleans())
def test_larger_k_never_drops_a_neighbour(seed, n, d, k1, k2, dup):
    k1, k2 = sorted((min(k1, n), min(k2, n)))
    assume(k1 < k2)
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    if dup:  # exact duplicates make exact distance ties
        xb[n // 2 :] = xb[: n - n // 2]
    q = rng.standard_normal((25, d)).astype(np.float32)
    index = _flat(xb)
    d1, i1 = search(index, None, q, k1, exact=True)  # the project's search, as retrieve and score_task call it
    d2, i2 = search(index, None, q, k2, exact=True)
    assert (i1 >= 0).all() and (i2 >= 0).all()
    np.testing.assert_allclose(d2[:, :k1], d1, rtol=1e-6, atol=1e-5)
    for r in range(len(q)):
        kept = set(i2[r].tolist())
        for j, idx in enumerate(i1[r].tolist()):
            # a neighbour may only be swapped for another one at exactly the same distance as the k2-th one
            assert idx in kept or abs(d1[r, j] - d2[r, -1]) <= 1e-5 * (1 + abs(d2[r, -1]))
        if d1[r, -1] < d2[r, -1] - 1e-5 * (1 + abs(d2[r, -1])):
            assert set(i1[r].tolist()) <= kept  # no tie at the boundary: strictly a subset
    # and the kNN-LM of the first k1 of the k2 cached neighbours is the kNN-LM of a search for k1 (rescoring a
    # cache retrieved once at K_max is exact), wherever no tie straddles the k1-th neighbour
    vals = rng.integers(0, 5, n).astype(np.int32)
    targets = rng.integers(0, 5, len(q))
    untied = np.array([d2[r, k1 - 1] < d2[r, k1] - 1e-5 if k1 < k2 else True for r in range(len(q))])
    from_cache = knnlm.knn_target_logprobs(d2, vals[i2], targets, [k1], 1.0)[k1]
    fresh = knnlm.knn_target_logprobs(d1, vals[i1], targets, [k1], 1.0)[k1]
    np.testing.assert_allclose(from_cache[untied], fresh[untied], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1024, 7])
def test_search_exact_returns_ascending_true_distances(batch):
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((300, 12)).astype(np.float32)
    q = rng.standard_normal((40, 12)).astype(np.float32)
    K = 17
    dists, ids = search(_flat(xb), None, q, K, exact=True, batch=batch)
    assert dists.shape == ids.shape == (40, K) and dists.dtype == np.float32 and ids.dtype == np.int64
    assert (np.diff(dists, axis=1) >= 0).all()
    assert (dists >= 0).all()
    brute = _brute_sq_l2(q, xb)
    np.testing.assert_allclose(dists, np.take_along_axis(brute, ids, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dists, np.sort(brute, axis=1)[:, :K], rtol=1e-4, atol=1e-4)


class KeyStore:
    """The part of Datastore that ``search`` uses with an approximate index."""

    def __init__(self, keys):
        self.keys = keys
        self.calls = 0

    def gather_keys(self, ids):
        self.calls += 1
        return self.keys[ids].astype(np.float32)


@pytest.mark.parametrize("kind", ["IVFFlat", "IVFPQ"])
def test_search_approximate_recomputes_exact_distances_and_resorts(kind):
    rng = np.random.default_rng(2)
    d, nlist = 16, 8
    xb = (rng.standard_normal((1200, d)) + 3 * rng.integers(0, 4, (1200, 1))).astype(np.float32)
    q = (xb[rng.integers(0, 1200, 50)] + 0.3 * rng.standard_normal((50, d))).astype(np.float32)
    quantizer = faiss.IndexFlatL2(d)
    if kind == "IVFFlat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist)
    else:
        index = faiss.IndexIVFPQ(quantizer, d, nlist, 4, 4)
    index.train(xb)
    index.add(xb)
    index.nprobe = 3
    K = 20
    ds = KeyStore(xb)
    dists, ids = search(index, ds, q, K, exact=False, batch=16)
    assert ds.calls == 4  # one gather per batch
    assert (np.diff(dists, axis=1) >= 0).all()
    brute = _brute_sq_l2(q, xb)
    np.testing.assert_allclose(dists, np.take_along_axis(brute, ids, 1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dists, exact_sq_l2(q, xb[ids]), rtol=1e-6, atol=1e-6)
    # the same neighbours faiss returned, only re-sorted by their true distance
    _, raw_ids = index.search(q, K)
    assert (np.sort(raw_ids, axis=1) == np.sort(ids, axis=1)).all()
    if kind == "IVFPQ":
        assert (raw_ids != ids).any()  # the PQ order really was wrong somewhere, so the re-sort mattered


def test_search_pq_keeps_faiss_distances_and_order_exact_recomputes_them():
    """index.distances: pq (paper 1's knnlm.py, recompute_dists=False) returns what the IVFPQ index returns;
    exact (the default) the true squared L2 of the same neighbours, re-sorted. The two differ on this index."""
    rng = np.random.default_rng(5)
    d, n = 16, 1000
    xb = (rng.standard_normal((n, d)) + 3 * rng.integers(0, 4, (n, 1))).astype(np.float32)
    q = (xb[rng.integers(0, n, 30)] + 0.3 * rng.standard_normal((30, d))).astype(np.float32)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(d), d, 8, 4, 4)
    index.train(xb)
    index.add(xb)
    index.nprobe = 3
    K = 12
    raw_d, raw_i = index.search(q, K)
    ds = KeyStore(xb)
    pq_d, pq_i = search(index, ds, q, K, exact=False, batch=8, distances="pq")
    assert ds.calls == 0  # no key is read back
    np.testing.assert_array_equal(pq_i, raw_i)
    np.testing.assert_array_equal(pq_d, raw_d)
    ex_d, ex_i = search(index, ds, q, K, exact=False, batch=8, distances="exact")
    np.testing.assert_allclose(ex_d, np.take_along_axis(_brute_sq_l2(q, xb), ex_i, 1), rtol=1e-5, atol=1e-4)
    assert (np.sort(ex_i, axis=1) == np.sort(raw_i, axis=1)).all()
    assert np.abs(ex_d - np.sort(exact_sq_l2(q, xb[raw_i]), axis=1)).max() < 1e-4
    assert np.abs(pq_d - exact_sq_l2(q, xb[pq_i])).max() > 0.1  # PQ distances really are approximate here
    with pytest.raises(ValueError, match="distances"):
        search(index, ds, q, K, exact=False, distances="pqq")


def test_search_refuses_missing_neighbours():
    xb = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(ArtifactError, match="fewer than K"):
        search(_flat(xb), None, xb, 6, exact=True)


def test_exact_sq_l2_matches_brute_force():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((6, 5)).astype(np.float32)
    keys = rng.standard_normal((6, 4, 5)).astype(np.float32)
    out = exact_sq_l2(q, keys)
    assert out.shape == (6, 4)
    for i in range(6):
        for j in range(4):
            assert out[i, j] == pytest.approx(sum((float(keys[i, j, t]) - float(q[i, t])) ** 2 for t in range(5)),
                                              rel=1e-5)


# ------------------------------------------------------------------------------------------ datastore


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 40), st.integers(1, 300))
def test_shard_ranges_cover_positions_contiguously(n_tokens, n_shards, block):
    n_pos = n_tokens - 1
    if n_pos < n_shards or -(-n_pos // block) < n_shards:
        with pytest.raises(ValueError):
            shard_ranges(n_tokens, n_shards, block)
        return
    ranges = shard_ranges(n_tokens, n_shards, block)
    assert len(ranges) == n_shards
    assert ranges[0][0] == 0 and ranges[-1][1] == n_pos
    for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False):
        assert b == c
    for a, b in ranges:
        assert a % block == 0
        assert a < b  # no empty shard
    # the same positions whatever the number of shards (keys do not depend on it)
    assert sum(b - a for a, b in ranges) == n_pos


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 500), st.integers(0, 500), st.integers(1, 64))
def test_windows_tile_the_range(start, length, block):
    end = start + length
    ws = windows(start, end, block)
    assert [p for a, b in ws for p in range(a, b)] == list(range(start, end))
    assert all(0 < b - a <= block for a, b in ws)
    assert all((a - start) % block == 0 for a, _ in ws)


@FAST
@given(caches(allow_missing=True), st.data())
def test_knn_probs_at_label_ids_are_the_full_distributions_columns(c, data):
    """Paper 1's memory tasks read p_knn at a few label-word ids: the columns of the full distribution, for every
    k at once, with repeated ids (two synonyms sharing a first subword) read twice and unseen ids at zero."""
    dists, vals, _, _, k, sigma, V = c
    vals = vals.copy()
    vals[:, 0] = np.maximum(vals[:, 0], 0)  # every row has a real nearest neighbour (the rest may be missing)
    ids = data.draw(st.lists(st.integers(0, V + 2), min_size=1, max_size=8))
    ks = sorted({k, dists.shape[1]})
    got = knnlm.knn_probs_at(dists, vals, ids, ks, sigma)
    for kk in ks:
        for r in range(len(vals)):
            # the brute force of the module's helper, with weights taken relative to the nearest real neighbour
            d0 = min(float(dists[r, i]) for i in range(kk) if vals[r, i] >= 0)
            full = brute_distribution(dists[r].astype(np.float64) - d0, vals[r], kk, sigma, V + 3)
            np.testing.assert_allclose(got[kk][r], [full[i] for i in ids], rtol=1e-9, atol=1e-300)
