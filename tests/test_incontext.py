"""In-context retrieval beside the kNN-LM (workflow_scripts/incontext.py, tasks/incontext.py): passages and their
BM25 index, the passage put before each stretch of an eval window, the scored tokens, the leak check, the task
items' prompts; end to end on the task run (tests/configs/full.yaml)."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch

from workflow_scripts import lm
from workflow_scripts.artifacts import ArtifactError, read_table, save_npy, sha256_file, write_json, write_table
from workflow_scripts.incontext import (
    Passages,
    build_passages,
    incontext_logprobs,
    leaked,
    passage_spans,
    read_scored,
    stretches,
)
from workflow_scripts.tasks.incontext import with_passage

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


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_the_incontext_tables_put_the_three_side_by_side_on_the_same_tokens_and_items(task_run):
    """The task run (tests/configs/full.yaml, in-context retrieval on micro): the base LM and kNN-LM rows are the
    perplexity and task summaries' own numbers, the in-context rows are new, every interval holds its value."""
    work, jobs = task_run
    assert {"passages", "incontext_perplexity", "incontext_task", "incontext_perplexity_table",
            "incontext_task_table", "figure_incontext"} <= set(jobs), jobs
    ppl = read_table(work / "results/tables/incontext_perplexity.parquet")
    assert sorted(ppl["method"].unique()) == ["base", "incontext", "knn"] and ppl.height == 6
    summary = read_table(work / "results/tables/perplexity_summary.parquet")
    for r in ppl.iter_rows(named=True):
        s = summary.filter((summary["eval_set"] == r["eval_set"]) & (summary["datastore"] == r["datastore"]))
        if r["method"] != "incontext":
            assert r["ppl"] == pytest.approx(s[f"{r['method']}_ppl"][0], rel=1e-6), r
            assert r["n_tokens"] == s["n_tokens"][0]
        assert r["ppl_lo"] <= r["ppl"] <= r["ppl_hi"]
    tasks = read_table(work / "results/tables/incontext_tasks.parquet")
    summ = read_table(work / "results/tables/task_summary.parquet").filter(pl.col("datastore") == "micro")
    assert sorted(tasks.filter(~pl.col("task").str.starts_with("all "))["task"].unique()) == sorted(summ["task"])
    for r in tasks.filter(~pl.col("task").str.starts_with("all ")).iter_rows(named=True):
        s = summ.filter(pl.col("task") == r["task"])
        if r["method"] != "incontext":
            assert r["score"] == pytest.approx(s[r["method"]][0]), r
        assert r["lo"] <= r["delta"] <= r["hi"]
    assert set(tasks.filter(pl.col("task").str.starts_with("all "))["task"]) == {"all memory", "all reasoning"}
    record = json.loads((work / "results/incontext/micro/passages/meta.json").read_text())
    assert record["passages"] > 0 and set(record["eval_tokens_sha256"]) == {"valid", "test"}
    assert (work / "results/figures/incontext/micro.png").stat().st_size > 0
