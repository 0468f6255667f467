"""Paper 1's memory tasks as its eval_fuzzy.py scores them (GSYfate/knnlm-limits): the task files in the paper's
data/ layout, label files, the first subword of a synonym for three kinds of tokenizer, DCPMI at the premise's
last position, and, end to end, every prediction of the pipeline against an independent re-implementation of the
paper's scoring (its preprocess_dataset, init_label2word_id, eval_one_ex with the kNN wrapper, vocab2label)."""

import copy
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import PAPER_LABELS, p_knn_by_hand, write_paper_data

from workflow_scripts import lm
from workflow_scripts.config import ConfigError
from workflow_scripts.datastore import Datastore
from workflow_scripts.forward import capture_keys
from workflow_scripts.tasks import items as task_items
from workflow_scripts.tasks import registry, rescoring, scoring

REG = registry.registry()
MEMORY = ["sst2", "rotten_tomatoes", "mr", "cr", "hyp", "agn", "yahoo", "rte", "cb"]
TEXTS = [f"Name{i} ( born {1900 + i} in Town{i % 3} ) is a painter ." for i in range(24)]


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    return write_paper_data(tmp_path_factory.mktemp("paper") / "data", TEXTS)


def items_of(task, root, **kw):
    return task_items.load_items(registry.resolve_entry(REG[task], str(root), task), **kw)


# ------------------------------------------------------------------------------------------- loading
def test_the_nine_memory_tasks_are_the_papers_last_token_protocol():
    for t in MEMORY:
        e = REG[t]
        assert (e["category"], e["kind"], e["protocol"], e["pmi"]) == ("memory", "classify", "last_token", True)


@pytest.mark.parametrize("task, n_rows, gold0, premise0, domain", [
    # SST-5 labels 1..5 in rotation: label 3 dropped; label − 3 < 0 negative, > 0 positive
    ("sst2", 24 - 5, 0, TEXTS[0] + " The sentence has a tone that is", " The sentence has a tone that is"),
    ("rotten_tomatoes", 24, 0, TEXTS[0] + " The sentence has a tone that is", "The sentence has a tone that is"),
    ("mr", 24, 0, TEXTS[0] + " The sentence has a tone that is", "The sentence has a tone that is"),
    ("cr", 24, 0, TEXTS[0] + " It was", " It was"),
    ("hyp", 24, 0, TEXTS[0] + " neutral or partisan? Answer:", " neutral or partisan? Answer:"),  # text stripped
    # (hyp's unnamed column is a row index, as in the paper's file; the label is `label`, as eval_fuzzy.py reads)
    ("agn", 24, 0, f"title: Name0\nsummary: {TEXTS[0]}\ntopic:", "topic:"),  # Class Index 1 -> class 0
    ("rte", 24, 0, f" {TEXTS[0]}\nquestion: Name0 works . true or false?\nanswer:", "true or false?\nanswer:"),
    ("cb", 24, 0, f"premise: {TEXTS[0]}\nhypothesis: Name0 is a painter\nanswer: The hypothesis is",
     "answer: The hypothesis is"),
])
def test_each_memory_task_reads_its_paper_file_with_the_papers_premise_and_label_coding(
    paper_data, task, n_rows, gold0, premise0, domain
):
    items = items_of(task, paper_data)
    assert len(items) == n_rows
    assert items[0]["premise"] == premise0 and items[0]["domain_premise"] == domain
    assert items[0]["gold"] == gold0
    golds = [it["gold"] for it in items]
    if task == "sst2":
        rows = [json.loads(x) for x in (paper_data / "sst2/test.jsonl").read_text().splitlines()]
        kept = [int(r["label"]) - 3 for r in rows if int(r["label"]) != 3]
        assert golds == [1 if s > 0 else 0 for s in kept]
    if task == "agn":
        assert golds == [i % 4 for i in range(24)]
    if task == "cb":
        assert golds == [i % 3 for i in range(24)]  # entailment, contradiction, neutral
    if task == "rte":
        assert golds == [i % 2 for i in range(24)]


def test_label_files_are_split_on_comma_space_prefixed_and_trimmed_to_the_shortest_class(paper_data):
    e = registry.resolve_entry(REG["cr"], str(paper_data), "cr")
    neg, pos = PAPER_LABELS["label_names_sentidict.txt"]
    n = min(len(neg.split(", ")), len(pos.split(", ")))
    assert e["synonyms"] == [[" " + w for w in neg.split(", ")][:n], [" " + w for w in pos.split(", ")][:n]]
    yahoo = registry.resolve_entry(REG["yahoo"], str(paper_data), "yahoo")["synonyms"]
    assert yahoo[0] == [" society", " culture"] and yahoo[4] == [" computers", " internet"] and len(yahoo) == 10
    assert REG["cb"]["synonyms"][2] == [" neither"]  # fixed lists are not trimmed (eval_fuzzy.py)


def test_yahoo_is_the_papers_seeded_draw_of_3000_rows(tmp_path, paper_data):
    f = tmp_path / "yahoo.jsonl"
    with open(f, "w") as out:
        for i in range(3100):
            out.write(json.dumps({"id": i, "topic": i % 10, "question_title": f"q{i}", "question_content": "",
                                  "best_answer": f"a{i}"}) + "\n")
    items = items_of("yahoo", paper_data, data_files=str(f))
    np.random.seed(42)  # eval_fuzzy.py: np.random.seed(42); np.random.choice(len, 3000, replace=False)
    expected = sorted(np.random.choice(3100, 3000, replace=False).tolist())
    assert [int(it["id"]) for it in items] == expected
    topic = "the topic of the question and answer is"
    assert items[0]["premise"] == f"question: q{expected[0]}\nanswer: a{expected[0]}\n{topic}"


def test_paper_tasks_without_the_data_folder_or_with_a_bad_one_name_what_is_wrong(tmp_path, paper_data):
    with pytest.raises(registry.TaskError, match="tasks.paper_data"):
        registry.resolve_entry(REG["cr"], None, "cr")
    with pytest.raises(registry.TaskError, match=r"cr/test\.jsonl does not exist"):
        registry.resolve_entry(REG["cr"], str(tmp_path), "cr")
    bad = copy.deepcopy(REG["agn"])
    bad["classes"] = bad["classes"][:3]
    with pytest.raises(registry.TaskError, match=r"label_names_kb\.txt has 4 classes"):
        registry.resolve_entry(bad, str(paper_data), "agn")
    rows = tmp_path / "data"
    write_paper_data(rows, TEXTS[:12])
    (rows / "rte" / "val.jsonl").write_text(json.dumps({"premise": "a", "hypothesis": "b", "label": "maybe"}) + "\n")
    with pytest.raises(registry.TaskError, match=r"row 0 of .*val\.jsonl: label 'maybe' of field 'label'"):
        items_of("rte", rows)
    c = {"tasks": {"evaluate": {"d": ["cr"]}}, "datastores": {"d": {}}, "corpora": {}}
    with pytest.raises(ConfigError, match=r"tasks\.evaluate\.d\.0: .*tasks\.paper_data"):
        registry.check_config(c)


def test_whole_word_continuation_scoring_stays_an_option_for_a_paper_task(paper_data):
    e = registry.resolve_entry({**REG["cr"], "protocol": "continuation"}, str(paper_data), "cr")
    it = task_items.load_items(e)[0]
    assert it["options"][0] == [[it["question"], w] for w in e["synonyms"][0]]
    assert it["domain"][1] == [[" It was", w] for w in e["synonyms"][1]]


# ------------------------------------------------------------------------------------------- tokenizers
def _tokenizers():
    """Three kinds: GPT-2 style (no start token), the same adding a start token (Llama-3, Mistral), and a
    sentencepiece-like one whose " word" becomes [<s>, "▁", "▁word"] (Llama-2, which eval_fuzzy.py special-cases)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = ["the great day is a great day for a painter and a poet"] * 30
    gpt2 = lm.bpe_tokenizer(texts, 300)
    start = lm.bpe_tokenizer(texts, 300, start_token=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=200, special_tokens=["<s>", "</s>", "<unk>"],
                                                       show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    spm = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return gpt2, start, spm


@pytest.mark.parametrize("word", [" great", " painter", " poet", " day"])
def test_first_subword_of_a_synonym_for_each_kind_of_tokenizer(word):
    gpt2, start, spm = _tokenizers()
    # GPT-2 style, no start token: the first piece (eval_fuzzy.py's index 1 assumes a start token)
    assert scoring.subword_index(gpt2) == 0
    assert scoring.first_subword(gpt2, word) == gpt2(word)["input_ids"][0]
    # a start token (Llama-3, Mistral): eval_fuzzy.py's word_idx = 1
    assert start(word)["input_ids"][0] == start.eos_token_id and scoring.subword_index(start) == 1
    assert scoring.first_subword(start, word) == start(word)["input_ids"][1] == gpt2(word)["input_ids"][0]
    # Llama-2 style: [<s>, "▁", "▁word"]; eval_fuzzy.py's word_idx = 2 for Llama-2-7b-hf
    ids = spm(word)["input_ids"]
    assert spm.convert_ids_to_tokens(ids[:2]) == ["<s>", "▁"] and scoring.subword_index(spm) == 2
    assert scoring.first_subword(spm, word) == ids[2]
    assert spm.convert_ids_to_tokens([ids[2]])[0].startswith("▁" + word.strip()[0])


def test_a_word_whose_leading_space_is_its_own_piece_reads_that_piece_as_the_paper_does():
    """Byte-level BPE without the merge "Ġz": " zebra" is ["Ġ", "z", ...]. eval_fuzzy.py reads a fixed index (1
    after the start token), so the space piece; the index is the tokenizer's, not the word's."""
    _, start, _ = _tokenizers()
    ids = start(" zebra")["input_ids"]
    assert start.convert_ids_to_tokens(ids[:2]) == ["<|endoftext|>", "Ġ"]
    assert scoring.first_subword(start, " zebra") == ids[1]


@pytest.mark.parametrize("choice", ["great painter", "poet", "day is a great day"])
def test_a_choice_continuation_is_scored_as_eval_pmi_scores_it(choice):
    """eval_pmi.py's cross_entropy_list: the premise encoded with the start token, the hypothesis " " + choice
    encoded on its own, and its first two ids dropped for Llama-2-7b-hf (the start token and the lone "▁"), the
    first one otherwise; the kept ids are the scored ones. The pairs built for the choice tasks are those."""
    premise = "the great day is a great day for a"
    for tok, drop in zip(_tokenizers()[1:], (1, 2), strict=True):  # a start token; Llama-2 style
        target = tok(" " + choice)["input_ids"]
        paper = tok(premise)["input_ids"] + target[drop:]
        items = [{"options": [[[premise, " " + choice]]], "gold": 0}]
        seqs, starts, _ = scoring.build_pairs(items, lambda s, t=tok: t(s, add_special_tokens=False)["input_ids"],
                                              tok.bos_token_id, 64, scoring.continuation_encoder(tok))
        assert seqs[0] == paper and seqs[0][starts[0]:] == target[drop:]
    _, start, spm = _tokenizers()
    assert not scoring.lone_space_piece(start) and scoring.lone_space_piece(spm)


# ------------------------------------------------------------------------------------------- Mistral's tokenizer
def _mistral(tmp_path, name):
    """Mistral's own SentencePiece model from mistral-common's data/ folder (v1: Mistral-7B-v0.1's vocabulary;
    v3: Mistral-7B-v0.3's, the paper preset's model), loaded through transformers from the local file, with the
    special tokens and start token of the models' tokenizer_config.json."""
    import shutil

    import mistral_common
    from transformers import PreTrainedTokenizerFast

    model_file = Path(mistral_common.__file__).parent / "data" / name
    shutil.copy(model_file, tmp_path / "tokenizer.model")
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                                  add_bos_token=True, local_files_only=True)
    return tok, model_file


@pytest.mark.parametrize(("name", "vocab"), [("tokenizer.model.v1", 32000),
                                             ("mistral_instruct_tokenizer_240323.model.v3", 32768)])
def test_first_subword_and_continuations_on_mistrals_own_tokenizer(tmp_path, name, vocab):
    import sentencepiece

    tok, model_file = _mistral(tmp_path, name)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    assert len(tok) == sp.get_piece_size() == vocab
    texts = [" true", " neither", "Paris is the capital of France.", " the answer is:",
             "premise: It rained.\nhypothesis: It was wet.\nanswer: The hypothesis is"]
    for t in texts:  # the transformers tokenizer encodes as Mistral's SentencePiece model does
        assert tok(t)["input_ids"] == [sp.bos_id(), *sp.encode(t)]
    # " word" is [<s>, "▁", "▁word"], as Llama-2's: the synonym's first subword sits at index 2
    assert tok.convert_ids_to_tokens(tok(" true")["input_ids"]) == ["<s>", "▁", "▁true"]
    assert scoring.lone_space_piece(tok) and scoring.subword_index(tok) == 2
    for w in CB_WORDS:
        piece = tok.convert_ids_to_tokens([scoring.first_subword(tok, w)])[0]
        assert scoring.first_subword(tok, w) == sp.encode(w.strip())[0] and piece.startswith("▁" + w.strip()[0])
    # a choice's continuation: the pieces of the word in running text, the lone "▁" dropped (eval_pmi.py's target[2:])
    enc = scoring.continuation_encoder(tok)
    for choice in ("true", "Paris is big", "1856"):
        assert enc(" " + choice) == tok(" " + choice)["input_ids"][2:]
    assert enc(" Paris is big") == sp.encode("Paris is big")  # "▁Paris", "▁is", "▁big"
    assert enc("plain") == tok("plain", add_special_tokens=False)["input_ids"]  # no leading space: as it is


CB_WORDS = [" true", " yes", " accurate", " correct", " faithful", " false", " no", " untrue", " neither"]


# ------------------------------------------------------------------------------------------- DCPMI
def test_dcpmi_sums_log_ratios_over_synonyms_with_the_papers_epsilon():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(6), size=3)  # 3 texts over 6 synonym slots; text 2 is the domain premise
    p[0, 4] = 0.0  # a zero probability: the 1e-10 keeps it finite
    classes = [[0, 1, 1], [2, 3], [4]]  # slot 1 listed twice counts twice
    with np.errstate(divide="ignore"):
        got = rescoring.last_token_scores(np.log(p), np.array([0, 1]), np.array([2, 2]), classes)
    for i in range(2):
        for c, slots in enumerate(classes):
            want = sum(np.log(p[i, s] + 1e-10) - np.log(p[2, s] + 1e-10) for s in slots)
            assert got[i, c] == pytest.approx(want, rel=1e-12)
    with np.errstate(divide="ignore"):
        no_pmi = rescoring.last_token_scores(np.log(p), np.array([0]), np.array([-1]), classes, use_pmi=False)
    assert no_pmi[0] == pytest.approx([p[0, 0] + 2 * p[0, 1], p[0, 2] + p[0, 3], p[0, 4]])


# ------------------------------------------------------------------------------------------- end to end
def _load_label(path):
    """eval_fuzzy.py's load_label, re-written: one class a line, words split on ", ", " word", trimmed."""
    label2token = defaultdict(list)
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            label2token[i] = [f" {w}" for w in line.strip().split(", ")]
    n = min(len(v) for v in label2token.values())
    return {k: v[:n] for k, v in label2token.items()}


def _paper_examples(task, data):
    """eval_fuzzy.py's preprocess_dataset for one task: (premises, labels, label2synonym, uncond premise)."""
    rows = [json.loads(x) for x in (data / REG[task]["source"]["path"]).read_text().splitlines()]
    yes = {0: [" true", " yes", " accurate", " correct", " faithful"],
           1: [" false", " no", " incorrect", " wrong", " untrue", " unfaithful"]}
    if task == "sst2":
        rows = [r for r in rows if int(r["label"]) - 3 != 0]
        prompt = " The sentence has a tone that is"
        return ([r["text"] + prompt for r in rows], [1 if int(r["label"]) - 3 > 0 else 0 for r in rows],
                _load_label(data / "sst2/label.txt"), prompt)
    if task == "rotten_tomatoes":
        prompt = "The sentence has a tone that is"
        return ([f"{r['input']} {prompt}" for r in rows], [[" negative", " positive"].index(" " + r["output"])
                                                           for r in rows],
                _load_label(data / "rotten_tomatoes/label.txt"), prompt)
    if task == "mr":
        prompt = "The sentence has a tone that is"
        return ([f"{r['text']} {prompt}" for r in rows], [int(r["label"]) for r in rows],
                _load_label(data / "label_names_sentidict.txt"), prompt)
    if task == "cr":
        prompt = " It was"
        return ([f"{r['text']}{prompt}" for r in rows], [int(r["label"]) for r in rows],
                _load_label(data / "label_names_sentidict.txt"), prompt)
    if task == "hyp":
        prompt = " neutral or partisan? Answer:"
        return ([r["text"].strip() + prompt for r in rows], [int(r["label"]) for r in rows],
                {0: [" neutral", " fair", " objective"], 1: [" partisan", " biased", " unfair"]}, prompt)
    if task == "agn":
        prompt = "topic:"
        return ([f"title: {r['Title']}\nsummary: {r['Description']}\n{prompt}" for r in rows],
                [int(r["Class Index"]) - 1 for r in rows], _load_label(data / "agn/label_names_kb.txt"), prompt)
    if task == "rte":
        prompt = "true or false?\nanswer:"
        return ([f" {r['premise']}\nquestion: {r['hypothesis']} {prompt}" for r in rows],
                [0 if r["label"] == "entailment" else 1 for r in rows], yes, prompt)
    if task == "cb":
        return ([f"premise: {r['premise']}\nhypothesis: {r['hypothesis']}\nanswer: The hypothesis is" for r in rows],
                [["entailment", "contradiction", "neutral"].index(r["label"]) for r in rows],
                {**yes, 2: [" neither"]}, "answer: The hypothesis is")
    raise KeyError(task)


class PaperScorer:
    """eval_fuzzy.py with knnlm.py's KNNWrapper, re-written for the test: the next-token distribution after the
    premise (encode_plus, cut from the left to the window), with the kNN-LM mixed in at that last position by a
    brute-force search over every key of the datastore, then vocab2label over DCPMI."""

    def __init__(self, work, ds_name, block_size=32):
        ds = Datastore(work / "results" / "datastores" / ds_name / "manifest.json")
        model = {"micro": "micro-gpt2", "micro-bos": "micro-bos"}[ds_name]
        self.model, self.tok, ident = lm.load_checked(work / "results" / "models" / model / "model.json", "cpu")
        self.hook = ident["hook_point"]
        self.keys = np.concatenate([np.asarray(k, np.float64) for k in ds.keys])
        self.vals = np.concatenate([np.asarray(v).reshape(-1) for v in ds.vals]).astype(np.int64)
        self.block = block_size

    def last_position(self, text):
        ids = self.tok(text)["input_ids"][-self.block:]  # encode_plus: special tokens included
        with torch.inference_mode(), capture_keys(self.model, self.hook) as box:
            out = self.model(torch.tensor([ids]))
        logits = out.logits[0, -1].double().numpy()
        query = box["keys"][0, -1].float().numpy().astype(np.float16).astype(np.float64)
        return logits - np.logaddexp.reduce(logits), ((self.keys - query) ** 2).sum(axis=1)

    def probs(self, lm_logp, dists, point):
        if point is None:  # the base model: no wrapper
            return np.exp(lm_logp)
        lam, k, sigma = point
        near = np.argsort(dists, kind="stable")[:k]
        w = np.exp(-(dists[near] - dists[near].min()) / sigma)
        p_knn = np.zeros_like(lm_logp)
        np.add.at(p_knn, self.vals[near], w / w.sum())
        with np.errstate(divide="ignore"):
            knn_logp = np.nan_to_num(np.log(p_knn), neginf=-10000.0)
        mixed = np.logaddexp(lm_logp + np.log(1 - lam), knn_logp + np.log(lam))
        return np.exp(mixed - np.logaddexp.reduce(mixed))  # softmax of the interpolated log-probabilities

    def predictions(self, premises, label2synonym, uncond, points):
        syn = {c: [self.tok(w)["input_ids"][1] for w in ws] for c, ws in label2synonym.items()}  # word_idx = 1
        dom = self.last_position(uncond)
        at = [self.last_position(p) for p in premises]
        out = {}
        for point in points:
            dp = self.probs(*dom, point)
            preds = []
            for lp, d in at:
                p = self.probs(lp, d, point)
                score = [sum(np.log(p[i] + 1e-10) - np.log(dp[i] + 1e-10) for i in syn[c]) for c in sorted(syn)]
                preds.append(int(np.argmax(score)))
            out[point] = preds
        return out


@pytest.mark.slow
def test_pipeline_predictions_equal_the_papers_scoring_on_every_task_and_grid_point(paper_run, monkeypatch):
    """On the same model, datastore and task files, the base and kNN-LM predictions of every item, at every
    grid point, are the ones eval_fuzzy.py's procedure gives (re-implemented above, brute-force kNN)."""
    work, jobs = paper_run
    monkeypatch.chdir(work)  # model.json names its files relative to the run directory
    assert jobs.get("score_task") == 9 and jobs.get("train_lm") == 1  # the twin model only; micro is reused
    data = work / "paper_data"
    grid = [(lam, k, s) for lam in (0.25, 0.5) for k in (1, 8, 32) for s in (1.0, 10.0)]
    scorer = PaperScorer(work, "micro-bos")
    for task in ["sst2", "rotten_tomatoes", "mr", "cr", "hyp", "agn", "rte", "cb"]:
        premises, labels, l2s, uncond = _paper_examples(task, data)
        paper = scorer.predictions(premises, l2s, uncond, [None, *grid])
        out = work / "results" / "tasks" / "micro-bos" / task
        sweep = pl.read_csv(out / "sweep.csv")
        preds = pl.read_parquet(out / "predictions.parquet")
        classes = REG[task]["classes"]
        assert preds["base_pred"].to_list() == [str(classes[j]) for j in paper[None]], task
        base = np.mean(np.asarray(paper[None]) == labels)
        assert sweep["base"][0] == pytest.approx(base, abs=1e-12), task
        for lam, k, s in grid:
            row = sweep.filter((pl.col("lambda") == lam) & (pl.col("k") == k) & (pl.col("sigma") == s))
            acc = np.mean(np.asarray(paper[(lam, k, s)]) == labels)
            assert row["score"][0] == pytest.approx(acc, abs=1e-12), (task, lam, k, s)
        summary = json.loads((out / "summary.json").read_text())
        chosen = (summary["lambda"], summary["k"], summary["sigma"])
        assert preds["knn_pred"].to_list() == [str(classes[j]) for j in paper[chosen]], task
        record = json.loads((out / "scored.json").read_text())
        n = len(labels)
        assert record["meta"]["n_queries"] == len(set(premises)) + 1 <= n + 1  # one query per premise + domain


@pytest.mark.slow
def test_a_gpt2_style_tokenizer_scores_the_first_piece_and_agrees_with_the_start_token_twin_on_layout(
    paper_run, monkeypatch
):
    work, _ = paper_run
    monkeypatch.chdir(work)
    out = work / "results" / "tasks" / "micro" / "cr"
    record = json.loads((out / "scored.json").read_text())
    scorer = PaperScorer(work, "micro")
    e = registry.resolve_entry(REG["cr"], str(work / "paper_data"), "cr")
    ids = sorted({scorer.tok(w, add_special_tokens=False)["input_ids"][0] for ws in e["synonyms"] for w in ws})
    with np.load(out / "scored.npz") as z:
        assert z["slot_ids"].tolist() == ids
    assert record["meta"]["n_items"] == 24 + 12  # 36 rows, all kept


# ------------------------------------------------------------------------------------------ rescoring by hand
def test_last_token_grid_is_the_mixture_at_the_synonym_slots():
    rng = np.random.default_rng(2)
    Q, K, slots = 6, 5, np.array([3, 7, 9], np.int64)
    q_lm = np.log(rng.uniform(0.01, 0.3, (Q, len(slots)))).astype(np.float32)
    d = np.sort(rng.uniform(0, 3, (Q, K)), 1).astype(np.float32)
    v = rng.choice([3, 7, 9, 11], size=(Q, K)).astype(np.int32)
    v[0] = 11  # no neighbour carries a synonym: p_knn = 0 at every slot
    v[1, 2] = -1  # a missing neighbour carries no weight
    cache = {"q_lm": q_lm, "q_dists": d, "q_vals": v, "slot_ids": slots}
    got = dict(rescoring.last_token_logps_over_grid(cache, [0.0, 0.4, 1.0], [2, 5], [1.0, 0.5]))
    assert list(got) == [(lam, k, s) for s in (1.0, 0.5) for k in (2, 5) for lam in (0.0, 0.4, 1.0)]
    for (lam, k, s), lp in got.items():
        assert lp.shape == (Q, 3)
        for i in range(Q):
            for j, w in enumerate(slots):
                p = lam * p_knn_by_hand(d[i], v[i], w, k, s) + (1 - lam) * math.exp(q_lm[i, j])
                if p == 0.0:
                    assert lp[i, j] == -np.inf
                else:
                    assert lp[i, j] == pytest.approx(math.log(p), rel=1e-6)
