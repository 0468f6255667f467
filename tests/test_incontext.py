"""In-context retrieval beside the kNN-LM (workflow_scripts/incontext.py, tasks/incontext.py): passages and their
BM25 index, the passage put before each stretch of an eval window, the scored tokens, the leak check, the task
items' prompts; end to end on the task run (tests/configs/full.yaml)."""

import json
import shlex
import shutil

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from conftest import job_stats, load_test_config, snakemake

from workflow_scripts import cli, lm, sweep
from workflow_scripts.artifacts import ArtifactError, read_table, save_npy, sha256_file, write_json, write_table
from workflow_scripts.incontext import (
    Passages,
    build_passages,
    incontext_logprobs,
    leaked,
    passage_spans,
    perplexity_table,
    read_scored,
    stretches,
)
from workflow_scripts.tasks import evaluate
from workflow_scripts.tasks.incontext import task_table, with_passage

WORDS = [lm.EOS, "paris", "france", "capital", "seine", "river", "berlin", "germany", "spree", "tokyo", "japan",
         "island", "mount", "fuji", "volcano", "city", "large", "old", "north", "south", "east", "west", "bridge",
         "tower", "museum", "rain", "snow", "train", "station", "harbour"]
VOCAB = len(WORDS)
ID = {w: i for i, w in enumerate(WORDS)}
L = 8  # passage_tokens: each document below is one passage
DOCS = [  # three documents of 8 words; only the second speaks of berlin, germany and the spree
    "paris france capital seine river bridge tower museum",
    "berlin germany capital spree river old train station",
    "tokyo japan island mount fuji volcano large harbour",
]
P = {"passage_tokens": L, "passages": 1, "query_tokens": 3, "stride": 2, "leak_ngram": 6}
BLOCK = 16


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A random GPT-2 with a word-level tokenizer (model.json), the three documents as the datastore's token stream
    and their passages (passages/meta.json), and an eval stream (test.npy) that never repeats a document."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("incontext")
    torch.manual_seed(0)
    backend = Tokenizer(models.WordLevel(ID, unk_token=lm.EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=lm.EOS, bos_token=lm.EOS, unk_token=lm.EOS)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                                             bos_token_id=0, eos_token_id=0)).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_json(root / "model.json", lm.describe(model, tok, {"source": "local", "path": str(root / "model")}))
    save_npy(root / "train.npy", np.asarray([t for d in DOCS for t in ids(d)], np.int32))
    # a window of 16 positions: the stretch [6, 8) is retrieved with "germany spree berlin" (positions 4..6)
    evl = "city north snow berlin germany spree berlin rain east west south city tower snow rain city north"
    save_npy(root / "test.npy", np.asarray(ids(evl), np.int32))
    build_passages(root / "train.npy", root / "model.json", {"test": root / "test.npy"}, P, root / "p/meta.json")
    return root


class Spy(torch.nn.Module):
    """The model, recording every input it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.inputs = model, []

    def forward(self, input_ids):
        self.inputs += input_ids.tolist()
        return self.model(input_ids=input_ids)


def _load(world):
    model, tok, ident = lm.load_checked(world / "model.json", device="cpu")
    return model, tok, Passages(world / "p/meta.json", world / "train.npy", ident)


def test_the_best_bm25_passage_is_put_before_the_stretch_and_only_the_windows_tokens_are_scored(world):
    model, tok, passages = _load(world)
    assert passages.spans.tolist() == [[0, 8], [8, 16], [16, 24]]
    assert passages.top(["germany spree berlin"], 1).tolist() == [[1]]  # the second document, by BM25
    tokens = np.load(world / "test.npy")
    spy = Spy(model)
    lp, first = incontext_logprobs(spy, tokens, 16, passages, P, tok, BLOCK, batch=4)
    assert stretches(16, BLOCK, 2)[3] == (0, 6, 8)
    # the stretch [6, 8): the berlin passage, then the window's own tokens up to 8, cut to fit 16 = 8 + 8
    berlin = ids(DOCS[1])
    assert berlin + tokens[0:8].tolist() in spy.inputs
    assert first[6] == first[7] == 8 and first[0] == -1  # "city" (the query of [0, 2)) is in no passage
    # scored: the stretch's own targets tokens[7], tokens[8], read after the passage, never a passage token
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=torch.as_tensor([berlin + tokens[0:8].tolist()])).logits[0], -1)
    assert lp[6] == pytest.approx(float(logp[8 + 6, tokens[7]]), abs=1e-5)
    assert lp[7] == pytest.approx(float(logp[8 + 7, tokens[8]]), abs=1e-5)
    assert len(spy.inputs) == 8 and all(len(x) <= BLOCK for x in spy.inputs)  # one input per stretch, each fits


def test_incontext_perplexity_matches_a_brute_force_over_every_position(world):
    """Every position scored alone, with no batching: its stretch, its query, the passage BM25 ranks first, the
    input cut from the left to the window, log p of its target; the perplexity of them all."""
    model, tok, passages = _load(world)
    tokens = np.load(world / "test.npy")
    n, p = 15, {**P, "stride": 3, "query_tokens": 4}
    block = 8 + 3  # the passage (8) and a stretch of 3 fit: windows [0, 11), [11, 15)
    lp, _ = incontext_logprobs(model, tokens, n, passages, p, tok, block, batch=3)
    want = []
    for i in range(n):
        a = i // block * block
        j = a + (i - a) // 3 * 3
        e = min(j + 3, a + block, n)
        query = tok.decode(tokens[max(a, j + 1 - 4) : j + 1].tolist())
        best = passages.top([query], 1)[0, 0]
        pre = tokens_of(world, best)
        lo = max(a, e - (block - len(pre)))
        x = pre + tokens[lo:e].tolist()
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.as_tensor([x])).logits[0].double(), -1)
        want.append(float(logp[len(pre) + i - lo, tokens[i + 1]]))
    np.testing.assert_allclose(lp, want, atol=1e-5)
    assert np.exp(-lp.mean()) == pytest.approx(np.exp(-np.mean(want)), rel=1e-5)


def tokens_of(world, passage: int) -> list[int]:
    return [] if passage < 0 else np.load(world / "train.npy")[passage * L : (passage + 1) * L].tolist()


def test_a_stretch_that_does_not_fit_beside_its_passages_is_refused_naming_the_keys(world):
    model, tok, passages = _load(world)
    with pytest.raises(ValueError, match=r"incontext.stride \(9\).*extraction.block_size = 16"):
        incontext_logprobs(model, np.load(world / "test.npy"), 16, passages, {**P, "stride": 9}, tok, BLOCK, 4)


def test_passages_sharing_an_ngram_with_the_eval_text_are_left_out(world, tmp_path):
    """The third document copied into the eval stream: its passage is left out, and never retrieved."""
    evl = np.asarray(ids("city north") + ids(DOCS[2])[1:7] + ids("rain snow"), np.int32)
    save_npy(tmp_path / "leak.npy", evl)
    meta = build_passages(world / "train.npy", world / "model.json", {"leak": tmp_path / "leak.npy"}, P,
                          tmp_path / "p/meta.json")
    assert meta["excluded"] == 1 and meta["passages"] == 2
    _, _, ident = lm.load_checked(world / "model.json", device="cpu")
    passages = Passages(tmp_path / "p/meta.json", world / "train.npy", ident)
    assert passages.spans.tolist() == [[0, 8], [8, 16]]
    assert passages.top(["tokyo japan fuji volcano"], 1).tolist() == [[-1]]
    # an n-gram one token shorter than leak_ngram is no leak
    tokens = np.asarray([t for d in DOCS for t in ids(d)])
    assert not leaked(tokens, passage_spans(tokens.size, L), [tokens[16:21]], 6).any()
    assert leaked(tokens, passage_spans(tokens.size, L), [tokens[14:20]], 6).tolist() == [False, True, True]


def test_passages_are_checked_against_their_digests_and_token_stream(world, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(world, w)
    bm25 = next((w / "p/bm25").glob("*.npy"))
    bm25.write_bytes(bm25.read_bytes()[:-4])
    with pytest.raises(ArtifactError, match=r"bm25/.*sha256 differs.*rerun passages"):
        Passages(w / "p/meta.json", w / "train.npy")
    with pytest.raises(ArtifactError, match="another token stream than"):
        Passages(world / "p/meta.json", world / "test.npy")


def test_a_per_token_table_is_checked_against_the_sha256_its_record_holds(tmp_path):
    df = pl.DataFrame({"position": [0, 1], "base": [-1.0, -2.0], "knn": [-1.0, -1.5], "incontext": [-0.5, -2.5]})
    write_table(df, tmp_path / "t.csv", tmp_path / "t.parquet")
    write_json(tmp_path / "t.json", {"parquet_sha256": sha256_file(tmp_path / "t.parquet")})
    assert read_scored(tmp_path / "t.json")[1].equals(df)
    write_table(df.with_columns(pl.col("incontext") * 0), tmp_path / "t.csv", tmp_path / "t.parquet")  # rewritten
    with pytest.raises(ArtifactError, match=r"t.parquet: its sha256 differs from the one .*t.json recorded"):
        read_scored(tmp_path / "t.json")


def test_a_task_items_passage_goes_before_every_context_the_model_reads():
    choice = {"question": "q", "options": [[["the q", " a"]], [["the q", " b"]]],
              "domain": [[["", " a"]], [["", " b"]]], "gold": 0}
    out = with_passage(choice, "P", "\n")
    assert out["options"] == [[["P\nthe q", " a"]], [["P\nthe q", " b"]]]
    assert out["domain"] == [[["P\n", " a"]], [["P\n", " b"]]]
    last = {"question": "q", "premise": "the q", "domain_premise": None}
    assert with_passage(last, "P", " ") == {"question": "q", "premise": "P the q", "domain_premise": None}
    assert with_passage({"context": "c"}, "P", "\n") == {"context": "P\nc"}
    assert with_passage(choice, "", "\n") is choice  # no passage retrieved: the item as it was


# --------------------------------------------------------------------------------------------- the summaries
def _scored(path, record: dict, df: pl.DataFrame):
    """A per-token or per-item table and its record, as incontext_perplexity and incontext_task write them."""
    write_table(df, path.with_suffix(".csv"), path.with_suffix(".parquet"))
    write_json(path.with_suffix(".json"), record | {"parquet_sha256": sha256_file(path.with_suffix(".parquet"))})
    return path.with_suffix(".json")


@pytest.fixture
def ppl_tables(tmp_path):
    """summarize's table for datastores a and b on valid and test (40 tokens each), and the in-context perplexity
    table of a's two eval sets over their first 12 tokens, computed by perplexity_table from per-token records."""
    sweeps = {}
    for d in ("a", "b"):
        for e, shift in (("valid", 0.0), ("test", 1.0)):
            rows = [{"lambda": lam, "k": k, "sigma": 1.0, "ppl": 5.0 + shift - lam + k / 100, "base_ppl": 6.0 + shift,
                     "n_tokens": 40} for lam in (0.1, 0.2) for k in (4, 8)]
            sweeps[(e, d)] = tmp_path / f"sweep_{e}_{d}.parquet"
            write_table(pl.DataFrame(rows), sweeps[(e, d)].with_suffix(".csv"), sweeps[(e, d)])
    sweep.summarize_sweeps(sweeps, "valid", tmp_path / "points.csv", tmp_path / "points.parquet")
    rng = np.random.default_rng(0)
    records = [_scored(tmp_path / f"ic_{e}", {"eval_set": e, "datastore": "a", "n_tokens": 12}, pl.DataFrame(
        {"position": np.arange(12), **{m: -rng.uniform(0.5, 3.0, 12) for m in sweep.METHODS}}))
               for e in ("valid", "test")]
    table = perplexity_table(records, {"block_size": 4, "n_boot": 50, "seed": 0})
    write_table(table, tmp_path / "incontext_perplexity.csv", tmp_path / "incontext_perplexity.parquet")
    return tmp_path, records


def test_the_perplexity_summary_puts_incontext_retrieval_beside_the_knn_lm(ppl_tables):
    t, records = ppl_tables
    sweep.perplexity_summary(t / "points.parquet", t / "ps.csv", t / "ps.parquet", t / "incontext_perplexity.parquet")
    df, points = read_table(t / "ps.parquet"), read_table(t / "points.parquet")
    assert df.columns == points.columns + list(sweep.INCONTEXT_COLUMNS)
    assert df.select(points.columns).write_csv() == (t / "points.csv").read_text()  # summarize's, byte for byte
    assert read_table(t / "ps.csv").equals(df)
    table = read_table(t / "incontext_perplexity.parquet")
    for r in df.filter(pl.col("datastore") == "b").iter_rows(named=True):  # no in-context retrieval on b
        assert [r[c] for c in sweep.INCONTEXT_COLUMNS] == [None] * 6
    scored = {(rec["eval_set"], rec["datastore"]): per_token for rec, per_token in map(read_scored, records)}
    a = df.filter(pl.col("datastore") == "a")
    assert a.height == 2
    for r in a.iter_rows(named=True):
        per_token = scored[(r["eval_set"], "a")]
        row = {m: table.filter((pl.col("eval_set") == r["eval_set"]) & (pl.col("datastore") == "a")
                               & (pl.col("method") == m)).row(0, named=True) for m in sweep.METHODS}
        assert r["incontext_n_tokens"] == row["incontext"]["n_tokens"] == 12 < r["n_tokens"] == 40
        for column, method in (("incontext_base_ppl", "base"), ("incontext_knn_ppl", "knn"),
                               ("incontext_ppl", "incontext")):
            assert r[column] == row[method]["ppl"]
            assert r[column] == pytest.approx(np.exp(-per_token[method].mean()), rel=1e-12)
        ic = row["incontext"]
        assert (r["incontext_ppl_lo"], r["incontext_ppl_hi"]) == (ic["ppl_lo"], ic["ppl_hi"])
        assert r["incontext_ppl_lo"] < r["incontext_ppl"] < r["incontext_ppl_hi"]


def test_without_incontext_retrieval_the_perplexity_summary_is_summarizes_table_byte_for_byte(ppl_tables):
    t, _ = ppl_tables
    sweep.perplexity_summary(t / "points.parquet", t / "ps.csv", t / "ps.parquet")
    assert (t / "ps.csv").read_bytes() == (t / "points.csv").read_bytes()
    assert read_table(t / "ps.parquet").equals(read_table(t / "points.parquet"))


def test_the_summaries_refuse_an_altered_or_foreign_incontext_table_by_name(ppl_tables):
    t, _ = ppl_tables
    table = t / "incontext_perplexity.parquet"
    run = [t / "points.parquet", t / "ps.csv", t / "ps.parquet", table]
    good = pl.read_parquet(table)
    digest = pl.read_parquet_metadata(table)
    for altered, error in [
        (good.with_columns(pl.col("ppl") * 2), r"incontext_perplexity.parquet: its contents differ from the sha256"),
        (good.with_columns(datastore=pl.lit("c")),
         r"incontext_perplexity.parquet: \('eval_set', 'datastore'\) \[\('test', 'c'\).*not in the summary.*"
         r"rerun incontext_perplexity_table"),
        (good.filter(pl.col("method") != "knn"), r"lack a method of \['base', 'incontext', 'knn'\]"),
        (pl.concat([good, good.head(1)]), r"two rows of \('test', 'a'\), method 'base'"),
    ]:
        if "sha256" in error:  # rewritten with the old digest: what an edit by hand leaves
            altered.write_parquet(table, metadata=digest)
        else:
            write_table(altered, t / "incontext_perplexity.csv", table)
        with pytest.raises(ArtifactError, match=error):
            sweep.perplexity_summary(*run)
        assert not (t / "ps.csv").exists()
    write_table(good, t / "incontext_perplexity.csv", table)
    sweep.perplexity_summary(*run)
    points = pl.read_parquet(t / "points.parquet")  # summarize's table edited, its recorded digest kept
    points.with_columns(knn_ppl=pl.col("base_ppl")).write_parquet(
        t / "points.parquet", metadata=pl.read_parquet_metadata(t / "points.parquet"))
    with pytest.raises(ArtifactError, match=r"points.parquet: its contents differ from the sha256"):
        sweep.perplexity_summary(*run)


@pytest.fixture
def task_tables(tmp_path):
    """task_sweep's summaries of tasks r (memory) and s (reasoning) on datastore a (10 items each) and of r on b,
    and the in-context task table of a's two tasks over their first 6 items, computed by task_table from
    per-item records."""
    rng = np.random.default_rng(1)
    summaries, records = [], []
    for d, task, category in (("a", "r", "memory"), ("a", "s", "reasoning"), ("b", "r", "memory")):
        scores = {m: rng.integers(0, 2, 10).astype(float) for m in ("base", "knn", "incontext")}
        summaries.append(tmp_path / f"{d}_{task}.json")
        write_json(summaries[-1], {"model": "m", "datastore": d, "task": task, "category": category, "kind": "choice",
                                   "metric": "accuracy", "n": 10, "base": scores["base"].mean(),
                                   "knn": scores["knn"].mean(), "lambda": 0.25, "k": 8, "sigma": 1.0,
                                   "chosen_on": "perplexity on valid", "best": 1.0, "best_lambda": 0.25, "best_k": 8,
                                   "best_sigma": 1.0})
        if d == "a":
            records.append(_scored(tmp_path / f"ic_{task}", {"datastore": d, "task": task, "n": 6}, pl.DataFrame(
                {"task": [task] * 6, "category": [category] * 6, "id": [str(i) for i in range(6)],
                 **{f"{m}_score": s[:6] for m, s in scores.items()}})))
    table = task_table(records, seed=0, n_boot=200)
    write_table(table, tmp_path / "incontext_tasks.csv", tmp_path / "incontext_tasks.parquet")
    return tmp_path, summaries, records


def test_the_task_summary_puts_incontext_retrieval_and_its_interval_beside_the_knn_lm(task_tables):
    t, summaries, records = task_tables
    plain = evaluate.summarize_tasks(summaries, t / "plain.csv", t / "plain.parquet")
    evaluate.task_summary(summaries, t / "ts.csv", t / "ts.parquet", t / "incontext_tasks.parquet")
    df = read_table(t / "ts.parquet")
    assert df.columns == evaluate.SUMMARY_COLUMNS + list(evaluate.INCONTEXT_COLUMNS)
    assert df.select(plain.columns).write_csv() == (t / "plain.csv").read_text()  # the kNN-LM's, byte for byte
    b = df.filter(pl.col("datastore") == "b").row(0, named=True)
    assert [b[c] for c in evaluate.INCONTEXT_COLUMNS] == [None] * 6  # no in-context retrieval on b
    table = read_table(t / "incontext_tasks.parquet")
    items = {rec["task"]: per_item for rec, per_item in map(read_scored, records)}
    for r in df.filter(pl.col("datastore") == "a").iter_rows(named=True):
        per_item = items[r["task"]]
        row = table.filter((pl.col("task") == r["task"]) & (pl.col("method") == "incontext")).row(0, named=True)
        assert r["incontext_n"] == row["n"] == 6 < r["n"] == 10
        assert r["incontext_base"] == pytest.approx(per_item["base_score"].mean())
        assert r["incontext"] == row["score"] == pytest.approx(per_item["incontext_score"].mean())
        d, lo, hi = evaluate.bootstrap_delta(per_item["base_score"], per_item["incontext_score"], n_boot=200, seed=0)
        assert (r["incontext_delta"], r["incontext_lo"], r["incontext_hi"]) == (row["delta"], row["lo"], row["hi"])
        assert (r["incontext_delta"], r["incontext_lo"], r["incontext_hi"]) == pytest.approx((d, lo, hi))
        assert r["incontext_delta"] == pytest.approx(r["incontext"] - r["incontext_base"])
    evaluate.task_summary(summaries, t / "none.csv", t / "none.parquet")  # in-context retrieval not configured
    assert (t / "none.csv").read_bytes() == (t / "plain.csv").read_bytes()
    table.filter(pl.col("method") != "incontext").write_parquet(  # its rows edited, its recorded digest kept
        t / "incontext_tasks.parquet", metadata=pl.read_parquet_metadata(t / "incontext_tasks.parquet"))
    with pytest.raises(ArtifactError, match=r"incontext_tasks.parquet: its contents differ from the sha256"):
        evaluate.task_summary(summaries, t / "ts.csv", t / "ts.parquet", t / "incontext_tasks.parquet")


@pytest.mark.slow  # a Snakemake DAG build
def test_without_incontext_datastores_the_summaries_wait_on_no_incontext_job(tmp_path):
    """tests/configs/tasks.yaml runs no in-context retrieval: the perplexity and task summaries are planned with
    summarize's table and the task summaries alone, and no in-context job runs."""
    cfg = load_test_config("tasks")
    assert "incontext" not in cfg
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml")).stdout
    jobs = job_stats(out)
    assert {"summarize", "perplexity_summary", "task_summary"} <= set(jobs)
    assert not [r for r in jobs if "incontext" in r or r == "passages"], jobs
    steps = cli.find_steps()
    args = {}
    for line in out.splitlines():
        if "workflow_scripts perplexity-summary " in line or "workflow_scripts task-summary " in line:
            argv = shlex.split(line[line.index("python -m") :])
            argv = argv[: argv.index("2>")]
            mod, func, _ = steps[argv[3]]
            fn = getattr(__import__(f"workflow_scripts.{mod}", fromlist=[func]), func)
            args[argv[3]] = vars(cli.parser_for(fn).parse_args(argv[4:]))
    assert args["perplexity-summary"]["incontext"] is None and args["task-summary"]["incontext"] is None
    assert "--incontext" not in out
    assert str(args["perplexity-summary"]["summary"]) == "results/sweeps/summary.parquet"


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_incontext_tables_put_the_three_side_by_side_on_the_same_tokens_and_items(task_run):
    """The task run (tests/configs/full.yaml, in-context retrieval on micro): the base LM and kNN-LM rows are the
    perplexity and task summaries' own numbers, the in-context rows are new and are the summaries' in-context
    columns, every interval holds its value."""
    work, jobs = task_run
    assert {"passages", "incontext_perplexity", "incontext_task", "incontext_perplexity_table",
            "incontext_task_table", "figure_incontext", "perplexity_summary", "task_summary"} <= set(jobs), jobs
    ppl = read_table(work / "results/tables/incontext_perplexity.parquet")
    assert sorted(ppl["method"].unique()) == ["base", "incontext", "knn"] and ppl.height == 6
    summary = read_table(work / "results/tables/perplexity_summary.parquet")
    for r in ppl.iter_rows(named=True):
        s = summary.filter((summary["eval_set"] == r["eval_set"]) & (summary["datastore"] == r["datastore"]))
        if r["method"] != "incontext":
            assert r["ppl"] == pytest.approx(s[f"{r['method']}_ppl"][0], rel=1e-6), r
            assert r["n_tokens"] == s["n_tokens"][0]
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"]
    for s in summary.iter_rows(named=True):  # the summary's in-context columns: the in-context table's numbers
        row = {r["method"]: r for r in ppl.filter((pl.col("eval_set") == s["eval_set"])
                                                  & (pl.col("datastore") == s["datastore"])).iter_rows(named=True)}
        if not row:  # a datastore without in-context retrieval: its in-context columns are empty
            assert s["datastore"] != "micro" and s["incontext_ppl"] is None and s["incontext_n_tokens"] is None, s
            continue
        assert (s["incontext_n_tokens"], s["incontext_base_ppl"], s["incontext_knn_ppl"], s["incontext_ppl"],
                s["incontext_ppl_lo"], s["incontext_ppl_hi"]) == (
            row["incontext"]["n_tokens"], row["base"]["ppl"], row["knn"]["ppl"], row["incontext"]["ppl"],
            row["incontext"]["ppl_lo"], row["incontext"]["ppl_hi"]), s
    tasks = read_table(work / "results/tables/incontext_tasks.parquet")
    summ = read_table(work / "results/tables/task_summary.parquet").filter(pl.col("datastore") == "micro")
    assert sorted(tasks.filter(~pl.col("task").str.starts_with("all "))["task"].unique()) == sorted(summ["task"])
    for r in tasks.filter(~pl.col("task").str.starts_with("all ")).iter_rows(named=True):
        s = summ.filter(pl.col("task") == r["task"])
        if r["method"] != "incontext":
            assert r["score"] == pytest.approx(s[r["method"]][0]), r
        else:  # the task summary's in-context columns
            assert (s["incontext_n"][0], s["incontext"][0], s["incontext_delta"][0], s["incontext_lo"][0],
                    s["incontext_hi"][0]) == (r["n"], r["score"], r["delta"], r["lo"], r["hi"]), r
        assert r["lo"] <= r["delta"] <= r["hi"]
    assert set(tasks.filter(pl.col("task").str.starts_with("all "))["task"]) == {"all memory", "all reasoning"}
    record = json.loads((work / "results/incontext/micro/passages/meta.json").read_text())
    assert record["passages"] > 0 and set(record["eval_tokens_sha256"]) == {"valid", "test"}
    assert (work / "results/figures/incontext/micro.png").stat().st_size > 0


@pytest.mark.slow
def test_an_incontext_change_reruns_its_jobs_and_the_summary_not_what_reads_the_chosen_point(task_run, tmp_path):
    """The chosen point is summarize's table, not the perplexity summary that in-context retrieval feeds: fewer
    in-context positions rerun in-context perplexity and the summary, never the task sweeps or the analyses."""
    work, _ = task_run
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    cfg["incontext"]["max_tokens"] = 100
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    jobs = job_stats(snakemake(work, "-n", "--configfile", str(tmp_path / "config.yaml")).stdout)
    assert set(jobs) == {"incontext_perplexity", "incontext_perplexity_table", "figure_incontext",
                         "perplexity_summary", "stage_times", "all"}, jobs
