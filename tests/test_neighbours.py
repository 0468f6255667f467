"""What the datastore returned (workflow_scripts/neighbours.py, tasks/neighbours.py) and Δ by subtask:

* unit: every row of a datastore maps back to its corpus position, on a random GPT-2 and a random token stream,
  for a datastore of `shards: n`, one cut by shard_tokens and grown at its end, a subsample of the grown one (rows
  mapped through rows.npy to its parent's) and, where the extraction has them, strided windows: each shown
  neighbour's context, run through the model, gives the stored key of its row, and its value is the corpus token
  after the position; a subsample's rows.npy altered since is refused;
* unit: the subtask Δ table against hand-computed means, task_delta's rows, and its refusals;
* end to end (slow, the full run: the synthetic suite on micro, and micro_tenth, a subsample of it): every shown
  neighbour of the default tables equals the corpus tokens at its row's recorded position.
"""

from __future__ import annotations

import inspect
import json

import faiss
import numpy as np
import polars as pl
import pytest
import torch
from test_reliability import _tiny_gpt2
from test_tasks import one_thread  # noqa: F401 (the fixture: torch on one thread for many tiny forwards)

from workflow_scripts.artifacts import ArtifactError, read_json, save_npy, write_json
from workflow_scripts.datastore import Datastore, shard_plan, write_manifest
from workflow_scripts.extraction import extract_shard
from workflow_scripts.forward import capture_keys
from workflow_scripts.neighbours import Corpus, datastore_positions, neighbour_rows
from workflow_scripts.scaling import write_subsample
from workflow_scripts.tasks.evaluate import delta_table, subtask_delta_table

BLOCK = 16


class Ids:
    """A tokenizer stand-in whose text is its ids: decoded contexts read back exactly."""

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def key_of(model, hook, ids) -> np.ndarray:
    """The hook-point state of the last token of ``ids`` run alone through the model."""
    with torch.inference_mode(), capture_keys(model, hook) as box:
        model(torch.as_tensor([ids]))
    return box["keys"][0, -1].float().numpy()


def extract(model, ident, tokens_npy, out, spans=None, n_shards=None, stride=None):
    """A datastore's shards (one per span of a shard_tokens plan, or n_shards) and its manifest."""
    files = []
    extra = {"stride": stride} if stride else {}
    for i, span in enumerate(spans or [None] * n_shards):
        f = [out / "shards" / f"{n}_{i:03d}.{x}" for n, x in (("keys", "npy"), ("vals", "npy"), ("shard", "json"))]
        extract_shard(model, ident, tokens_npy, i, None if span else n_shards, BLOCK, 4, *f, span=span, **extra)
        files.append(tuple(map(str, f)))
    write_manifest(ident, tokens_npy, files, out / "manifest.json")
    return out / "manifest.json"


def check_every_row(model, ident, manifest, tokens_npy, tokens):
    """Every row's key is the model's state at its position run on its shown context (the whole key window), and its
    value the corpus token after it; shown through neighbour_rows of a search over the datastore's keys."""
    ds, corpus = Datastore(manifest), Corpus(manifest, tokens_npy, BLOCK)
    keys = ds.gather_keys(np.arange(ds.rows))
    index = faiss.IndexFlatL2(ds.dim)
    index.add(keys)
    queries = keys[:: max(1, ds.rows // 8)] + 0.01  # near a key each: itself and its neighbours shown
    d, ids = index.search(queries, 4)
    for qd, qi in zip(d, ids, strict=True):
        for r in neighbour_rows(Ids(), corpus, qi, qd, gold=-1, window=10 * BLOCK):  # the whole window shown
            ctx = [int(x) for x in r["neighbour_context"].split()]
            p = r["corpus_position"]
            assert ctx == tokens[p + 1 - len(ctx) : p + 1].tolist()  # the corpus tokens up to the row's position
            assert r["value_id"] == tokens[p + 1] == ds.gather_vals(np.asarray([r["row"]]))[0]
            assert r["value"] == str(tokens[p + 1])
            np.testing.assert_allclose(key_of(model, ident["hook_point"], ctx), keys[r["row"]], atol=2e-2, rtol=1e-2)
    pos, _ = datastore_positions(manifest, np.arange(ds.rows))
    return pos


@pytest.mark.usefixtures("one_thread")
def test_rows_map_to_their_corpus_positions_in_sharded_grown_subsampled_and_strided_datastores(tmp_path):
    model, ident = _tiny_gpt2(dim=16)
    write_json(tmp_path / "model.json", ident)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 150).astype(np.int32)
    save_npy(tmp_path / "tokens.npy", tokens)
    # shards: 2, the default layout: positions in order
    sharded = extract(model, ident, tmp_path / "tokens.npy", tmp_path / "sharded", n_shards=2)
    assert check_every_row(model, ident, sharded, tmp_path / "tokens.npy", tokens).tolist() == list(range(149))
    # a shard_tokens datastore over a stream grown at its end: the old last shard and the new ones re-cut
    grown = np.concatenate([tokens, rng.integers(0, 50, 71).astype(np.int32)])
    save_npy(tmp_path / "grown.npy", grown)
    plan = shard_plan(tmp_path / "grown.npy", 48, BLOCK)
    g = extract(model, ident, tmp_path / "grown.npy", tmp_path / "grown", spans=plan["shards"])
    assert [s["start"] for s in read_json(g)["shards"]] == [0, 48, 96, 144, 192]
    assert check_every_row(model, ident, g, tmp_path / "grown.npy", grown).tolist() == list(range(220))
    # a subsample of the grown datastore: row i is the parent's row rows.npy[i], not position i
    sub = write_subsample(g, 0.3, 7, tmp_path / "model.json", tmp_path / "grown.npy", tmp_path / "sub")
    parent_rows = np.load(tmp_path / "sub" / "rows.npy")
    pos = check_every_row(model, ident, tmp_path / "sub" / "manifest.json", tmp_path / "grown.npy", grown)
    assert pos.tolist() == parent_rows.tolist() and (pos != np.arange(sub["rows"])).any()
    # strided windows (datastores.<d>.stride), where extraction has them: a key's window starts before its block
    if "stride" in inspect.signature(extract_shard).parameters:
        strided = extract(model, ident, tmp_path / "grown.npy", tmp_path / "strided", n_shards=1, stride=BLOCK // 2)
        assert read_json(strided)["window"] == {"block_size": BLOCK, "stride": BLOCK // 2}
        assert check_every_row(model, ident, strided, tmp_path / "grown.npy", grown).tolist() == list(range(220))
    # refusals: a subsample's rows.npy altered since its manifest, tokens other than the datastore's
    save_npy(tmp_path / "sub" / "rows.npy", parent_rows[::-1].copy())
    with pytest.raises(ArtifactError, match=r"rows.npy: missing, or its sha256 differs .* rerun subsample_datastore"):
        Corpus(tmp_path / "sub" / "manifest.json", tmp_path / "grown.npy", BLOCK)
    with pytest.raises(ArtifactError, match=r"tokens.npy: not the tokens .*grown/manifest.json was extracted from"):
        Corpus(g, tmp_path / "tokens.npy", BLOCK)


# ------------------------------------------------------------------------------------------ Δ by subtask
def write_task(tmp_path, task, category, base, knn, groups=None):
    """A task's predictions.parquet and items parquet (the items' ``group`` when given)."""
    n = len(base)
    ids = [f"{task}-{i}" for i in range(n)]
    pl.DataFrame({"task": [task] * n, "category": [category] * n, "id": ids, "base_score": np.asarray(base, float),
                  "knn_score": np.asarray(knn, float)}).write_parquet(tmp_path / f"{task}.pred.parquet")
    items = [{"id": i, **({"group": g} if groups else {})} for i, g in zip(ids, groups or [None] * n, strict=True)]
    pl.DataFrame({"item": [json.dumps(it) for it in items]}).write_parquet(tmp_path / f"{task}.items.parquet")
    return tmp_path / f"{task}.pred.parquet", tmp_path / f"{task}.items.parquet"


def test_subtask_table_by_subtask_task_and_category(tmp_path):
    rng = np.random.default_rng(0)
    # bbh-like: three subtasks of unequal size; Δ per item known (+1, 0, -1 at chosen places)
    groups = ["a"] * 10 + ["b"] * 30 + ["c"] * 20
    base = np.zeros(60)
    knn = np.concatenate([np.ones(10), np.zeros(30), np.r_[np.zeros(15), -np.ones(5)]])  # a: +1, b: 0, c: -0.25
    bbh = write_task(tmp_path, "bbh", "reasoning", base, knn, groups)
    flat_base, flat_knn = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    flat = write_task(tmp_path, "twohop", "reasoning", flat_base, flat_knn)
    mem = write_task(tmp_path, "recall", "memory", np.zeros(40), np.r_[np.ones(10), np.zeros(30)])
    files = [bbh, flat, mem]
    t = subtask_delta_table([f[0] for f in files], [f[1] for f in files], seed=3)
    row = {(r["level"], r["task"], r["subtask"]): r for r in t.iter_rows(named=True)}
    # subtasks: their own means; a constant subtask's interval is that constant
    assert [row["subtask", "bbh", g]["delta"] for g in "abc"] == [1.0, 0.0, -0.25]
    assert row["subtask", "bbh", "a"]["lo"] == row["subtask", "bbh", "a"]["hi"] == 1.0
    assert [row["subtask", "bbh", g]["n"] for g in "abc"] == [10, 30, 20]
    # the task: the mean of its subtasks' Δ (BBH's macro average), not the pooled mean (0.0833...)
    assert row["task", "bbh", None]["delta"] == pytest.approx((1.0 + 0.0 - 0.25) / 3)
    assert row["task", "bbh", None]["groups"] == 3 and row["task", "bbh", None]["n"] == 60
    lo, hi = row["task", "bbh", None]["lo"], row["task", "bbh", None]["hi"]
    assert lo < row["task", "bbh", None]["delta"] < hi
    # a task without subtasks: its row is task_delta's (same Δ, same bootstrap interval)
    d = delta_table([flat[0], mem[0]], seed=3)
    for task in ("twohop", "recall"):
        want = d.filter(pl.col("task") == task).row(0, named=True)
        got = row["task", task, None]
        assert (got["delta"], got["lo"], got["hi"], got["n"]) == (want["delta"], want["lo"], want["hi"], want["n"])
        assert not any(k[0] == "subtask" and k[1] == task for k in row)
    # categories: the mean of their tasks' Δ
    cats = {r["category"]: r for r in t.iter_rows(named=True) if r["level"] == "category"}
    reasoning, memory = cats["reasoning"], cats["memory"]
    tasks_mean = (row["task", "bbh", None]["delta"] + row["task", "twohop", None]["delta"]) / 2
    assert reasoning["delta"] == pytest.approx(tasks_mean)
    assert reasoning["groups"] == 2 and reasoning["n"] == 110
    assert memory["delta"] == 0.25 and memory["lo"] < 0.25 < memory["hi"]
    assert t["level"].to_list() == ["category", "task", "category", "task", "subtask", "subtask", "subtask", "task"]
    # predictions of other items than the items file: refused, naming it
    with pytest.raises(ArtifactError, match=r"bbh.pred.parquet: predictions of other items than .*twohop.items"):
        subtask_delta_table([bbh[0]], [flat[1]])


# ------------------------------------------------------------------------------------------ the default tables
@pytest.mark.slow
def test_every_shown_neighbour_is_the_corpus_at_its_rows_position(task_run, monkeypatch):
    """The full run's neighbour tables (micro: two shards; micro_tenth: its fraction-0.1 subsample): each shown
    context and value are the datastore corpus's tokens at the row's position, with the position the manifest's
    range (micro) or rows.npy's parent row (micro_tenth); the task tables cover both directions and categories."""
    from workflow_scripts.artifacts import read_table
    from workflow_scripts.lm import load_identity, load_tokenizer

    work, _ = task_run
    monkeypatch.chdir(work)  # model.json names its model directory relative to the run
    r = work / "results"
    tok = load_tokenizer(load_identity(r / "models" / "micro-gpt2" / "model.json"))
    tokens = np.load(r / "tokens" / "micro-gpt2" / "micro" / "train.npy")
    block, window = 32, 24

    def shown(toks, p):
        return tok.decode(toks[max(p - p % block, p - window + 1) : p + 1].tolist())

    def check(df, rows_to_pos):
        assert df.height > 0
        for x in df.iter_rows(named=True):
            p = x["corpus_position"]
            assert p == rows_to_pos(x["row"])
            assert x["neighbour_context"] == shown(tokens, p)
            assert x["value_id"] == tokens[p + 1] and x["value"] == tok.decode([int(tokens[p + 1])])
            assert x["value_is_gold"] == (x["value"] == x["gold"])

    sub_rows = np.load(r / "datastores" / "micro_tenth" / "rows.npy")
    for ds, to_pos in (("micro", int), ("micro_tenth", lambda row: int(sub_rows[row]))):
        df = read_table(r / "tables" / "eval_neighbours" / f"{ds}.csv")
        check(df, to_pos)
        assert set(df["kind"]) == {"gain", "loss"} and set(df["eval_set"]) == {"valid", "test"}
        for (e,), g in df.group_by(["eval_set"]):
            ev = np.load(r / "tokens" / "micro-gpt2" / "micro" / f"{e}.npy")
            for x in g.iter_rows(named=True):
                p = x["position"]
                assert x["context"] == shown(ev, p) and x["gold"] == tok.decode([int(ev[p + 1])])
        gains = df.filter(pl.col("rank") == 1)
        assert (gains.filter(pl.col("kind") == "gain")["gain_nats"].min()
                >= gains.filter(pl.col("kind") == "loss")["gain_nats"].max())
    tn = read_table(r / "tables" / "task_neighbours" / "micro.csv")
    check(tn, int)
    assert set(tn["category"]) == {"memory", "reasoning"} and set(tn["direction"]) == {"knn_right", "base_right"}
    gold = read_table(r / "tables" / "neighbour_gold" / "micro.csv")
    assert set(gold["category"]) == {"memory", "reasoning"}
    assert ((gold["lo"] <= gold["gold_hit_rate"]) & (gold["gold_hit_rate"] <= gold["hi"])).all()
    assert (r / "figures" / "neighbour_gold" / "micro.png").stat().st_size > 0
    # the subtask table: each synthetic task's row is its task_delta row
    sub = read_table(r / "tables" / "task_subtasks" / "micro.csv")
    delta = read_table(r / "tables" / "task_delta" / "micro.csv")
    tasks = sub.filter(pl.col("level") == "task").select("category", "task", "delta", "lo", "hi", "n").sort("task")
    assert tasks.equals(delta.select("category", "task", "delta", "lo", "hi", "n").sort("task"))
    assert set(sub.filter(pl.col("level") == "category")["category"]) == {"memory", "reasoning"}
