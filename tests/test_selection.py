"""Selection and summary numbers that a wrong line would change silently: the (λ, k, σ) point is chosen on
valid and applied to test (never chosen on test), the oracle is the best point, chosen_point reads the valid
choice, and the bootstrap interval is the 95% percentile interval of the paired resampled means."""

import json

import numpy as np
import polars as pl
import pytest

from workflow_scripts import sweep
from workflow_scripts.tasks import evaluate


def _grid(tmp_path, name: str, ppl: dict) -> str:
    """A sweep table over a 2 x 2 x 1 grid with the given perplexity per (λ, k)."""
    rows = [{"lambda": lam, "k": k, "sigma": 1.0, "ppl": p, "base_ppl": 10.0, "n_tokens": 100}
            for (lam, k), p in ppl.items()]
    path = tmp_path / f"{name}.parquet"
    pl.DataFrame(rows).write_parquet(path)
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
    pl.DataFrame({"eval_set": ["test", "valid"], "datastore": ["d", "d"], "lambda": [0.3, 0.2], "k": [16, 64],
                  "sigma": [5.0, 3.0], "chosen_on": ["valid", "valid"]}).write_csv(f)
    # rows where eval_set != chosen_on hold the choice applied elsewhere: the test row says (0.3, 16, 5) here
    assert sweep.chosen_point(f, "d") == ((0.3, 16, 5.0), "perplexity on valid")
    pl.DataFrame({"eval_set": ["test"], "datastore": ["d"], "lambda": [0.1], "k": [4], "sigma": [1.0],
                  "chosen_on": ["test"]}).write_csv(f)
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
    from workflow_scripts.tasks import scoring

    lm, knn = np.array([-1000.0, -2000.0, -5.0]), np.array([-1001.0, -1990.0, -np.inf])
    got = knnlm.interpolate(lm, knn, 0.25)
    want = [np.log(0.75) - 1000 + np.log1p(0.25 / 0.75 * np.exp(-1.0)),
            np.log(0.25) - 1990 + np.log1p(0.75 / 0.25 * np.exp(-10.0)),
            np.log(0.75) - 5.0]
    assert np.allclose(got, want, rtol=0, atol=1e-9)
    # an option made of two continuations (pairs) of log-probabilities -1000 and -1001
    s = scoring.option_scores([[0, 1]], np.array([-1000.0, -1001.0]), np.array([1, 1]))
    assert s[0] == pytest.approx(-1000 + np.log1p(np.exp(-1.0)), abs=1e-9)
    s = scoring.option_scores([[0, 1]], np.array([-1000.0, -1001.0]), np.array([2, 4]), normalize=True)
    assert s[0] == pytest.approx(np.logaddexp(-500.0, -250.25), abs=1e-9)


# ------------------------------------------------------------------------------------------- scoring rules
def test_choice_pmi_subtracts_the_domain_score():
    """Options' log-likelihoods -1, -2; under the domain premise -0.5, -3: PMI = -0.5, +1 picks option 1 (adding
    the domain term, or ignoring it, picks option 0)."""
    from workflow_scripts.tasks import scoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-1.0, -2.0, -0.5, -3.0]), np.ones(4, np.int64)
    assert scoring.score_choice(items, lp, length, pmi=False).tolist() == [0]
    assert scoring.score_choice(items, lp, length, pmi=True).tolist() == [1]
    assert scoring.predict({"kind": "choice", "metric": "accuracy", "pmi": True}, items, lp, length).tolist() == [1]


def test_predict_normalises_by_length_for_accuracy_norm_only():
    """Option 0: one token at -2; option 1: six tokens summing to -3. Sum picks 0, per-token mean (-0.5) picks 1."""
    from workflow_scripts.tasks import scoring

    items = [{"options": [[0], [1]]}]
    lp, length = np.array([-2.0, -3.0]), np.array([1, 6])
    assert scoring.predict({"kind": "choice", "metric": "accuracy"}, items, lp, length).tolist() == [0]
    assert scoring.predict({"kind": "choice", "metric": "accuracy_norm"}, items, lp, length).tolist() == [1]


def test_classify_pmi_uses_the_whole_domain_continuation_not_its_per_token_mean():
    """Labels' log-likelihoods -3, -4 (one token each); domain continuations -2 (one token) and -6 (three tokens).
    Domain-conditional PMI with sums: -1, +2, label 1; normalising the domain side would give -1, -2, label 0."""
    from workflow_scripts.tasks import scoring

    items = [{"options": [[0], [1]], "domain": [[2], [3]]}]
    lp, length = np.array([-3.0, -4.0, -2.0, -6.0]), np.array([1, 1, 1, 3])
    assert scoring.score_classify(items, lp, length, pmi=True).tolist() == [1]
    assert scoring.score_classify(items, lp, length, pmi=False).tolist() == [0]
    assert scoring.predict({"kind": "classify", "metric": "accuracy", "pmi": True}, items, lp, length).tolist() == [1]


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
    (tmp_path / "scored.json").write_text(json.dumps(
        {"meta": {"n_items": 1}, "items": [{"options": [[0], [1]], "domain": None, "gold": 0}]}))
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
    pl.DataFrame({"eval_set": ["test"], "datastore": ["d"], "lambda": [0.1], "k": [2], "sigma": [1.0],
                  "chosen_on": ["valid"]}).write_csv(tmp_path / "s.csv")
    s = _sweep_task(tmp_path, p, tmp_path / "s.csv")
    assert (s["base"], s["knn"], s["lambda"], s["k"], s["chosen_on"]) == (0.0, 0.0, 0.1, 2, "perplexity on valid")
    s = _sweep_task(tmp_path, {**p, "point": [0.5, 1, 1]}, tmp_path / "s.csv")
    assert (s["base"], s["knn"], s["lambda"], s["k"], s["sigma"]) == (0.0, 1.0, 0.5, 1, 1.0)
    assert s["chosen_on"] == "pinned in config"
    rows = {(r["lambda"], r["k"], r["sigma"]): r["score"] for r in pl.read_csv(tmp_path / "sweep.csv").iter_rows(
        named=True)}
    assert rows == {(0.1, 2, 1.0): 0.0, (0.5, 1, 1.0): 1.0}  # the grid, plus the pinned point beside it
    assert pl.read_parquet(tmp_path / "pred.parquet")["knn_pred"].to_list() == ["A"]
