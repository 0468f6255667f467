"""Selection and summary numbers that a wrong line would change silently: the (λ, k, σ) point is chosen on
valid and applied to test (never chosen on test), the oracle is the best point, chosen_point reads the valid
choice, and the bootstrap interval is the 95% percentile interval of the paired resampled means."""

import json
import math

import numpy as np
import polars as pl
import pytest
from conftest import cache_arrays, p_knn_by_hand, write_cache
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts import sweep
from workflow_scripts.artifacts import ArtifactError, sha256_file, write_json, write_table
from workflow_scripts.tasks import evaluate, rescoring


def _grid(tmp_path, name: str, ppl: dict) -> str:
    """A sweep table over a 2 x 2 x 1 grid with the given perplexity per (λ, k)."""
    rows = [{"lambda": lam, "k": k, "sigma": 1.0, "ppl": p, "base_ppl": 10.0, "n_tokens": 100}
            for (lam, k), p in ppl.items()]
    path = tmp_path / f"{name}.parquet"
    write_table(pl.DataFrame(rows), path.with_suffix(".csv"), path)
    return path


@pytest.fixture
def tables(tmp_path):
    # valid prefers (0.2, 8); test's own best is (0.1, 4); the worst test point is (0.2, 4)
    valid = _grid(tmp_path, "valid", {(0.1, 4): 5.0, (0.1, 8): 4.5, (0.2, 4): 6.0, (0.2, 8): 4.0})
    test = _grid(tmp_path, "test", {(0.1, 4): 3.0, (0.1, 8): 3.5, (0.2, 4): 9.0, (0.2, 8): 3.8})
    return tmp_path, {("valid", "d"): valid, ("test", "d"): test}


def test_the_test_set_is_scored_at_the_point_chosen_on_valid(tables):
    tmp_path, sweeps = tables
    df = sweep.summarize_sweeps(sweeps, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    test = df.filter(pl.col("eval_set") == "test").row(0, named=True)
    assert (test["lambda"], test["k"], test["knn_ppl"], test["chosen_on"]) == (0.2, 8, 3.8, "valid")
    # the oracle is the test set's own best point, reported beside it and never used as the choice
    assert (test["oracle_lambda"], test["oracle_k"], test["oracle_ppl"]) == (0.1, 4, 3.0)
    valid = df.filter(pl.col("eval_set") == "valid").row(0, named=True)
    assert (valid["lambda"], valid["k"], valid["knn_ppl"]) == (0.2, 8, 4.0) == (
        valid["oracle_lambda"], valid["oracle_k"], valid["oracle_ppl"])
    assert pl.read_csv(tmp_path / "s.csv").equals(df)


def test_without_a_valid_set_each_set_is_chosen_on_itself(tables):
    tmp_path, sweeps = tables
    df = sweep.summarize_sweeps({("test", "d"): sweeps[("test", "d")]}, "", tmp_path / "s.csv", tmp_path / "s.parquet")
    row = df.row(0, named=True)
    assert (row["lambda"], row["k"], row["knn_ppl"], row["chosen_on"]) == (0.1, 4, 3.0, "test")


def test_ties_break_towards_the_smaller_lambda_k_sigma(tmp_path):
    t = _grid(tmp_path, "valid", {(0.1, 4): 4.0, (0.1, 8): 4.0, (0.2, 4): 4.0, (0.2, 8): 5.0})
    df = sweep.summarize_sweeps({("valid", "d"): t}, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    assert (df["lambda"][0], df["k"][0]) == (0.1, 4)


def test_chosen_point_reads_the_valid_choice_not_the_test_row(tmp_path):
    """The test row of the summary carries the valid choice; the valid row too. A summary whose test row was
    chosen on test (no valid set) is used only when nothing was chosen on another set."""
    f = tmp_path / "s.csv"
    write_table(pl.DataFrame({"eval_set": ["test", "valid"], "datastore": ["d", "d"], "lambda": [0.3, 0.2],
                              "k": [16, 64], "sigma": [5.0, 3.0], "chosen_on": ["valid", "valid"]}),
                f, f.with_suffix(".parquet"))
    # rows where eval_set != chosen_on hold the choice applied elsewhere: the test row says (0.3, 16, 5) here
    assert sweep.chosen_point(f, "d") == ((0.3, 16, 5.0), "perplexity on valid")
    assert sweep.chosen_point(f, "other") == (None, None)  # a datastore the summary does not name
    write_table(pl.DataFrame({"eval_set": ["test"], "datastore": ["d"], "lambda": [0.1], "k": [4], "sigma": [1.0],
                              "chosen_on": ["test"]}), f, f.with_suffix(".parquet"))
    assert sweep.chosen_point(f, "d") == ((0.1, 4, 1.0), "perplexity on test")
    assert sweep.chosen_point(tmp_path / "missing.csv", "d") == (None, None)


def test_chosen_point_follows_the_summary_written_by_summarize(tables):
    tmp_path, sweeps = tables
    sweep.summarize_sweeps(sweeps, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    assert sweep.chosen_point(tmp_path / "s.csv", "d") == ((0.2, 8, 1.0), "perplexity on valid")


def test_bootstrap_interval_is_the_95_percent_percentile_interval():
    """An independent computation of the paired percentile bootstrap with the same draws."""
    rng = np.random.default_rng(0)
    base, knn = rng.uniform(size=50), rng.uniform(size=50) + 0.1
    m, lo, hi = evaluate.bootstrap_delta(base, knn, n_boot=2000, seed=7)
    diff = knn - base
    draws = np.random.default_rng(7).integers(0, 50, size=(2000, 50))
    means = np.array([diff[d].mean() for d in draws])
    assert m == pytest.approx(diff.mean(), rel=1e-12)
    assert lo == pytest.approx(np.percentile(means, 2.5), rel=1e-12)
    assert hi == pytest.approx(np.percentile(means, 97.5), rel=1e-12)
    assert means.min() < lo < m < hi < means.max()  # not the min/max of the resampled means
    lo90 = evaluate.bootstrap_delta(base, knn, n_boot=2000, seed=7, level=0.9)[1]
    assert lo90 == pytest.approx(np.percentile(means, 5), rel=1e-12)


def test_mixtures_and_option_sums_stay_finite_far_below_exp_underflow():
    """log-probabilities below about -745 underflow exp() to 0 in float64: the mixture and the sum over an
    option's pairs must stay in log space (max shift / logaddexp), exact against a hand computation."""
    from workflow_scripts import knnlm
    from workflow_scripts.tasks import rescoring

    lm, knn = np.array([-1000.0, -2000.0, -5.0]), np.array([-1001.0, -1990.0, -np.inf])
    got = knnlm.interpolate(lm, knn, 0.25)
    want = [np.log(0.75) - 1000 + np.log1p(0.25 / 0.75 * np.exp(-1.0)),
            np.log(0.25) - 1990 + np.log1p(0.75 / 0.25 * np.exp(-10.0)),
            np.log(0.75) - 5.0]
    assert np.allclose(got, want, rtol=0, atol=1e-9)
    # an option made of two continuations (pairs) of log-probabilities -1000 and -1001
    s = rescoring.option_scores([[0, 1]], np.array([-1000.0, -1001.0]), np.array([1, 1]))
    assert s[0] == pytest.approx(-1000 + np.log1p(np.exp(-1.0)), abs=1e-9)
    s = rescoring.option_scores([[0, 1]], np.array([-1000.0, -1001.0]), np.array([2, 4]), normalize=True)
    assert s[0] == pytest.approx(np.logaddexp(-500.0, -250.25), abs=1e-9)


# ------------------------------------------------------------------------------------------- scoring rules
def _lse(x):
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m)))) if np.isfinite(m) else float(m)


def _option_scores_one_by_one(opts, lp, length, normalize):
    return np.asarray([_lse(np.asarray([lp[q] / (length[q] if normalize else 1) for q in o], np.float64))
                       for o in opts])


def _predict_item_by_item(items, lp, length, pmi, normalize):
    """The rescoring's definition, one item and one option at a time (log Σ exp with a max shift, PMI, argmax with
    NaN as -inf, NO_ANSWER when no option scores above -inf): the reference the arrays must match bit for bit."""
    out = []
    for it in items:
        s = _option_scores_one_by_one(it["options"], lp, length, normalize)
        if pmi and it.get("domain"):
            with np.errstate(invalid="ignore"):
                s = s - _option_scores_one_by_one(it["domain"], lp, length, normalize)
        s = np.where(np.isnan(s), -np.inf, s)
        out.append(rescoring.NO_ANSWER if np.all(s == -np.inf) else int(np.argmax(s)))
    return out


@given(data=st.data(), pmi=st.booleans(), normalize=st.booleans())
@settings(max_examples=60, deadline=None)
def test_rescoring_by_arrays_equals_item_by_item(data, pmi, normalize):
    """Options of 1-12 pairs (a fuzzy verbalizer's synonyms), items of 1-6 options, some with a domain premise, pair
    log-probabilities with ties, -inf (λ = 1 without a neighbour) and values far below exp's underflow: the option
    scores of the grouped arrays are those of one option at a time, and the predictions those of the item-by-item
    loop, bit for bit."""
    n_pairs = data.draw(st.integers(1, 30))
    value = st.sampled_from([-np.inf, -1e3, -800.5, -2.0, -1.0, -0.25, 0.0]) | st.floats(-50, 0)
    lp = np.asarray(data.draw(st.lists(value, min_size=n_pairs, max_size=n_pairs)), np.float64)
    length = np.asarray(data.draw(st.lists(st.integers(1, 5), min_size=n_pairs, max_size=n_pairs)), np.int64)
    option = st.lists(st.integers(0, n_pairs - 1), min_size=1, max_size=12)
    items = []
    for _ in range(data.draw(st.integers(1, 8))):
        opts = data.draw(st.lists(option, min_size=1, max_size=6))
        dom = data.draw(st.none() | st.lists(option, min_size=len(opts), max_size=len(opts)))
        items.append({"options": opts, "domain": dom})
    for it in items:
        got = rescoring.option_scores(it["options"], lp, length, normalize)
        assert got.tobytes() == _option_scores_one_by_one(it["options"], lp, length, normalize).tobytes()
    got = rescoring.predictor(items, length, pmi, normalize)(lp)
    assert got.tolist() == _predict_item_by_item(items, lp, length, pmi, normalize)


def test_choice_pmi_subtracts_the_domain_score():
    """Options' log-likelihoods -1, -2; under the domain premise -0.5, -3: PMI = -0.5, +1 picks option 1 (adding
    the domain term, or ignoring it, picks option 0)."""
    from workflow_scripts.tasks import rescoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-1.0, -2.0, -0.5, -3.0]), np.ones(4, np.int64)
    assert rescoring.score_choice(items, lp, length, pmi=False).tolist() == [0]
    assert rescoring.score_choice(items, lp, length, pmi=True).tolist() == [1]
    assert rescoring.predict({"kind": "choice", "metric": "accuracy", "pmi": True}, items, lp, length).tolist() == [1]


def test_predict_normalises_by_length_for_accuracy_norm_only():
    """Option 0: one token at -2; option 1: six tokens summing to -3. Sum picks 0, per-token mean (-0.5) picks 1."""
    from workflow_scripts.tasks import rescoring

    items = [{"options": [[0], [1]]}]
    lp, length = np.array([-2.0, -3.0]), np.array([1, 6])
    assert rescoring.predict({"kind": "choice", "metric": "accuracy"}, items, lp, length).tolist() == [0]
    assert rescoring.predict({"kind": "choice", "metric": "accuracy_norm"}, items, lp, length).tolist() == [1]


def test_classify_pmi_uses_the_whole_domain_continuation_not_its_per_token_mean():
    """Labels' log-likelihoods -3, -4 (one token each); domain continuations -2 (one token) and -6 (three tokens).
    Domain-conditional PMI with sums: -1, +2, label 1; normalising the domain side would give -1, -2, label 0."""
    from workflow_scripts.tasks import rescoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-3.0, -4.0, -2.0, -6.0]), np.array([1, 1, 1, 3])
    assert rescoring.score_classify(items, lp, length, pmi=True).tolist() == [1]
    assert rescoring.score_classify(items, lp, length, pmi=False).tolist() == [0]
    assert rescoring.predict({"kind": "classify", "metric": "accuracy", "pmi": True}, items, lp, length).tolist() == [1]


# ------------------------------------------------------------------------------- per-datastore selection, pins
@pytest.fixture
def two_datastores(tmp_path):
    """A Wiki and a Math datastore, each swept on a Wiki and a Math validation set. On wiki_valid every datastore
    prefers (0.1, 4); on math_valid every datastore prefers (0.2, 8)."""
    wiki_pref = {(0.1, 4): 3.0, (0.1, 8): 3.5, (0.2, 4): 4.0, (0.2, 8): 4.5}
    math_pref = {(0.1, 4): 7.0, (0.1, 8): 6.5, (0.2, 4): 6.8, (0.2, 8): 6.0}
    sweeps = {}
    for ds in ("wiki", "math"):
        for evalset, ppl in (("wiki_valid", wiki_pref), ("math_valid", math_pref)):
            sweeps[(evalset, ds)] = _grid(tmp_path, f"{evalset}__{ds}", ppl)
    return tmp_path, sweeps


def test_each_datastore_chooses_on_its_own_validation_set(two_datastores):
    """With one selection set for all (the old behaviour) the Math datastore would be tuned on Wiki valid and
    score math_valid at (0.1, 4) = 7.0; chosen on its own set it scores it at (0.2, 8) = 6.0."""
    tmp_path, sweeps = two_datastores
    df = sweep.summarize_sweeps(sweeps, {"wiki": "wiki_valid", "math": "math_valid"}, tmp_path / "s.csv",
                                tmp_path / "s.parquet")
    got = {(r["datastore"], r["eval_set"]): (r["lambda"], r["k"], r["knn_ppl"], r["chosen_on"])
           for r in df.iter_rows(named=True)}
    assert got == {
        ("wiki", "wiki_valid"): (0.1, 4, 3.0, "wiki_valid"),
        ("wiki", "math_valid"): (0.1, 4, 7.0, "wiki_valid"),
        ("math", "wiki_valid"): (0.2, 8, 4.5, "math_valid"),
        ("math", "math_valid"): (0.2, 8, 6.0, "math_valid"),
    }
    # the tasks read each datastore's own choice back
    assert sweep.chosen_point(tmp_path / "s.csv", "wiki") == ((0.1, 4, 1.0), "perplexity on wiki_valid")
    assert sweep.chosen_point(tmp_path / "s.csv", "math") == ((0.2, 8, 1.0), "perplexity on math_valid")


def test_one_selection_set_for_every_datastore_is_the_old_table_byte_for_byte(two_datastores):
    """The default (every datastore on the same set, given as a name or per datastore) writes the same files."""
    tmp_path, sweeps = two_datastores
    sweep.summarize_sweeps(sweeps, "wiki_valid", tmp_path / "a.csv", tmp_path / "a.parquet")
    sweep.summarize_sweeps(sweeps, {"wiki": "wiki_valid", "math": "wiki_valid"}, tmp_path / "b.csv",
                           tmp_path / "b.parquet")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    a = pl.read_csv(tmp_path / "a.csv")
    assert set(a["chosen_on"]) == {"wiki_valid"} and set(zip(a["lambda"], a["k"], strict=True)) == {(0.1, 4)}
    # a datastore without a selection set is chosen on each eval set itself
    df = sweep.summarize_sweeps(sweeps, {"wiki": "wiki_valid"}, tmp_path / "c.csv", tmp_path / "c.parquet")
    row = df.filter((pl.col("datastore") == "math") & (pl.col("eval_set") == "math_valid")).row(0, named=True)
    assert (row["lambda"], row["k"], row["chosen_on"]) == (0.2, 8, "math_valid")


def test_a_pinned_point_overrides_the_perplexity_choice(tables):
    tmp_path, sweeps = tables
    sweep.summarize_sweeps(sweeps, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    assert sweep.chosen_point(tmp_path / "s.csv", "d", [0.3, 2048, 5]) == ((0.3, 2048, 5.0), "pinned in config")
    assert sweep.chosen_point(None, "d", (0.1, 16, 3.0)) == ((0.1, 16, 3.0), "pinned in config")
    assert sweep.chosen_point(tmp_path / "s.csv", "d", None) == ((0.2, 8, 1.0), "perplexity on valid")


def _choice_task(tmp_path):
    """One two-option choice item, gold option 0 ("A", token 0; "B", token 1), each option one scored token from
    the same query. p_lm = (.4, .6): the base LM is wrong. Two neighbours at squared distances 0 and .1, values A
    then B. k 2, σ 1, λ .1 (the only grid point): p(A) = .1 · .525 + .9 · .4 = .4125 < p(B): wrong. Pinned off
    the grid at (λ .5, k 1, σ 1): p(A) = .5 · 1 + .5 · .4 = .7 > p(B) = .3: right."""
    cache = {
        "t_lm": np.log(np.array([0.4, 0.6])),
        "t_pair": np.array([0, 1]),
        "t_row": np.array([0, 0]),
        "t_target": np.array([0, 1]),
        "q_dists": np.array([[0.0, 0.1]], np.float32),
        "q_vals": np.array([[0, 1]], np.int32),
        "q_ids": np.array([[10, 11]], np.int64),
        "pair_len": np.array([1, 1]),
    }
    np.savez(tmp_path / "scored.npz", **cache)
    meta = {"n_items": 1, "task": "t", "npz_sha256": sha256_file(tmp_path / "scored.npz")}
    (tmp_path / "scored.json").write_text(json.dumps(
        {"meta": meta, "items": [{"options": [[0], [1]], "domain": None, "gold": 0}]}))
    item = {"id": "0", "question": "q", "answer": "A", "labels": ["A", "B"]}
    pl.DataFrame({"item": [json.dumps(item)]}).write_parquet(tmp_path / "items.parquet")
    p = {"task": "t", "model": "m", "datastore": "d",
         "entry": {"kind": "choice", "metric": "accuracy", "category": "reasoning"},
         "grid": {"lambdas": [0.1], "ks": [2], "sigmas": [1.0]}}
    return p


def _sweep_task(tmp_path, p, summary=None):
    return evaluate.sweep_task(tmp_path / "scored.npz", tmp_path / "scored.json", tmp_path / "items.parquet", p,
                               summary, tmp_path / "sweep.csv", tmp_path / "sweep.parquet",
                               tmp_path / "pred.parquet", tmp_path / "summary.json")


def test_a_pinned_point_off_the_grid_is_scored_and_used(tmp_path):
    p = _choice_task(tmp_path)
    # a perplexity summary that chose the grid point: without the pin, the task is scored there (wrong answer)
    write_table(pl.DataFrame({"eval_set": ["test"], "datastore": ["d"], "lambda": [0.1], "k": [2], "sigma": [1.0],
                              "chosen_on": ["valid"]}), tmp_path / "s.csv", tmp_path / "s.parquet")
    s = _sweep_task(tmp_path, p, tmp_path / "s.csv")
    assert (s["base"], s["knn"], s["lambda"], s["k"], s["chosen_on"]) == (0.0, 0.0, 0.1, 2, "perplexity on valid")
    s = _sweep_task(tmp_path, {**p, "point": [0.5, 1, 1]}, tmp_path / "s.csv")
    assert (s["base"], s["knn"], s["lambda"], s["k"], s["sigma"]) == (0.0, 1.0, 0.5, 1, 1.0)
    assert s["chosen_on"] == "pinned in config"
    rows = {(r["lambda"], r["k"], r["sigma"]): r["score"] for r in pl.read_csv(tmp_path / "sweep.csv").iter_rows(
        named=True)}
    assert rows == {(0.1, 2, 1.0): 0.0, (0.5, 1, 1.0): 1.0}  # the grid, plus the pinned point beside it
    assert pl.read_parquet(tmp_path / "pred.parquet")["knn_pred"].to_list() == ["A"]


# ------------------------------------------------------------------------------------------ the sweep table
def test_run_sweep_writes_the_perplexity_of_every_grid_point_sorted(tmp_path):
    rng = np.random.default_rng(0)
    manifest = tmp_path / "manifest.json"
    write_json(manifest, {"shards": ["a"]})
    a = cache_arrays(rng, 15, 6, 5)
    a["vals"][:, 0] = a["targets"]  # the nearest neighbour carries the target: pure kNN is finite
    write_cache(tmp_path / "cache", a, manifest)
    grid = {"lambdas": [0.5, 0.0, 1.0], "ks": [6, 2], "sigmas": [3.0, 1.0]}
    df = sweep.run_sweep(tmp_path / "cache", manifest, grid, tmp_path / "s.csv", tmp_path / "s.parquet")
    assert df.columns == ["lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens"]
    assert df.height == 12 and pl.read_parquet(tmp_path / "s.parquet").equals(df)
    assert pl.read_csv(tmp_path / "s.csv").shape == (12, 6)
    keys = [(r["lambda"], r["k"], r["sigma"]) for r in df.iter_rows(named=True)]
    assert keys == sorted((lam, k, s) for lam in (0.0, 0.5, 1.0) for k in (2, 6) for s in (1.0, 3.0))
    lm = a["lm_logprob"].astype(np.float64)
    base = math.exp(-lm.mean())
    for r in df.iter_rows(named=True):
        lam, k, s = r["lambda"], r["k"], r["sigma"]
        p = [lam * p_knn_by_hand(a["dists"][i], a["vals"][i], a["targets"][i], k, s) + (1 - lam) * math.exp(lm[i])
             for i in range(15)]
        assert r["ppl"] == pytest.approx(math.exp(-np.mean(np.log(p))), rel=1e-9)
        assert r["base_ppl"] == pytest.approx(base, rel=1e-12) and r["n_tokens"] == 15
    with pytest.raises(ValueError, match=r"sweep.ks \[8\] exceed the 6 neighbours"):
        sweep.run_sweep(tmp_path / "cache", manifest, {**grid, "ks": [2, 8]}, tmp_path / "t.csv",
                        tmp_path / "t.parquet")
    other = tmp_path / "other.json"
    write_json(other, {"shards": ["b"]})
    with pytest.raises(ArtifactError, match="another version"):
        sweep.run_sweep(tmp_path / "cache", other, grid, tmp_path / "t.csv", tmp_path / "t.parquet")
    # k = K + 1, the first k the cache cannot serve, is refused by run_sweep's own check (its message), not by knnlm
    with pytest.raises(ValueError, match=r"sweep.ks \[7\] exceed the 6 neighbours cached in"):
        sweep.run_sweep(tmp_path / "cache", manifest, {**grid, "ks": [6, 7]}, tmp_path / "t.csv",
                        tmp_path / "t.parquet")


# ------------------------------------------------------------------------------------------ edges of the scoring rules
def test_pinned_points_partly_off_the_grid_are_scored_and_the_best_point_is_the_highest_score(tmp_path):
    p = _choice_task(tmp_path)
    # one coordinate off the grid is enough to be off it; each such pin is scored beside the grid point
    for pin in ([0.1, 1, 1.0], [0.5, 2, 1.0], [0.1, 2, 2.0]):
        _sweep_task(tmp_path, {**p, "point": pin})
        keys = {(r["lambda"], r["k"], r["sigma"]) for r in pl.read_csv(tmp_path / "sweep.csv").iter_rows(named=True)}
        assert keys == {(0.1, 2, 1.0), tuple(pin)}, pin
    _sweep_task(tmp_path, {**p, "point": [0.1, 2, 1.0]})  # a pin on the grid adds no row
    assert pl.read_csv(tmp_path / "sweep.csv").height == 1
    # the grid point scores 0, the pin (λ .5, k 1, σ 1) 1: the best point is the pin, whatever the order
    s = _sweep_task(tmp_path, {**p, "point": [0.5, 1, 1.0]})
    assert (s["best"], s["best_lambda"], s["best_k"], s["best_sigma"]) == (1.0, 0.5, 1, 1.0)
    s = _sweep_task(tmp_path, {**p, "grid": {"lambdas": [0.5], "ks": [1], "sigmas": [1.0]}, "point": [0.1, 2, 1.0]})
    assert (s["best"], s["best_lambda"], s["best_k"]) == (1.0, 0.5, 1) and (s["knn"], s["lambda"]) == (0.0, 0.1)


def test_an_option_the_mixture_gives_no_probability_scores_minus_infinity():
    """λ = 1 with the target among no neighbour: every pair of the option has log p = −inf, so has the option
    (not nan, which argmax would pick)."""
    from workflow_scripts.tasks import rescoring

    lp = np.array([-np.inf, -np.inf, -3.0])
    s = rescoring.option_scores([[0, 1], [2]], lp, np.ones(3, np.int64))
    assert s[0] == -np.inf and s[1] == -3.0
    assert rescoring.score_choice([{"options": [[0, 1], [2]]}], lp, np.ones(3, np.int64)).tolist() == [1]


def test_choice_pmi_with_length_normalisation_normalises_both_sides():
    """Options: -2 over 1 token, -6 over 3 tokens (means -2, -2); domain: -1 over 1 token, -1.5 over 2 tokens
    (means -1, -0.75). Normalised PMI: -1 vs -1.25 picks option 0; with the domain's sums it would be -1 vs -0.5."""
    from workflow_scripts.tasks import rescoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-2.0, -6.0, -1.0, -1.5]), np.array([1, 3, 1, 2])
    assert rescoring.score_choice(items, lp, length, pmi=True, normalize=True).tolist() == [0]
    entry = {"kind": "choice", "metric": "accuracy_norm", "pmi": True}
    assert rescoring.predict(entry, items, lp, length).tolist() == [0]


def test_classify_without_pmi_ignores_the_domain_premise():
    from workflow_scripts.tasks import rescoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-1.0, -2.0, -0.5, -3.0]), np.ones(4, np.int64)
    entry = {"kind": "classify", "metric": "accuracy"}
    assert rescoring.predict({**entry, "pmi": False}, items, lp, length).tolist() == [0]
    assert rescoring.predict({**entry, "pmi": True}, items, lp, length).tolist() == [1]


def test_last_token_scores_without_pmi_sum_each_items_own_synonyms():
    from workflow_scripts.tasks import rescoring

    p = np.array([[0.1, 0.2, 0.3], [0.5, 0.1, 0.1]])
    got = rescoring.last_token_scores(np.log(p), np.array([1, 0]), np.array([-1, -1]), [[0, 2], [1]], use_pmi=False)
    np.testing.assert_allclose(got, [[0.6, 0.1], [0.4, 0.2]], rtol=1e-12)


def test_generated_text_is_cut_at_the_first_stop_that_occurs():
    from workflow_scripts.tasks import scoring

    assert scoring.cut_at_stop(" 42\nQ: next\nQ: again", ["\n"]) == "42"
    assert scoring.cut_at_stop(" 42 is it", ["\n", "", "Q:"]) == "42 is it"  # absent and empty stops do nothing
    assert scoring.cut_at_stop("a. b. c.", [".", "\n"]) == "a"


def test_build_pairs_cuts_the_context_from_the_left_to_the_window():
    from workflow_scripts.tasks import scoring

    def enc(s):
        return [len(w) for w in s.split()]

    items = [{"options": [[["aa bbb cccc", "d ee"]]], "gold": 0}]
    seqs, starts, out = scoring.build_pairs(items, enc, 9, 6)  # 1 + 3 + 2 = 6 tokens: fits exactly
    assert (seqs, starts) == ([[9, 2, 3, 4, 1, 2]], [4]) and out[0]["options"] == [[0]] and out[0]["domain"] is None
    seqs, starts, _ = scoring.build_pairs(items, enc, None, 6)  # no start token
    assert (seqs, starts) == ([[2, 3, 4, 1, 2]], [3])
    seqs, starts, _ = scoring.build_pairs(items, enc, 9, 4)  # the start token and "aa" cut: 2 context tokens kept
    assert (seqs, starts) == ([[3, 4, 1, 2]], [2])
    seqs, starts, _ = scoring.build_pairs(items, enc, 9, 3)  # one context token is the least kept
    assert (seqs, starts) == ([[4, 1, 2]], [1])
    with pytest.raises(ValueError, match="continuation 'd ee' is longer than the window of 2 tokens"):
        scoring.build_pairs(items, enc, 9, 2)
    with pytest.raises(ValueError, match="continuation '' encodes to no tokens"):
        scoring.build_pairs([{"options": [[["aa", ""]]], "gold": 0}], enc, 9, 6)


def test_first_subword_refuses_a_word_with_no_piece_at_the_index():
    from workflow_scripts.tasks import scoring

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": ([0] if add_special_tokens else []) + [len(w) for w in text.split()]}

    assert scoring.first_subword(Tok(), " abc", index=1) == 3
    with pytest.raises(ValueError, match=r"synonym ' abc' encodes to \[0, 3\]: no piece at index 2"):
        scoring.first_subword(Tok(), " abc", index=2)


def test_subword_index_needs_a_lone_space_piece_before_the_word():
    """A character tokenizer that glues the space to the next character (" the" -> " t", "h", "e") has no lone
    space piece: the first subword sits right after the start token."""
    from workflow_scripts.tasks import scoring

    class CharTok:
        all_special_ids = [0]

        def __init__(self, glue, marker=" "):
            self.glue, self.marker = glue, marker

        def __call__(self, text, add_special_tokens=False):
            pieces, i = [], 0
            while i < len(text):
                n = 2 if self.glue and text[i] == " " and i + 1 < len(text) else 1
                pieces.append(text[i : i + n])
                i += n
            ids = [1 + sum(ord(c) << (8 * j) for j, c in enumerate(p)) for p in pieces]
            return {"input_ids": ([0] if add_special_tokens else []) + ids}

        def decode(self, ids):
            return self.marker if ids == self(" ")["input_ids"] else "x"

    assert scoring.subword_index(CharTok(glue=True)) == 1
    assert scoring.subword_index(CharTok(glue=False)) == 2
    # a piece of its own before every word that decodes to a visible marker ("▁" kept) is not a lone space
    assert scoring.subword_index(CharTok(glue=False, marker="▁")) == 1


def test_the_summary_carries_each_sets_base_ppl_token_count_and_oracle_sigma(tmp_path):
    def grid(name, base, n, ppl):
        rows = [{"lambda": lam, "k": 4, "sigma": s, "ppl": p, "base_ppl": base, "n_tokens": n}
                for (lam, s), p in ppl.items()]
        write_table(pl.DataFrame(rows), tmp_path / f"{name}.csv", tmp_path / f"{name}.parquet")
        return tmp_path / f"{name}.parquet"

    sweeps = {("valid", "d"): grid("valid", 20.0, 300, {(0.1, 1.0): 9.0, (0.1, 5.0): 8.0}),
              ("test", "d"): grid("test", 30.0, 500, {(0.1, 1.0): 7.0, (0.1, 5.0): 7.5}),
              ("test2", "d"): grid("test2", 40.0, 700, {(0.1, 1.0): 6.5, (0.1, 5.0): 6.0})}
    df = sweep.summarize_sweeps(sweeps, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    got = {r["eval_set"]: (r["n_tokens"], r["base_ppl"], r["knn_ppl"], r["sigma"], r["oracle_ppl"], r["oracle_sigma"])
           for r in df.iter_rows(named=True)}
    assert got == {"valid": (300, 20.0, 8.0, 5.0, 8.0, 5.0), "test": (500, 30.0, 7.5, 5.0, 7.0, 1.0),
                   "test2": (700, 40.0, 6.0, 5.0, 6.0, 5.0)}
    # two sets scored at the valid choice: chosen_point reads that choice from either
    assert sweep.chosen_point(tmp_path / "s.csv", "d") == ((0.1, 4, 5.0), "perplexity on valid")


def test_knn_probs_at_refuses_a_zero_sigma_and_unsorted_neighbours():
    from workflow_scripts import knnlm

    d, v = np.array([[0.0, 1.0]]), np.array([[1, 2]])
    with pytest.raises(ValueError, match="sigma = 0 must be > 0"):
        knnlm.knn_probs_at(d, v, [1], [2], 0)
    with pytest.raises(ValueError, match="sorted ascending per row"):
        knnlm.knn_probs_at(d[:, ::-1], v, [1], [2], 1.0)
    assert knnlm.knn_probs_at(d, v, [2, 1], [2], 1.0)[2][0] == pytest.approx([np.exp(-1) / (1 + np.exp(-1)),
                                                                             1 / (1 + np.exp(-1))])


def test_the_task_sweep_of_a_teacher_forced_task_for_every_kind_and_metric(tmp_path):
    """The one-item task of _choice_task read as choice, as classify, and with accuracy_norm (one token per
    option, so the same answers): the base LM wrong, the pin right; the predictions file says so per item."""
    p = _choice_task(tmp_path)
    for entry in ({**p["entry"], "kind": "classify"}, {**p["entry"], "metric": "accuracy_norm"}, p["entry"]):
        s = _sweep_task(tmp_path, {**p, "entry": entry, "point": [0.5, 1, 1.0]})
        assert (s["kind"], s["metric"], s["base"], s["knn"], s["best"]) == (entry["kind"], entry["metric"], 0.0, 1.0,
                                                                         1.0)
        pred = pl.read_parquet(tmp_path / "pred.parquet").row(0, named=True)
        assert (pred["base_pred"], pred["knn_pred"], pred["base_score"], pred["knn_score"]) == ("B", "A", 0.0, 1.0)
        assert pred["neighbours"] == [10, 11]  # the neighbours of the gold answer's first token


def test_the_task_sweep_refuses_a_cache_of_another_item_count_or_with_pickles(tmp_path):
    p = _choice_task(tmp_path)
    rec = json.loads((tmp_path / "scored.json").read_text())
    (tmp_path / "scored.json").write_text(json.dumps({**rec, "meta": {"n_items": 2}}))
    with pytest.raises(ArtifactError, match=r"scored.json: scored 2 items, .*items.parquet has 1$"):
        _sweep_task(tmp_path, p)
    (tmp_path / "scored.json").write_text(json.dumps(rec))
    with np.load(tmp_path / "scored.npz") as z:
        cache = {k: z[k] for k in z.files}
    np.savez(tmp_path / "scored.npz", **cache, extra=np.array([{"a": 1}], dtype=object))
    pickled = {**rec, "meta": {**rec["meta"], "npz_sha256": sha256_file(tmp_path / "scored.npz")}}
    (tmp_path / "scored.json").write_text(json.dumps(pickled))  # recorded as written: the pickle is what is refused
    with pytest.raises(ValueError, match="allow_pickle"):
        _sweep_task(tmp_path, p)
    # an npz altered after score recorded its sha256 (in meta.npz_sha256) is refused, naming both files
    np.savez(tmp_path / "scored.npz", **cache)
    rec["meta"]["npz_sha256"] = sha256_file(tmp_path / "scored.npz")
    (tmp_path / "scored.json").write_text(json.dumps(rec))
    assert _sweep_task(tmp_path, p)["n"] == 1  # as recorded: read
    np.savez(tmp_path / "scored.npz", **{**cache, "t_lm": np.log(np.array([0.6, 0.4]))})
    with pytest.raises(ArtifactError, match=r"scored.npz: sha256 differs from the one recorded in .*scored.json"):
        _sweep_task(tmp_path, p)


# ------------------------------------------------------------------------------------------ a generate task's sweep
GEN_ITEMS = [{"id": "0", "question": "q0", "answer": "x", "answers": ["x"]},
             {"id": "1", "question": "q1", "answer": "y", "answers": ["y", "yy"]},
             {"id": "2", "question": "q2", "answer": "z", "answers": ["z"]}]
# decoded answers per point (λ, k, σ), None = the base LM: exact match gives base 1/3, the others as commented
GEN_TEXTS = {None: ["x", "no", "no"],
             (0.25, 4, 1.0): ["x", "yy", "no"],  # 2/3
             (0.5, 2, 10.0): ["x", "y", "z"],  # 1: the best, tied with (0.75, 2, 1.0) and first by λ
             (0.75, 2, 1.0): [" x ", "Y", "z."],  # 1 after SQuAD normalisation
             (0.1, 8, 1.0): ["no", "no", "no"]}  # 0
GEN_NEIGH = {None: [None, None, None], (0.25, 4, 1.0): [[5, 6], [7], []], (0.5, 2, 10.0): [[1], [2], [3]],
             (0.75, 2, 1.0): [[4], [4], [4]], (0.1, 8, 1.0): [[9], [9], [9]]}


def _generate_task(tmp_path, points, chosen=None):
    """A generate task's score record (as score writes it: the base LM first, with k None) for the given points,
    and a perplexity summary that chose ``chosen`` on valid (none when None)."""
    from workflow_scripts.tasks import items as task_items

    task_items.write_items(GEN_ITEMS, tmp_path / "items.parquet")
    record = {"meta": {"n_items": 3, "task": "t"}, "points": [
        {"lambda": 0.0 if pt is None else pt[0], "k": None if pt is None else pt[1],
         "sigma": None if pt is None else pt[2], "texts": GEN_TEXTS[pt], "neighbours": GEN_NEIGH[pt]}
        for pt in points]}
    (tmp_path / "scored.json").write_text(json.dumps(record))
    if chosen is not None:
        write_table(pl.DataFrame({"eval_set": ["test", "valid"], "datastore": ["d", "d"], "lambda": [chosen[0]] * 2,
                                  "k": [chosen[1]] * 2, "sigma": [chosen[2]] * 2, "chosen_on": ["valid"] * 2}),
                    tmp_path / "ppl.csv", tmp_path / "ppl.parquet")
    return {"task": "t", "model": "m", "datastore": "d",
            "entry": {"kind": "generate", "metric": "em", "category": "reasoning"}}


def _expected_predictions(knn_point, neighbours):
    em = {None: [1.0, 0.0, 0.0], (0.25, 4, 1.0): [1.0, 1.0, 0.0], (0.5, 2, 10.0): [1.0, 1.0, 1.0]}
    return pl.DataFrame(
        {"task": ["t"] * 3, "category": ["reasoning"] * 3, "id": ["0", "1", "2"], "question": ["q0", "q1", "q2"],
         "answer": ["x", "y", "z"], "base_pred": GEN_TEXTS[None], "knn_pred": GEN_TEXTS[knn_point],
         "base_score": em[None], "knn_score": em[knn_point], "neighbours": neighbours},
        schema_overrides={"neighbours": pl.List(pl.Int64)})


def test_a_generate_task_sweep_scores_every_decoded_point_and_reports_the_perplexity_choice(tmp_path):
    from polars.testing import assert_frame_equal

    points = [None, (0.25, 4, 1.0), (0.75, 2, 1.0), (0.5, 2, 10.0), (0.1, 8, 1.0)]
    p = _generate_task(tmp_path, points, chosen=(0.25, 4, 1.0))
    s = evaluate.sweep_task(None, tmp_path / "scored.json", tmp_path / "items.parquet", p, tmp_path / "ppl.csv",
                            tmp_path / "sweep.csv", tmp_path / "sweep.parquet", tmp_path / "pred.parquet",
                            tmp_path / "summary.json")
    want = {"model": "m", "datastore": "d", "task": "t", "category": "reasoning", "kind": "generate", "metric": "em",
            "n": 3, "base": 1 / 3, "knn": 2 / 3, "knn_undecided": 0, "lambda": 0.25, "k": 4, "sigma": 1.0,
            "chosen_on": "perplexity on valid", "best": 1.0, "best_lambda": 0.5, "best_k": 2, "best_sigma": 10.0}
    assert s == pytest.approx(want) and list(s) == list(want)
    assert json.loads((tmp_path / "summary.json").read_text()) == pytest.approx(want)
    # the sweep table: one row per decoded grid point (never the base LM), sorted by (λ, k, σ)
    sweep_want = pl.DataFrame(
        {"task": ["t"] * 4, "metric": ["em"] * 4, "lambda": [0.1, 0.25, 0.5, 0.75], "k": [8, 4, 2, 2],
         "sigma": [1.0, 1.0, 10.0, 1.0], "score": [0.0, 2 / 3, 1.0, 1.0], "undecided": [0] * 4,
         "base": [1 / 3] * 4, "n": [3] * 4},
        schema={"task": pl.String, "metric": pl.String, "lambda": pl.Float64, "k": pl.Int64, "sigma": pl.Float64,
                "score": pl.Float64, "undecided": pl.Int64, "base": pl.Float64, "n": pl.Int32})
    assert_frame_equal(pl.read_parquet(tmp_path / "sweep.parquet"), sweep_want)
    assert_frame_equal(pl.read_csv(tmp_path / "sweep.csv"), sweep_want, check_dtypes=False)
    assert pl.read_csv(tmp_path / "sweep.csv").columns == sweep_want.columns
    # per item: the base LM's and the chosen point's answers, scores and the chosen point's neighbours
    assert_frame_equal(pl.read_parquet(tmp_path / "pred.parquet"),
                       _expected_predictions((0.25, 4, 1.0), [[5, 6], [7], []]))


def test_a_generate_task_without_a_decoded_perplexity_choice_reports_its_best_point_or_the_base_lm(tmp_path):
    from polars.testing import assert_frame_equal

    out = [tmp_path / f for f in ("sweep.csv", "sweep.parquet", "pred.parquet", "summary.json")]
    # the perplexity choice was not decoded (points: chosen, before a new sweep): the task's best point stands in
    p = _generate_task(tmp_path, [None, (0.25, 4, 1.0), (0.5, 2, 10.0)], chosen=(0.3, 4, 1.0))
    s = evaluate.sweep_task(None, tmp_path / "scored.json", tmp_path / "items.parquet", p, tmp_path / "ppl.csv", *out)
    assert (s["lambda"], s["k"], s["sigma"], s["chosen_on"], s["knn"]) == (0.5, 2, 10.0,
                                                                         "task (no perplexity choice)", 1.0)
    assert_frame_equal(pl.read_parquet(out[2]), _expected_predictions((0.5, 2, 10.0), [[1], [2], [3]]))
    # only the base LM decoded (no grid, nothing chosen): it is the best point, the kNN-LM column repeats it
    p = _generate_task(tmp_path, [None])
    s = evaluate.sweep_task(None, tmp_path / "scored.json", tmp_path / "items.parquet", p, None, *out)
    assert s == pytest.approx({
        "model": "m", "datastore": "d", "task": "t", "category": "reasoning", "kind": "generate", "metric": "em",
        "n": 3, "base": 1 / 3, "knn": 1 / 3, "knn_undecided": 0, "lambda": None, "k": None, "sigma": None,
        "chosen_on": "none",
        "best": 1 / 3, "best_lambda": 0.0, "best_k": None, "best_sigma": None})
    assert json.loads(out[3].read_text()) == s
    empty = pl.read_parquet(out[1])
    assert empty.height == 0 and dict(empty.schema) == {
        "task": pl.String, "metric": pl.String, "lambda": pl.Float64, "k": pl.Int64, "sigma": pl.Float64,
        "score": pl.Float64, "undecided": pl.Int64, "base": pl.Float64, "n": pl.Int32}
    assert pl.read_csv(out[0]).columns == list(empty.columns)
    assert_frame_equal(pl.read_parquet(out[2]), _expected_predictions(None, [[], [], []]))
    # a point that decoded fewer answers than the task has items is refused, not scored on the first ones
    rec = json.loads((tmp_path / "scored.json").read_text())
    rec["points"][0]["texts"] = rec["points"][0]["texts"][:2]
    (tmp_path / "scored.json").write_text(json.dumps(rec))
    with pytest.raises(ValueError, match="zip"):
        evaluate.sweep_task(None, tmp_path / "scored.json", tmp_path / "items.parquet", p, None, *out)


def test_the_neighbours_shown_are_those_of_the_gold_answers_first_scored_token(tmp_path):
    """Two choice items, each option its own query row with 10 neighbour ids (8 kept); the gold options are 1 and
    0, and option 1's first scored token (the first in the cache's order) is read from row 4, its second from 1."""
    q_ids = np.arange(50, dtype=np.int64).reshape(5, 10)
    cache = {"t_lm": np.log(np.array([0.4, 0.3, 0.3, 0.5, 0.5])), "t_pair": np.array([1, 0, 1, 2, 3]),
             "t_row": np.array([4, 0, 1, 2, 3]), "t_target": np.array([1, 0, 1, 2, 3]),
             "q_dists": np.zeros((5, 10), np.float32), "q_vals": np.zeros((5, 10), np.int32), "q_ids": q_ids,
             "pair_len": np.array([1, 2, 1, 1])}
    np.savez(tmp_path / "scored.npz", **cache)
    meta = {"n_items": 2, "task": "t", "npz_sha256": sha256_file(tmp_path / "scored.npz")}
    (tmp_path / "scored.json").write_text(json.dumps(
        {"meta": meta, "items": [{"options": [[0], [1]], "domain": None, "gold": 1},
                                           {"options": [[2], [3]], "domain": None, "gold": 0}]}))
    from workflow_scripts.tasks import items as task_items

    task_items.write_items([{"id": str(i), "question": "q", "answer": "A", "labels": ["A", "B"]} for i in range(2)],
                         tmp_path / "items.parquet")
    p = {"task": "t", "model": "m", "datastore": "d", "entry": {"kind": "choice", "metric": "accuracy",
                                                                "category": "reasoning"},
         "grid": {"lambdas": [0.0], "ks": [2], "sigmas": [1.0]}}
    _sweep_task(tmp_path, p)
    assert pl.read_parquet(tmp_path / "pred.parquet")["neighbours"].to_list() == [list(range(40, 48)),
                                                                                  list(range(20, 28))]


# ------------------------------------------------------------------------------------------ λ = 1 (issue 30 item 6)
def _no_neighbour_task(tmp_path, pmi: bool):
    """One item, gold option 0 ("A", token 0; "B", token 1); its query's neighbours carry neither (values 5, 6), so
    at λ = 1 every option scores -inf (and -inf - -inf = NaN with PMI under the domain premise)."""
    cache = {
        "t_lm": np.log(np.array([0.4, 0.6, 0.5, 0.5])),
        "t_pair": np.array([0, 1, 2, 3]),
        "t_row": np.array([0, 0, 1, 1]),
        "t_target": np.array([0, 1, 0, 1]),
        "q_dists": np.array([[0.0, 0.1], [0.0, 0.1]], np.float32),
        "q_vals": np.array([[5, 6], [5, 6]], np.int32),
        "q_ids": np.array([[10, 11], [12, 13]], np.int64),
        "pair_len": np.array([1, 1, 1, 1]),
    }
    np.savez(tmp_path / "scored.npz", **cache)
    meta = {"n_items": 1, "task": "t", "npz_sha256": sha256_file(tmp_path / "scored.npz")}
    (tmp_path / "scored.json").write_text(json.dumps(
        {"meta": meta, "items": [{"options": [[0], [1]], "domain": [[2], [3]] if pmi else None, "gold": 0}]}))
    item = {"id": "0", "question": "q", "answer": "A", "labels": ["A", "B"]}
    pl.DataFrame({"item": [json.dumps(item)]}).write_parquet(tmp_path / "items.parquet")
    kind = {"kind": "classify", "pmi": True} if pmi else {"kind": "choice"}
    return {"task": "t", "model": "m", "datastore": "d", "point": [1.0, 2, 1.0],
            "entry": {**kind, "metric": "accuracy", "category": "memory"},
            "grid": {"lambdas": [0.5, 1.0], "ks": [2], "sigmas": [1.0]}}


@pytest.mark.parametrize("pmi", [False, True])
def test_items_with_no_option_above_minus_inf_are_counted_and_never_class_0(tmp_path, pmi, caplog):
    """At λ = 1 with no neighbour carrying any option, argmax over all -inf (or NaN) scores returned class 0, so
    the reported accuracy was the share of items whose answer is the first class (here 1.0). Such items are
    wrong, counted in the sweep table's `undecided` column and the summary's knn_undecided, shown as such."""
    s = _sweep_task(tmp_path, _no_neighbour_task(tmp_path, pmi))
    assert (s["lambda"], s["knn"], s["knn_undecided"]) == (1.0, 0.0, 1)
    rows = {r["lambda"]: (r["score"], r["undecided"]) for r in pl.read_csv(tmp_path / "sweep.csv").iter_rows(
        named=True)}
    assert rows == {0.5: (0.0, 0), 1.0: (0.0, 1)}
    assert pl.read_parquet(tmp_path / "pred.parquet")["knn_pred"].to_list() == ["(no option scored above -inf)"]
    assert "1 of 1 items have no option scoring above -inf at λ=1" in caplog.text


def test_decide_ranks_nan_below_every_score_and_refuses_to_pick_among_minus_inf():
    assert rescoring.decide([np.nan, 0.5]) == 1  # argmax alone returns the NaN's index
    assert rescoring.decide([-np.inf, -np.inf]) == rescoring.NO_ANSWER
    assert rescoring.decide([np.nan, -np.inf]) == rescoring.NO_ANSWER
    assert rescoring.decide([np.inf, 0.0]) == 0  # impossible under the domain premise only: PMI +inf wins
    np.testing.assert_array_equal(rescoring.decide(np.array([[0.1, 0.2], [-np.inf, -np.inf]])), [1, -1])
