"""Paper 1's task evaluation: registry and loaders (offline fixtures), scoring kinds on a toy model whose
probabilities we set, metrics, the synthetic suite's invariants, and the task stages end to end on micro."""

import copy
import json
import math
import re

import numpy as np
import polars as pl
import pytest
import torch
import yaml
from conftest import ROOT, SpacedTok, job_stats, load_test_config, p_knn_by_hand, snakemake, write_paper_data

from workflow_scripts import knnlm, lm
from workflow_scripts.artifacts import ArtifactError, save_npy, write_json, write_table
from workflow_scripts.config import ConfigError, defaults, validate
from workflow_scripts.tasks import evaluate, metrics, registry, rescoring, scoring, suite
from workflow_scripts.tasks import items as task_items

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
REG = registry.registry()
PAPER = [n for n, e in REG.items() if e["source"]["type"] in ("hf", "paper")]
SHOWN = defaults("neighbours")  # the neighbours the examples show, as the schema sets them


# ------------------------------------------------------------------------------------------- registry
def test_registry_has_the_twenty_paper_tasks_in_their_categories():
    memory = {"sst2", "rotten_tomatoes", "mr", "cr", "hyp", "agn", "yahoo", "rte", "cb"}
    choice = {"openbookqa", "arc_easy", "arc_challenge", "mmlu", "hellaswag", "winogrande"}
    generate = {"nq_open", "hotpotqa", "drop", "gsm8k", "bbh"}
    assert set(PAPER) == memory | choice | generate and len(PAPER) == 20
    assert all(REG[t]["category"] == "memory" and REG[t]["kind"] == "classify" and REG[t]["pmi"] for t in memory)
    # the memory tasks read paper 1's task files (tests/test_paper_memory.py), yahoo's rows come from the hub
    assert {t for t in memory if REG[t]["source"]["type"] == "paper"} == memory - {"yahoo"}
    assert all(REG[t]["category"] == "reasoning" and REG[t]["kind"] == "choice" for t in choice)
    assert all(REG[t]["category"] == "reasoning" and REG[t]["kind"] == "generate" for t in generate)


def test_a_bad_entry_is_refused_naming_its_field():
    e = copy.deepcopy(REG["sst2"])
    e["metric"] = "em"
    with pytest.raises(registry.TaskError, match="metric"):
        registry.check_entry("x", e)
    e = copy.deepcopy(REG["sst2"])
    e["label_map"] = {"1": 5}
    with pytest.raises(registry.TaskError, match="label_map"):
        registry.check_entry("x", e)
    e = copy.deepcopy(REG["sst2"])
    e["protocol"] = "first_token"
    with pytest.raises(registry.TaskError, match="protocol"):
        registry.check_entry("x", e)
    e = copy.deepcopy(REG["arc_easy"])
    del e["gold"]["match_field"]
    with pytest.raises(registry.TaskError, match="gold"):
        registry.check_entry("x", e)


# one fixture per hub reasoning task, in that dataset's own column layout; (expected gold answer of row 0, n
# options). The memory tasks read paper 1's files: tests/test_paper_memory.py.
EXPECTED = {
    "openbookqa": ("the sun", 4), "arc_easy": ("oxygen", 4), "arc_challenge": ("mass", 3),
    "mmlu": ("4", 4), "hellaswag": ("puts the dough in the oven.", 4), "winogrande": ("the ball", 2),
    "nq_open": ("Paris | paris", None), "hotpotqa": ("yes", None), "drop": ("12 | twelve", None),
    "gsm8k": ("42", None), "bbh": ("True", None),
}


@pytest.mark.parametrize("task", sorted(EXPECTED))
def test_each_paper_task_loads_offline_from_a_fixture_in_its_column_layout(task):
    items = task_items.load_items(REG[task], data_files=str(FIXTURES / f"{task}.jsonl"))
    assert len(items) >= 2
    it = items[0]
    answer, n_options = EXPECTED[task]
    assert it["answer"] == answer
    if n_options is None:
        assert it["context"] and it["answers"]
    else:
        assert len(it["options"]) == n_options and 0 <= it["gold"] < n_options
        assert (it["domain"] is not None) == bool(REG[task].get("pmi"))
        for opt in it["options"]:
            assert all(ctx and cont for ctx, cont in opt)


def test_winogrande_scores_the_rest_of_the_sentence_after_the_filled_blank():
    it = task_items.load_items(REG["winogrande"], data_files=str(FIXTURES / "winogrande.jsonl"))[0]
    (c0, t0), (c1, t1) = it["options"][0][0], it["options"][1][0]
    assert t0 == t1 and "_" not in c0 + c1 and c0.endswith("the ball") and c1.endswith("the window")


def test_user_task_from_a_local_jsonl_file(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"q": "2 + 2 =", "a": "4"}\n{"q": "3 + 3 =", "a": "6"}\n{"q": "1 + 1 =", "a": "2"}\n')
    entry = {"category": "reasoning", "kind": "generate", "metric": "em", "source": {"type": "local", "path": str(f)},
             "prompt": "{q}", "answers": {"field": "a"}}
    registry.check_entry("mine", entry)
    items = task_items.load_items(entry, max_items=2, seed=0)
    assert len(items) == 2 and all(it["answers"][0] in "462" for it in items)
    assert items == task_items.load_items(entry, max_items=2, seed=0)  # seeded subsample


def _local_task(tmp_path, rows: list[dict], **entry) -> dict:
    f = tmp_path / "mine.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"category": "memory", "kind": "classify", "metric": "accuracy", "source": {"type": "local", "path": str(f)},
            "prompt": "{text} It was", "label_field": "label", "labels": {"pos": [" great"], "neg": [" bad"]},
            **entry}


@pytest.mark.parametrize("kind", ["classify", "choice", "generate"])
def test_a_custom_row_missing_a_field_is_refused_naming_task_row_and_field(tmp_path, kind):
    # the datasets jsonl loader gives a key missing from one row as None in that row: it was scored as "None"
    rows = [{"text": "good film", "label": "pos", "ch": ["a", "b"], "g": 0, "a": "x"},
            {"label": "neg", "ch": ["a", "b"], "g": 1, "a": "y"},
            {"text": "bad film", "label": "neg", "ch": ["a", "b"], "g": 0, "a": "z"}]
    extra = {
        "classify": {},
        "choice": {"category": "reasoning", "kind": "choice", "choices": {"field": "ch"},
                   "gold": {"field": "g", "type": "index"}},
        "generate": {"category": "reasoning", "kind": "generate", "metric": "em", "answers": {"field": "a"}},
    }[kind]
    e = _local_task(tmp_path, rows, **extra)
    e = {k: v for k, v in e.items() if kind == "classify" or k not in ("labels", "label_field")}
    registry.check_entry("mine", e)
    with pytest.raises(registry.TaskError, match=r"^task 'mine': row 1 of .*mine\.jsonl: field 'text' is missing"):
        task_items.load_items(e, name="mine")
    # a missing label, choice, gold or answer is refused the same way
    rows[1]["text"] = "ok"
    for field in ("label", "ch", "g", "a"):
        e = _local_task(tmp_path, [rows[0], {k: v for k, v in rows[1].items() if k != field}, rows[2]], **extra)
        e = {k: v for k, v in e.items() if kind == "classify" or k not in ("labels", "label_field")}
        used = {"classify": ("label",), "choice": ("ch", "g"), "generate": ("a",)}[kind]
        if field in used:
            with pytest.raises(registry.TaskError, match=rf"^task 'mine': row 1 of .*: field '{field}' is missing"):
                task_items.load_items(e, name="mine")
        else:
            assert len(task_items.load_items(e, name="mine")) == 3


def test_a_choice_row_with_fewer_than_two_choices_is_refused(tmp_path):
    rows = [{"q": "x", "ch": ["a", "b"], "g": 0}, {"q": "y", "ch": ["a"], "g": 0}]
    e = _local_task(tmp_path, rows, category="reasoning", kind="choice", prompt="{q}", choices={"field": "ch"},
                    gold={"field": "g", "type": "index"})
    del e["labels"], e["label_field"]
    registry.check_entry("mine", e)
    with pytest.raises(registry.TaskError, match=r"^task 'mine': row 1 of .*: field 'ch' has 1 choice"):
        task_items.load_items(e, name="mine")  # one choice always scored 1.0


@pytest.mark.parametrize("labels, keys", [
    ({"Pos": [" great"], "pos": [" good"], "neg": [" bad"]}, r"'Pos' and 'pos'"),
    (yaml.safe_load("{yes: [' yes'], 'true': [' true'], no: [' no']}"), r"True and 'true'"),
    ({1: [" one"], "1": [" uno"], "2": [" two"]}, r"1 and '1'"),
])
def test_label_keys_that_match_the_same_rows_are_refused(tmp_path, labels, keys):
    e = _local_task(tmp_path, [{"text": "a", "label": "pos"}], labels=labels)
    with pytest.raises(registry.TaskError, match=rf"task 'mine': field 'labels' .*{keys}"):
        registry.check_entry("mine", e)
    e = copy.deepcopy(REG["rte"])
    e["label_map"] = {"Entailment": 0, "entailment": 1}
    with pytest.raises(registry.TaskError, match=r"field 'label_map' .*'Entailment' and 'entailment'"):
        registry.check_entry("rte", e)


def test_yaml_booleans_as_label_keys_are_refused_with_a_hint_to_quote_them(tmp_path):
    e = _local_task(tmp_path, [{"text": "a", "label": "yes"}], labels=yaml.safe_load("{yes: [' yes'], no: [' no']}"))
    with pytest.raises(registry.TaskError, match=r"field 'labels' .*True.*quote"):
        registry.check_entry("mine", e)
    e["labels"] = {"yes": [" yes"], "no": [" no"]}
    registry.check_entry("mine", e)
    assert task_items.load_items(e)[0]["answer"] == "yes"


def check(c: dict) -> dict:
    """The config as the workflow checks it (rules/common.smk): the schema, then the tasks against the registry."""
    validate(c)
    registry.check_config(c)
    return c


def test_config_names_a_missing_task_and_a_bad_custom_entry():
    c = yaml.safe_load((ROOT / "config.yaml").read_text())
    c["tasks"] = {"evaluate": {"synthwiki": ["synth_recall", "nope"]}, "synthetic": {"corpus": "synthwiki"}}
    with pytest.raises(ConfigError, match=r"tasks\.evaluate\.synthwiki\.1"):
        check(copy.deepcopy(c))
    c["tasks"]["evaluate"]["synthwiki"] = ["mine"]
    c["tasks"]["custom"] = {"mine": {"category": "memory", "kind": "generate", "metric": "accuracy"}}
    with pytest.raises(ConfigError, match=r"tasks\.custom\.mine"):
        check(copy.deepcopy(c))
    c["tasks"] = {"evaluate": {"synthwiki": ["synth_recall"]}}
    with pytest.raises(ConfigError, match=r"tasks\.synthetic"):
        check(copy.deepcopy(c))
    c["tasks"] = {"evaluate": {"nope": ["synth_recall"]}, "synthetic": {"corpus": "synthwiki"}}
    with pytest.raises(ConfigError, match=r"tasks\.evaluate\.nope: not one of the datastores"):
        check(copy.deepcopy(c))


# ------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("pred, golds, em, f1", [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),
    ("  Paris,  France ", ["paris france"], 1.0, 1.0),
    ("a cat sat", ["the dog sat"], 0.0, 0.5),
    ("Barack Obama", ["Obama", "Barack Hussein Obama"], 0.0, 0.8),
    ("", ["x"], 0.0, 0.0),
    ("An apple", ["apple", "pear"], 1.0, 1.0),
])
def test_em_and_f1_with_squad_normalisation(pred, golds, em, f1):
    assert metrics.normalize_answer("The  Cat, a DOG.") == "cat dog"
    assert metrics.exact_match(pred, golds) == em
    assert metrics.token_f1(pred, golds) == pytest.approx(f1)


def test_gsm8k_answer_extraction_on_real_format_answers():
    sol = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether "
           "in April and May.\n#### 72")
    assert task_items.gsm8k_gold(sol) == "72"
    assert task_items.gsm8k_gold("... so she pays 1,200 dollars.\n#### 1,200") == "1200"
    with pytest.raises(registry.TaskError):
        task_items.gsm8k_gold("no marker 5")
    assert metrics.final_number("She has 3 apples, then 5 more, so 8 apples.") == "8"
    assert metrics.final_number("#### 42\nQuestion: 7") == "42"
    assert metrics.number_match("so the answer is 1,200.", ["1200"]) == 1.0
    assert metrics.number_match("The answer is 41", ["42"]) == 0.0
    assert metrics.number_match("no number", ["42"]) == 0.0


# ------------------------------------------------------------------------------------------- toy model
class _Block(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.mlp = torch.nn.Identity()
        self.emb = torch.nn.Embedding(vocab, vocab)
        self.emb.weight.data = torch.eye(vocab)


class _Out:
    def __init__(self, logits):
        self.logits = logits


class ToyLM(torch.nn.Module):
    """A bigram LM: p(next | ..., x) = table[x]; the hooked 'mlp' input (the key) is one_hot(x)."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(np.log(table), dtype=torch.float32)
        self.h = torch.nn.ModuleList([_Block(len(table))])

    def forward(self, input_ids, attention_mask=None):
        keys = self.h[0].emb(input_ids)
        self.h[0].mlp(keys)
        return _Out(self.table[input_ids])


V = 5  # tokens: 0 bos, 1 "a", 2 "b", 3 "c", 4 "d"
WORDS = {"a": 1, "b": 2, "c": 3, "d": 4}
TABLE = np.array([
    [0.1, 0.1, 0.2, 0.4, 0.2],    # after bos
    [0.1, 0.1, 0.5, 0.2, 0.1],    # after a
    [0.2, 0.2, 0.2, 0.2, 0.2],    # after b
    [0.1, 0.6, 0.1, 0.1, 0.1],    # after c
    [0.25, 0.25, 0.25, 0.15, 0.1],  # after d
])


def encode(s):
    return [WORDS[w] for w in s.split()]


def toy_search(stored_keys, stored_vals, dist_offsets):
    """Exact neighbours over a tiny datastore, as retrieval.search + gather_vals return them."""
    def fn(q):
        d = ((q[:, None, :] - stored_keys[None]) ** 2).sum(-1) + dist_offsets[None]
        order = np.argsort(d, axis=1, kind="stable")
        return np.take_along_axis(d, order, 1).astype(np.float32), stored_vals[order].astype(np.int32), order
    return fn


# a datastore of 3 keys: two after "a" whose value is "d", one after "b" whose value is "c"
DS_KEYS = np.eye(V, dtype=np.float32)[[1, 1, 2]]
DS_VALS = np.array([4, 4, 3])
SEARCH = toy_search(DS_KEYS, DS_VALS, np.array([0.0, 1.0, 0.0]))


def _cache(items):
    seqs, starts, struct = scoring.build_pairs(items, encode, 0, 16)
    cache = scoring.score_cache(ToyLM(TABLE), "h.0.mlp", seqs, starts, SEARCH, batch=2)
    cache["pair_len"] = np.asarray([len(s) - st for s, st in zip(seqs, starts, strict=True)])
    return cache, struct


def _pair_lp(cache, lam, k, sigma):
    d, v = cache["q_dists"][cache["t_row"]], cache["q_vals"][cache["t_row"]]
    knn = knnlm.knn_target_logprobs(d, v, cache["t_target"], [k], sigma)[k]
    return rescoring.pair_logprobs(knnlm.interpolate(cache["t_lm"], knn, lam), cache["t_pair"], len(cache["pair_len"]))


def test_choice_sum_and_length_normalised_by_hand():
    # context "a": option 0 = "b b" (p = .5 * .2 = .10, mean log = log .1 / 2), option 1 = "c" (p = .2)
    items = [{"options": [[["a", "b b"]], [["a", "c"]]], "domain": None, "gold": 0}]
    cache, struct = _cache(items)
    lp = rescoring.pair_logprobs(cache["t_lm"], cache["t_pair"], 2)
    np.testing.assert_allclose(lp, [math.log(0.5 * 0.2), math.log(0.2)], rtol=1e-6)
    assert rescoring.score_choice(struct, lp, cache["pair_len"])[0] == 1  # sum: .2 > .1
    assert rescoring.score_choice(struct, lp, cache["pair_len"], normalize=True)[0] == 0  # mean: log .1/2 > log .2
    # the first token of both options is predicted from the same prefix: one query, not two
    assert len(cache["q_dists"]) == 2 and sorted(cache["t_pair"].tolist()) == [0, 0, 1]


def test_classify_with_fuzzy_sets_and_domain_pmi_by_hand():
    # item 1, context "a": label 0 = {"b", "d"} (.5 + .1 = .6), label 1 = {"c"} (.2); under the domain premise
    # "c": label 0 = .1 + .1 = .2, label 1 = .1 -> PMI log 3 vs log 2: label 0 either way.
    items = [
        {"options": [[["a", "b"], ["a", "d"]], [["a", "c"]]], "domain": [[["c", "b"], ["c", "d"]], [["c", "c"]]],
         "gold": 0},
        {"options": [[["d", "a"], ["d", "d"]], [["d", "c"]]], "domain": [[["c", "a"], ["c", "d"]], [["c", "c"]]],
         "gold": 1},
    ]
    cache, struct = _cache(items)
    lp = rescoring.pair_logprobs(cache["t_lm"], cache["t_pair"], len(cache["pair_len"]))
    s0 = rescoring.option_scores(struct[0]["options"], lp, cache["pair_len"])
    np.testing.assert_allclose(np.exp(s0), [0.6, 0.2], rtol=1e-6)
    # item 2 without PMI: .25 + .1 = .35 vs .15 -> 0; with PMI under "c": (.6 + .1 = .7) vs .1 -> log(.5) < log(1.5)
    assert rescoring.score_classify(struct, lp, cache["pair_len"], pmi=False).tolist() == [0, 0]
    assert rescoring.score_classify(struct, lp, cache["pair_len"], pmi=True).tolist() == [0, 1]


def test_knn_mixture_is_applied_at_every_scored_token_by_hand():
    # context "a", option "d": p_lm = .1; neighbours of key one_hot(a): rows 0, 1 (value d, d = 0, 1), row 2 (c, d = 2)
    items = [{"options": [[["a", "d"]], [["a", "c"]]], "domain": None, "gold": 0}]
    cache, struct = _cache(items)
    lam, sigma = 0.5, 1.0
    w = np.exp(-np.array([0.0, 1.0, 2.0]) / sigma)
    p_knn_d, p_knn_c = (w[0] + w[1]) / w.sum(), w[2] / w.sum()
    lp = _pair_lp(cache, lam, 3, sigma)
    np.testing.assert_allclose(np.exp(lp), [lam * p_knn_d + (1 - lam) * 0.1, lam * p_knn_c + (1 - lam) * 0.2],
                               rtol=1e-6)
    assert rescoring.score_choice(struct, lp, cache["pair_len"])[0] == 0  # the kNN-LM picks "d"
    base = rescoring.pair_logprobs(cache["t_lm"], cache["t_pair"], 2)
    assert rescoring.score_choice(struct, base, cache["pair_len"])[0] == 1  # the base LM picks "c"


def test_lambda_zero_gives_the_base_lm_scores_everywhere():
    items = [{"options": [[["a", "d b"], ["a", "c"]], [["a", "b"]]], "domain": [[["c", "d b"], ["c", "c"]],
                                                                               [["c", "b"]]], "gold": 1},
             {"options": [[["b", "a"]], [["b", "c d"]]], "domain": None, "gold": 0}]
    cache, struct = _cache(items)
    base = rescoring.pair_logprobs(cache["t_lm"], cache["t_pair"], len(cache["pair_len"]))
    for (lam, _k, _sigma), tlp in rescoring.token_logprobs_over_grid(cache, [0.0, 0.5], [1, 3], [1.0, 5.0]):
        lp = rescoring.pair_logprobs(tlp, cache["t_pair"], len(cache["pair_len"]))
        if lam == 0.0:  # bit for bit the base LM's pair log-probabilities, so every prediction is the base LM's
            np.testing.assert_array_equal(lp, base)
        else:
            assert not np.allclose(lp, base)


DS_OFFSETS = np.array([0.0, 1.0, 0.0])  # SEARCH's distance offsets


def _greedy_by_hand(prompt, point, n):
    """Greedy decoding written out: p_lm = TABLE[last token]; with (λ, k, σ), the k nearest of the 3 stored keys to
    one_hot(last) (squared L2 + offsets), weights exp(−d/σ), mixed λ·p_knn + (1−λ)·p_lm; the first argmax."""
    seq, out = list(prompt), []
    for _ in range(n):
        p = TABLE[seq[-1]].copy()
        if point is not None:
            lam, k, sigma = point
            d = ((DS_KEYS - np.eye(V)[seq[-1]]) ** 2).sum(1) + DS_OFFSETS
            near = np.argsort(d, kind="stable")[:k]
            w = np.exp(-(d[near] - d[near].min()) / sigma)
            p_knn = np.zeros(V)
            np.add.at(p_knn, DS_VALS[near], w / w.sum())
            p = lam * p_knn + (1 - lam) * p
        seq.append(int(np.argmax(p)))
        out.append(seq[-1])
    return out


def test_greedy_generate_with_the_mixture_at_every_step_by_hand():
    model = ToyLM(TABLE)
    prompts = [[0, 1], [0, 3], [0, 2, 4]]  # bos a / bos c / bos b d
    points = [None, (0.9, 3, 1.0), (0.5, 2, 1.0), (0.3, 1, 10.0), (0.0, 3, 1.0)]
    res = scoring.greedy_generate(model, "h.0.mlp", prompts, points, SEARCH, V, max_new_tokens=4,
                                  is_done=lambda ids: False, batch=2)
    out = res["outputs"]
    for point in points:
        assert out[point] == [_greedy_by_hand(p, point, 4) for p in prompts], point
    assert out[(0.0, 3, 1.0)] == out[None]  # λ = 0 decodes exactly the base LM
    assert out[(0.9, 3, 1.0)][0] != out[None][0]  # and the datastore changes the answer here
    assert out[(0.9, 3, 1.0)][0][0] == 4  # after "a": p(d) = .9 (1 + e^-1)/(1 + e^-1 + e^-2) + .1 · .1 > p(b)
    assert res["neighbours"][(0.9, 3, 1.0)][0][:3] == [0, 1, 2]
    # a stop condition ends each answer at its own length
    stop = scoring.greedy_generate(model, "h.0.mlp", prompts, [None], SEARCH, V, max_new_tokens=4,
                                   is_done=lambda ids: ids[-1] == 0, batch=2)["outputs"][None]
    for got, full in zip(stop, out[None], strict=True):
        assert got == (full[: full.index(0) + 1] if 0 in full else full)


# a small random GPT-2 whose greedy answers differ by prompt: the cached decoder against the decoder before it
GEN_V, GEN_DEEP, GEN_EMB = 50, "transformer.h.1.mlp", "transformer.h.0.ln_1"
GEN_PROMPTS = [np.random.default_rng(s).integers(0, GEN_V, n).tolist()
               for s, n in enumerate([45, 3, 17, 60, 41, 8, 29])]


@pytest.fixture
def one_thread():
    """Torch on one thread: many small forward passes run many times slower on 2 threads of a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _gen_model():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=GEN_V, n_positions=128, n_embd=32, n_layer=2, n_head=4, initializer_range=0.2,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg).eval()


def _gen_datastore(model, hook):
    """300 keys of the hook point over random text, each with its next token as value: a brute-force search."""
    x = torch.as_tensor(np.random.default_rng(9).integers(0, GEN_V, (6, 51)))
    with torch.inference_mode(), scoring.capture_keys(model, hook) as box:
        model(input_ids=x[:, :-1])
    keys = box["keys"].reshape(-1, 32).numpy().astype(np.float16).astype(np.float32)
    return toy_search(keys, x[:, 1:].reshape(-1).numpy(), np.zeros(len(keys), np.float32))


def _gen_uncached(model, hook, prompts, points, search_fn, max_new, is_done, batch):
    """The decoder before the key/value cache, written out: every step forwards each unfinished prompt's whole
    prefix (right-padded batches of the unfinished prompts, in order), searches the last position's key (prefixes
    searched at an earlier point reuse their neighbours), mixes in the kNN distribution and takes the argmax.
    Returns (outputs, each step's log p) per point."""
    outputs, logps, searched = {}, {}, {}
    with torch.inference_mode(), scoring.capture_keys(model, hook) as box:
        for point in points:
            gen, lps = [[] for _ in prompts], [[] for _ in prompts]
            active = list(range(len(prompts)))
            for _ in range(max_new):
                still = []
                for a in range(0, len(active), batch):
                    chunk = active[a : a + batch]
                    seqs = [prompts[i] + gen[i] for i in chunk]
                    x = torch.zeros((len(seqs), max(map(len, seqs))), dtype=torch.long)
                    mask = torch.zeros_like(x)
                    for b, s in enumerate(seqs):
                        x[b, : len(s)], mask[b, : len(s)] = torch.as_tensor(s), 1
                    out = model(input_ids=x, attention_mask=mask)
                    last, rows = torch.as_tensor([len(s) - 1 for s in seqs]), torch.arange(len(seqs))
                    logp = torch.log_softmax(out.logits[rows, last].float(), -1).numpy().astype(np.float64)
                    if point is not None:
                        lam, k, sigma = point
                        q = box["keys"][rows, last].float().numpy().astype(np.float16).astype(np.float32)
                        keys = [str(s) for s in seqs]
                        for b, key in enumerate(keys):
                            if key not in searched:
                                searched[key] = [r[0] for r in search_fn(q[b : b + 1])]
                        d = np.stack([searched[key][0] for key in keys])
                        v = np.stack([searched[key][1] for key in keys])
                        with np.errstate(divide="ignore"):
                            logp = knnlm.interpolate(logp, np.log(knnlm.knn_distribution(d, v, k, sigma, GEN_V)), lam)
                    for b, i in enumerate(chunk):
                        lps[i].append(logp[b])
                        gen[i].append(int(np.argmax(logp[b])))
                        if not is_done(gen[i]):
                            still.append(i)
                active = still
            outputs[point], logps[point] = gen, lps
    return outputs, logps


def _last_key(model, hook, prompt):
    with torch.inference_mode(), scoring.capture_keys(model, hook) as box:
        model(input_ids=torch.as_tensor([prompt]))
    return box["keys"][0, -1].numpy().astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("hook", [GEN_EMB, GEN_DEEP])
@pytest.mark.parametrize(("batch", "stop"), [(1, False), (3, True), (7, True)])
def test_cached_greedy_generate_equals_the_full_prefix_decoder(hook, batch, stop, one_thread):
    """With the model's key/value cache (left-padded prompts prefilled once, then one token a step), greedy
    decoding gives the full-prefix decoder's tokens and each step's log-probabilities to 1e-5, for the base LM and
    the kNN-LM; prompts of 3 to 60 tokens in batches that split them, with a stop rule that ends them unevenly.

    At the embeddings' hook point the queries are the same bits in both decoders, so the kNN-LM's log p agree to
    1e-5 too. At a deep hook point a query differs by float32 noise, which now and then moves its float16 rounding
    (the datastore's precision) by one unit (1e-3) and the distances with it: a few steps' kNN-LM log p then differ
    by up to 1e-3, as the full-prefix decoder's own do between two batch sizes."""
    model, points = _gen_model(), [None, (0.5, 8, 5.0), (0.9, 32, 1.0)]
    search = _gen_datastore(model, hook)

    def done(ids):
        return stop and ids.count(ids[-1]) >= 3  # a token seen 3 times ends the answer

    want, want_lp = _gen_uncached(model, hook, GEN_PROMPTS, points, search, 24, done, batch)
    got_lp = {pt: [[] for _ in GEN_PROMPTS] for pt in points}
    res = scoring.greedy_generate(model, hook, GEN_PROMPTS, points, search, GEN_V, 24, done, batch,
                                  on_step=lambda pt, i, lp: got_lp[pt][i].append(lp))
    for pt in points:
        assert res["outputs"][pt] == want[pt], pt
        assert [len(g) for g in got_lp[pt]] == [len(o) for o in want[pt]]
        pairs = zip(got_lp[pt], want_lp[pt], strict=True)
        diff = np.concatenate([np.abs(np.stack(g) - np.stack(r)).max(1) for g, r in pairs])
        if pt is None or hook == GEN_EMB:
            assert diff.max() < 1e-5, pt
        else:
            assert np.mean(diff < 1e-5) > 0.9 and diff.max() < 2e-3, pt
    lengths = {len(o) for o in want[None]}
    assert lengths == {24} if not stop else len(lengths) > 1  # the stop rule ends answers at different steps
    assert stop or len({tuple(o) for o in want[None]}) == len(GEN_PROMPTS)  # the answers differ by prompt
    assert want[(0.9, 32, 1.0)] != want[None]  # and the datastore changes them
    assert res["neighbours"][None] == [None] * len(GEN_PROMPTS)
    first = search(np.stack([_last_key(model, hook, p) for p in GEN_PROMPTS]))[2][:, : scoring.N_NEIGHBOURS_KEPT]
    assert res["neighbours"][(0.5, 8, 5.0)] == first.tolist()


def test_cached_greedy_generate_prefills_once_then_forwards_one_token_a_step(one_thread):
    """The cache is used: one forward of the left-padded prompts per batch and point, then inputs of one token per
    unfinished prompt; a model without a cache argument (the toy LM) forwards whole prefixes instead."""
    model, shapes = _gen_model(), []

    def seen(_module, _args, kw):
        shapes.append(tuple(kw["input_ids"].shape))

    handle = model.register_forward_pre_hook(seen, with_kwargs=True)
    try:
        scoring.greedy_generate(model, GEN_DEEP, GEN_PROMPTS[:3], [None], SEARCH, GEN_V, 5, lambda ids: False, 2)
    finally:
        handle.remove()
    # batches (shortest first): the prompts of 3 and 17 tokens, then the one of 45
    assert shapes == [(2, 17)] + [(2, 1)] * 4 + [(1, 45)] + [(1, 1)] * 4
    assert scoring._cache_argument(model) in ("cache", "past_key_values")
    assert scoring._cache_argument(ToyLM(TABLE)) is None


# ------------------------------------------------------------------------------------------- synthetic suite
@pytest.fixture(scope="module")
def world_and_docs():
    from workflow_scripts import world

    w = world.make_world(5, 1500, 60, 80, 12)
    docs = world.generate_documents(5, 5000, w)
    return w.to_dict(), docs


@pytest.mark.parametrize("gen", ["recall", "occupation", "twohop", "arithmetic"])
def test_synthetic_suite_has_200_seeded_items(world_and_docs, gen):
    w, docs = world_and_docs
    rows = suite.build(w, docs, gen, 200, seed=1)
    assert len(rows) == 200 and len({r["prompt"] for r in rows}) == 200
    assert rows == suite.build(w, docs, gen, 200, seed=1)
    assert rows != suite.build(w, docs, gen, 200, seed=2)


def test_memory_items_are_answerable_from_one_training_sentence(world_and_docs):
    w, docs = world_and_docs
    sents = set(suite.sentences(docs))
    for r in suite.build(w, docs, "recall", 200, seed=1):
        name, answer = r["prompt"].split(" ( born ")[0], r["choices"][r["gold"]]
        assert any(name in s and answer in s and "born" in s for s in r["evidence"])
        assert all(s in sents for s in r["evidence"])
        assert w["people"][[p["name"] for p in w["people"]].index(name)]["birth_city"] == answer
    for r in suite.build(w, docs, "occupation", 200, seed=1):
        name = r["prompt"][: -len(" is a")]
        assert any(name in s and r["label"] in s for s in r["evidence"]) and all(s in sents for s in r["evidence"])


def test_two_hop_items_are_never_stated_in_a_single_sentence(world_and_docs):
    w, docs = world_and_docs
    sents = suite.sentences(docs)
    people = {p["name"]: p for p in w["people"]}
    companies = {c["name"]: c for c in w["companies"]}
    rows = suite.build(w, docs, "twohop", 200, seed=1)
    assert len(rows) == 200
    for r in rows:
        name = r["prompt"][: -len(" works for a company based in")]
        answer = r["choices"][r["gold"]]
        assert companies[people[name]["employer"]]["city"] == answer
        # checked against every training sentence, not only the ones the generator looked at
        assert not any(name in s and answer in s for s in sents)
        hop1, hop2 = r["evidence"]
        assert name in hop1 and people[name]["employer"] in hop1 and hop1 in sents
        assert people[name]["employer"] in hop2 and answer in hop2 and hop2 in sents


def test_arithmetic_items_add_the_offset_to_a_stated_year(world_and_docs):
    w, docs = world_and_docs
    for r in suite.build(w, docs, "arithmetic", 200, seed=1):
        born, n = int(r["prompt"].split(" was born in ")[1][:4]), int(r["prompt"].split(" . ")[1].split()[0])
        assert int(r["choices"][r["gold"]]) == born + n and len(set(r["choices"])) == 4
        assert str(born) in r["evidence"][0]


def test_write_suite_writes_each_task_to_its_path_and_the_step_checks_the_names(world_and_docs, tmp_path):
    w, docs = world_and_docs
    pl.DataFrame({"text": docs}).write_parquet(tmp_path / "train.parquet")
    (tmp_path / "world.json").write_text(json.dumps(w))
    outs = {"mine_recall": tmp_path / "a/mine_recall.jsonl", "mine_job": tmp_path / "b/mine_job.jsonl"}
    counts = suite.write_suite(tmp_path / "train.parquet", tmp_path / "world.json",
                               {"mine_recall": "recall", "mine_job": "occupation"}, 30, 1, outs)
    assert counts == {"mine_recall": 30, "mine_job": 30}
    for task, gen in (("mine_recall", "recall"), ("mine_job", "occupation")):
        rows = [json.loads(line) for line in outs[task].read_text().splitlines()]
        assert rows == suite.build(w, docs, gen, 30, seed=1)
    # the step names each task by its output file, and refuses outputs that are not the generators' tasks
    params = {"generators": {"mine_recall": "recall"}, "n_items": 5, "seed": 1}
    with pytest.raises(ValueError, match="--out names"):
        suite.task_suite(params, tmp_path / "train.parquet", tmp_path / "world.json", [tmp_path / "c/other.jsonl"])
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------- report pieces
def test_bootstrap_interval_covers_the_mean_and_is_seeded():
    base = np.r_[np.zeros(50), np.ones(50)]
    knn = np.r_[np.ones(80), np.zeros(20)]
    m, lo, hi = evaluate.bootstrap_delta(base, knn, seed=3)
    assert m == pytest.approx(0.3) and lo < m < hi
    assert (m, lo, hi) == evaluate.bootstrap_delta(base, knn, seed=3)
    assert evaluate.bootstrap_delta(base, base) == (0.0, 0.0, 0.0)


# ------------------------------------------------------------------------------------------- end to end
def test_default_tasks_are_the_synthetic_suite_on_generated_datastores():
    c = yaml.safe_load((ROOT / "config.yaml").read_text())
    d = registry.default_tasks_config(check(c))
    assert d["evaluate"] == {"synthwiki": registry.synthetic_tasks()} and d["synthetic"]["corpus"] == "synthwiki"
    assert set(d) == {"evaluate", "synthetic"} and set(d["synthetic"]) == {"corpus"}  # the schema has the rest
    c["tasks"] = d
    check(c)  # a valid tasks section, completed from the schema's defaults
    assert {"batch_size", "chunks", "max_items", "generate"} <= set(c["tasks"]) and "n_items" in c["tasks"]["synthetic"]


@pytest.mark.slow
def test_task_stages_run_one_job_per_datastore_and_task(task_run, micro_run):
    work, jobs = task_run
    n = len(registry.synthetic_tasks())
    assert jobs["score_task"] == jobs["task_sweep"] == jobs["load_task"] == n
    assert jobs["task_suite"] == 1 and jobs["task_summary"] == 1 and jobs["task_delta"] == jobs["figure_tasks"] == 1
    # the backbone is reused: no model trained, no key extracted, and micro's retrieval caches and sweeps are the
    # micro run's files (copied with their times), not rewritten (the run's retrieve and sweep jobs are the scaling
    # study's datastore micro_tenth's)
    assert not {"train_lm", "extract_keys"} & set(jobs)
    for e in ("valid", "test"):
        for rel in (f"results/retrieval/{e}/micro/dists.npy", f"results/sweeps/{e}/micro/perplexity.parquet"):
            got, want = (work / rel).stat(), (micro_run / rel).stat()
            assert got.st_mtime_ns == want.st_mtime_ns and (work / rel).read_bytes() == (micro_run / rel).read_bytes()


@pytest.mark.slow
def test_task_table_and_lambda_zero_equals_base(task_run):
    work, _ = task_run
    s = pl.read_csv(work / "results/tables/task_summary.csv")
    assert sorted(s["task"]) == sorted(registry.synthetic_tasks())
    assert set(s["category"]) == {"memory", "reasoning"} and (s["n"] > 10).all()
    assert ((s["delta"] - (s["knn"] - s["base"])).abs() < 1e-12).all()
    assert (s["best"] >= s["knn"] - 1e-12).all() and (s["chosen_on"] == "perplexity on valid").all()
    ppl = pl.read_csv(work / "results/tables/perplexity_summary.csv").filter(pl.col("datastore") == "micro").row(
        0, named=True)
    assert (s["lambda"] == ppl["lambda"]).all() and (s["k"] == ppl["k"]).all()
    for t in registry.synthetic_tasks():
        sw = pl.read_parquet(work / f"results/tasks/micro/{t}/sweep.parquet")
        assert sw.height == 3 * 3 * 2  # the micro grid
        at0 = sw.filter(pl.col("lambda") == 0.0)
        assert (at0["score"] == at0["base"]).all()
        preds = pl.read_parquet(work / f"results/tasks/micro/{t}/predictions.parquet")
        row = s.filter(pl.col("task") == t).row(0, named=True)
        assert preds["base_score"].mean() == pytest.approx(row["base"])
        assert preds["knn_score"].mean() == pytest.approx(row["knn"])


@pytest.mark.slow
def test_task_figure_and_qualitative_table(task_run):
    work, _ = task_run
    assert (work / "results/figures/task_delta/micro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the figure's rows: Δ per task with its bootstrap interval, the summary's Δ at the chosen point
    delta = pl.read_csv(work / "results/tables/task_delta/micro.csv")
    summary = pl.read_csv(work / "results/tables/task_summary.csv")
    assert sorted(delta["task"]) == sorted(registry.synthetic_tasks())
    assert ((delta["lo"] <= delta["delta"] + 1e-12) & (delta["delta"] <= delta["hi"] + 1e-12)).all()
    for r in delta.iter_rows(named=True):
        assert r["delta"] == pytest.approx(summary.filter(pl.col("task") == r["task"])["delta"][0])
    ex = pl.read_csv(work / "results/tables/task_examples/micro.csv")
    assert ex.columns == list(evaluate.EXAMPLE_COLUMNS)
    preds = pl.concat([pl.read_parquet(work / f"results/tasks/micro/{t}/predictions.parquet")
                       for t in ("synth_twohop", "synth_arithmetic")])
    wins = preds.filter(pl.col("knn_score") > pl.col("base_score"))
    expected = sum(min(wins.filter(pl.col("task") == t).height, 5) for t in ("synth_twohop", "synth_arithmetic"))
    assert ex.select(["task", "id"]).unique().height == expected
    assert ex.height == expected * 4 and sorted(set(ex["rank"])) == ([1, 2, 3, 4] if expected else [])
    tokens = np.load(work / "results/tokens/micro-gpt2/micro/train.npy")
    assert ((ex["row"] >= 0) & (ex["row"] < tokens.size - 1)).all()
    assert set(ex["id"]) <= set(wins["id"])
    dry = snakemake(work, "-n", "--configfile", str(work / "config.yaml"))
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.slow  # several Snakemake DAG builds: over 5 s
def test_paper1_preset_builds_its_whole_dag_offline(tmp_path):
    cfg = yaml.safe_load((ROOT / "experiments/paper1.yaml").read_text())
    write_paper_data(tmp_path / cfg["tasks"]["paper_data"], ["one two three four five ."] * 12)
    proc = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "experiments/paper1.yaml"))
    jobs = job_stats(proc.stdout)
    n_shards = sum(d["shards"] for d in cfg["datastores"].values())
    runs = sum(len(v) for v in cfg["tasks"]["evaluate"].values())
    assert jobs["model_identity"] == 3 and jobs["extract_keys"] == n_shards
    assert jobs["score_task"] == jobs["task_sweep"] == runs == 6 * 20
    assert jobs["load_task"] == 20 and jobs["task_delta"] == jobs["figure_tasks"] == 6
    assert "train_lm" not in jobs and "task_suite" not in jobs
    # the index at paper scale: trained once per datastore, one add_shard job per shard, merged on disk; retrieval
    # in retrieval.chunks jobs per (eval set, datastore), joined by one retrieve job each
    assert jobs["add_shard"] == n_shards and jobs["train_index"] == jobs["merge_index"] == 6
    assert jobs["retrieve_chunk"] == cfg["retrieval"]["chunks"] * jobs["retrieve"] == 8 * len(cfg["eval_sets"]) * 6
    # task scoring in tasks.chunks jobs per (datastore, task), joined by one score_task job each
    assert jobs["score_task_chunk"] == cfg["tasks"]["chunks"] * jobs["score_task"] == 8 * runs


@pytest.mark.slow
def test_scored_cache_is_consistent_with_the_datastore(task_run):
    work, _ = task_run
    d = work / "results/tasks/micro/synth_recall"
    z = np.load(d / "scored.npz")
    meta = json.loads((d / "scored.json").read_text())["meta"]
    assert z["q_dists"].shape[1] == 32 and (np.diff(z["q_dists"], axis=1) >= 0).all()
    assert meta["n_queries"] == len(z["q_dists"]) <= meta["n_tokens"] == z["t_pair"].size
    vals = np.load(work / "results/tokens/micro-gpt2/micro/train.npy")[1:]
    np.testing.assert_array_equal(z["q_vals"][:, : z["q_ids"].shape[1]], vals[z["q_ids"]])


# ------------------------------------------------------------------------------------------ task tables by hand
def _summary(task, datastore_, category, base, knn):
    return {"model": "m", "datastore": datastore_, "task": task, "category": category, "kind": "choice",
            "metric": "accuracy", "n": 10, "base": base, "knn": knn, "lambda": 0.25, "k": 8, "sigma": 1.0,
            "chosen_on": "perplexity on valid", "best": knn, "best_lambda": 0.25, "best_k": 8, "best_sigma": 1.0,
            "extra": 1}


def test_summarize_tasks_adds_the_delta_and_sorts_by_datastore_category_task(tmp_path):
    rows = [_summary("b", "ds2", "memory", 0.5, 0.75), _summary("z", "ds1", "reasoning", 0.25, 0.125),
            _summary("a", "ds1", "reasoning", 0.5, 0.5), _summary("c", "ds1", "memory", 0.0, 1.0)]
    files = []
    for i, r in enumerate(rows):
        files.append(tmp_path / f"{i}.json")
        write_json(files[-1], r)
    df = evaluate.summarize_tasks(files, tmp_path / "t.csv", tmp_path / "t.parquet")
    assert df.columns == evaluate.SUMMARY_COLUMNS and "extra" not in df.columns
    assert df.columns.index("delta") == df.columns.index("knn") + 1
    assert list(zip(df["datastore"], df["category"], df["task"], strict=True)) == [
        ("ds1", "memory", "c"), ("ds1", "reasoning", "a"), ("ds1", "reasoning", "z"), ("ds2", "memory", "b")]
    assert df["delta"].to_list() == [1.0, 0.0, -0.125, 0.25]
    assert pl.read_parquet(tmp_path / "t.parquet").equals(df)
    assert pl.read_csv(tmp_path / "t.csv")["delta"].to_list() == [1.0, 0.0, -0.125, 0.25]


def _bootstrap_by_hand(diff, seed, n_boot=1000):
    """The paired percentile bootstrap, written out: resample items with replacement, mean, 2.5/97.5 quantiles."""
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, diff.size, size=diff.size)].mean() for _ in range(n_boot)])
    return np.quantile(means, [0.025, 0.975])


def test_delta_table_per_task_mean_and_seeded_bootstrap_interval(tmp_path):
    rng = np.random.default_rng(1)
    data = {("t1", "memory"): 30, ("t0", "reasoning"): 20, ("t2", "memory"): 25}
    frames = {}
    for (task, cat), n in data.items():
        frames[task] = pl.DataFrame({"task": [task] * n, "category": [cat] * n,
                                     "base_score": rng.integers(0, 2, n).astype(float),
                                     "knn_score": rng.integers(0, 2, n).astype(float)})
    # two files, one task split across them (concatenated before grouping)
    f1, f2 = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pl.concat([frames["t2"], frames["t0"][:5]]).write_parquet(f1)  # t2 first: the table sorts by task too
    pl.concat([frames["t0"][5:], frames["t1"]]).write_parquet(f2)
    for seed in (0, 7):
        df = evaluate.delta_table([f1, f2], seed=seed)
        assert df.columns == ["category", "task", "delta", "lo", "hi", "n"]
        assert list(zip(df["category"], df["task"], strict=True)) == [
            ("memory", "t1"), ("memory", "t2"), ("reasoning", "t0")]
        for r in df.iter_rows(named=True):
            g = frames[r["task"]]
            diff = (g["knn_score"] - g["base_score"]).to_numpy()
            assert r["n"] == data[(r["task"], r["category"])]
            assert r["delta"] == pytest.approx(diff.mean(), abs=1e-12)
            lo, hi = _bootstrap_by_hand(diff, seed)
            assert (r["lo"], r["hi"]) == pytest.approx((lo, hi), abs=1e-12)
            assert r["lo"] <= r["delta"] <= r["hi"] and r["lo"] < r["hi"]


def _prediction_rows(task, category, rows):
    return pl.DataFrame(
        [{"task": task, "category": category, "id": f"{task}-{i}", "question": f"q{i}", "answer": f"a{i}",
          "base_pred": f"b{i}", "knn_pred": f"k{i}", "base_score": b, "knn_score": k, "neighbours": nb}
         for i, (b, k, nb) in enumerate(rows)]
    )


def test_examples_are_the_items_the_knn_lm_got_right_with_their_neighbours_text(tmp_path, monkeypatch):
    monkeypatch.setattr(lm, "load_identity", lambda path: {"identity of": path})
    monkeypatch.setattr(lm, "load_tokenizer",
                        lambda ident: SpacedTok() if ident == {"identity of": "id.json"} else None)
    tokens = np.arange(100, 140, dtype=np.int32)  # token at row r is 100 + r
    save_npy(tmp_path / "tokens.npy", tokens)
    f1 = tmp_path / "p1.parquet"
    _prediction_rows("gsm8k", "reasoning", [
        (0.0, 1.0, [5, 1, 30, 38, 20]),  # kNN right, base wrong: shown
        (1.0, 1.0, [2]),  # both right: not shown
        (0.0, 1.0, [0, 10]),  # shown
        (1.0, 0.0, [3]),  # base right only: not shown
        (0.0, 1.0, [7]),
    ]).write_parquet(f1)
    f2 = tmp_path / "p2.parquet"
    _prediction_rows("sst2", "memory", [(0.0, 1.0, [4])]).write_parquet(f2)  # not a reasoning task
    df = evaluate.examples([f1, f2], tmp_path / "tokens.npy", "id.json",
                           {"window": 3, "items_per_task": 2, "neighbours": 3}, tmp_path / "e.csv",
                           tmp_path / "e.parquet")
    assert df.columns == list(evaluate.EXAMPLE_COLUMNS)
    got = [(r["id"], r["rank"], r["row"], r["neighbour_context"], r["neighbour_next"])
           for r in df.iter_rows(named=True)]
    assert got == [
        ("gsm8k-0", 1, 5, " w103 w104 w105", " w106"),
        ("gsm8k-0", 2, 1, " w100 w101", " w102"),  # the window stops at the stream's start
        ("gsm8k-0", 3, 30, " w128 w129 w130", " w131"),
        ("gsm8k-2", 1, 0, " w100", " w101"),
        ("gsm8k-2", 2, 10, " w108 w109 w110", " w111"),
    ]
    r0 = df.row(0, named=True)
    assert [r0[c] for c in ("task", "question", "answer", "base_pred", "knn_pred")] == ["gsm8k", "q0", "a0", "b0", "k0"]
    assert pl.read_parquet(tmp_path / "e.parquet").equals(df)
    assert pl.read_csv(tmp_path / "e.csv").height == 5
    # the schema's defaults: a 24-token window, 5 items per task, 4 neighbours each
    df = evaluate.examples([f1], tmp_path / "tokens.npy", "id.json", SHOWN, tmp_path / "e.csv", tmp_path / "e.parquet")
    assert df["id"].to_list() == ["gsm8k-0"] * 4 + ["gsm8k-2"] * 2 + ["gsm8k-4"]
    assert df["rank"].to_list() == [1, 2, 3, 4, 1, 2, 1]
    assert df.row(2, named=True)["neighbour_context"] == "".join(f" w{100 + r}" for r in range(7, 31))
    # the last row has no next token: a neighbour there is not in this stream
    bad = tmp_path / "bad.parquet"
    _prediction_rows("gsm8k", "reasoning", [(0.0, 1.0, [39])]).write_parquet(bad)
    with pytest.raises(ArtifactError, match="neighbour row 39 outside"):
        evaluate.examples([bad], tmp_path / "tokens.npy", "id.json", SHOWN, tmp_path / "e.csv", tmp_path / "e.parquet")
    _prediction_rows("gsm8k", "reasoning", [(0.0, 1.0, [38])]).write_parquet(bad)
    assert evaluate.examples([bad], tmp_path / "tokens.npy", "id.json", SHOWN, tmp_path / "e.csv",
                             tmp_path / "e.parquet")["neighbour_next"].to_list() == [" w139"]
    # five items per task by default; no item shown: an empty table with the columns
    _prediction_rows("gsm8k", "reasoning", [(0.0, 1.0, [i]) for i in range(7)]).write_parquet(bad)
    df = evaluate.examples([bad], tmp_path / "tokens.npy", "id.json", SHOWN, tmp_path / "e.csv", tmp_path / "e.parquet")
    assert df["row"].to_list() == [0, 1, 2, 3, 4]
    _prediction_rows("gsm8k", "reasoning", [(1.0, 1.0, [1])]).write_parquet(bad)
    df = evaluate.examples([bad], tmp_path / "tokens.npy", "id.json", SHOWN, tmp_path / "e.csv", tmp_path / "e.parquet")
    assert df.height == 0 and df.schema == evaluate.EXAMPLE_COLUMNS
    # the token stream is checked: one dimension of int32
    for wrong in (tokens.reshape(4, 10), tokens.astype(np.int64)):
        save_npy(tmp_path / "wrong.npy", wrong)
        with pytest.raises(ArtifactError):
            evaluate.examples([f1], tmp_path / "wrong.npy", "id.json", SHOWN, tmp_path / "e.csv",
                              tmp_path / "e.parquet")


# ------------------------------------------------------------------------------------------ scoring stage by hand
class _ToyTok:
    """A tokenizer over the toy vocabulary: "a".."d" -> 1..4, any other word -> 2 ("b"); the start token 0 in
    front with special tokens."""

    bos_token_id = 0
    eos_token_id = None
    all_special_ids = [0]
    names = {0: "<s>", **{i: w for w, i in WORDS.items()}}

    def __call__(self, text, add_special_tokens=True):  # the start token by default, as Hugging Face's
        return {"input_ids": ([0] if add_special_tokens else []) + [WORDS.get(w, 2) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.names[int(i)] for i in ids if not (skip_special_tokens and int(i) == 0))


class _SpyLM(ToyLM):
    """The bigram ToyLM, recording every sequence it is given (padding removed) and each batch's size."""

    def __init__(self, table):
        super().__init__(table)
        self.seen, self.batches = [], []

    def forward(self, input_ids, attention_mask=None):
        self.batches.append(len(input_ids))
        for row, m in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            self.seen.append(row[: sum(m)])
        return super().forward(input_ids, attention_mask)


# the toy datastore's neighbours of one_hot(last token), written out: (distances, values, ids), nearest first
NEAR = {1: ([0.0, 1.0, 2.0], [4, 4, 3], [0, 1, 2]), 2: ([0.0, 2.0, 3.0], [3, 4, 4], [2, 0, 1]),
        3: ([2.0, 2.0, 3.0], [4, 3, 4], [0, 2, 1]), 4: ([2.0, 2.0, 3.0], [4, 3, 4], [0, 2, 1])}


def test_last_token_cache_keeps_log_p_at_the_slots_and_the_neighbours_of_the_last_position():
    model = _SpyLM(TABLE)
    entry = {"name": "t", "synonyms": [[" d", " b"], [" c"]]}
    items = [{"premise": "a", "domain_premise": "c", "gold": 0}, {"premise": "b", "domain_premise": "c", "gold": 1},
             {"premise": "c a b", "gold": 0}]
    cache, rec, classes = scoring.score_last_token(model, _ToyTok(), {"hook_point": "h.0.mlp"}, entry, items,
                                                   SEARCH, block_size=2, batch=2)
    assert cache["slot_ids"].tolist() == [2, 3, 4] and classes == [[2, 0], [1]]
    assert rec == [{"q": 0, "dq": 1, "gold": 0}, {"q": 2, "dq": 1, "gold": 1}, {"q": 3, "dq": -1, "gold": 0}]
    # premises "a", "c", "b", "c a b" with the start token, cut from the left to 2 tokens
    assert sorted(model.seen) == sorted([[0, 1], [0, 3], [0, 2], [1, 2]])
    last = [1, 3, 2, 2]
    np.testing.assert_allclose(cache["q_lm"], np.log(TABLE[last][:, [2, 3, 4]]), rtol=1e-6)
    assert cache["q_lm"].dtype == np.float32 and cache["q_dists"].dtype == np.float32
    assert cache["q_vals"].dtype == np.int32 and cache["q_ids"].dtype == np.int64
    assert cache["q_dists"].tolist() == [NEAR[t][0] for t in last]
    assert cache["q_vals"].tolist() == [NEAR[t][1] for t in last]
    assert cache["q_ids"].tolist() == [NEAR[t][2] for t in last]


class _DS:
    hash = "sha-of-the-manifest"
    manifest = {"dim": 2, "rows": 8, "shards": [{"rows": 8}]}  # what memory.check plans with

    def gather_vals(self, ids):
        return DS_VALS[ids]


def _score_stage(tmp_path, monkeypatch, entry, items, summary_csv=None, chunk=None, name="s", **p):
    """scoring.score with the retriever replaced by the toy model and datastore; (meta, npz, json, searches)."""
    from workflow_scripts import datastore, retrieval

    model, tok = _SpyLM(TABLE), _ToyTok()
    calls = []
    ds = _DS()

    def open_retriever(*args):
        assert args[:4] == ("id.json", "m.json", "index", "imeta.json") and args[5:] == (1,)  # threads: 1
        assert args[4]["k_max"] == 3 and args[4]["task"] == "t"
        return model, tok, {"hook_point": "h.0.mlp", "vocab_size": V}, ds, "index", {"exact": True}

    monkeypatch.setattr(retrieval, "open_retriever", open_retriever)
    monkeypatch.setattr(datastore, "manifest_hash", lambda path: ds.hash if path == "m.json" else None)  # empty chunks

    def search(index, ds_, q, K, exact, distances="exact"):
        assert ds_ is ds
        calls.append((index, q.dtype, K, exact, distances))
        d, _, ids = SEARCH(q)
        return d[:, :K], ids[:, :K]

    monkeypatch.setattr(retrieval, "search", search)
    task_items.write_items([{"id": str(i), "question": "", "answer": "", **it} for i, it in enumerate(items)],
                         tmp_path / "items.parquet")
    params = {"entry": entry, "task": "t", "k_max": 3, "block_size": 8, "batch_size": 2, "datastore": "d", **p}
    meta = scoring.score("id.json", "m.json", "index", "imeta.json", tmp_path / "items.parquet", params,
                         tmp_path / f"{name}.npz", tmp_path / f"{name}.json", summary_csv, chunk=chunk)
    npz = dict(np.load(tmp_path / f"{name}.npz"))
    return meta, npz, json.loads((tmp_path / f"{name}.json").read_text()), calls, model


def test_a_premise_that_encodes_to_no_tokens_is_refused_by_task_name():
    class NoStartTok(_ToyTok):
        all_special_ids = []

        def __call__(self, text, add_special_tokens=False):
            return super().__call__(text, add_special_tokens=False)

    items = [{"premise": "a", "domain_premise": "", "gold": 0}]
    with pytest.raises(ValueError, match=r"^task sst9: a premise encodes to no tokens$"):
        scoring.score_last_token(_SpyLM(TABLE), NoStartTok(), {"hook_point": "h.0.mlp"},
                                 {"name": "sst9", "synonyms": [[" d"], [" c"]]}, items, SEARCH, 4, 2)


def test_score_stage_last_token_writes_the_cache_and_the_items(tmp_path, monkeypatch):
    entry = {"name": "t", "kind": "classify", "protocol": "last_token", "synonyms": [[" d"], [" c", " b"]]}
    items = [{"premise": "a", "domain_premise": "c", "gold": 0}, {"premise": "b", "gold": 1}]
    meta, npz, rec, calls, _ = _score_stage(tmp_path, monkeypatch, entry, items, distances="pq")
    assert calls == [("index", np.float32, 3, True, "pq")]
    assert {k: meta[k] for k in ("task", "kind", "K", "n_items", "manifest_sha256", "protocol", "n_queries",
                                 "n_slots")} == {"task": "t", "kind": "classify", "K": 3, "n_items": 2,
                                                 "manifest_sha256": "sha-of-the-manifest", "protocol": "last_token",
                                                 "n_queries": 3, "n_slots": 3}
    assert meta["seconds"] >= 0 and rec["meta"] == meta
    assert rec["items"] == [{"q": 0, "dq": 1, "gold": 0}, {"q": 2, "dq": -1, "gold": 1}]
    assert rec["classes"] == [[2], [1, 0]]
    assert npz["slot_ids"].tolist() == [2, 3, 4] and npz["q_vals"].tolist() == [NEAR[t][1] for t in (1, 3, 2)]
    np.testing.assert_allclose(npz["q_lm"], np.log(TABLE[[1, 3, 2]][:, [2, 3, 4]]), rtol=1e-6)


def test_score_stage_teacher_forced_writes_one_row_per_scored_token(tmp_path, monkeypatch):
    entry = {"name": "t", "kind": "choice", "metric": "accuracy"}
    items = [{"options": [[["a", "b b"]], [["a", "c"]]], "domain": None, "gold": 0},
             {"options": [[["c", "a"]], [["b", "d"]]], "domain": None, "gold": 1}]
    classify = _score_stage(tmp_path, monkeypatch, {**entry, "kind": "classify"}, items)[1]
    meta, npz, rec, calls, model = _score_stage(tmp_path, monkeypatch, entry, items)
    assert classify.keys() == npz.keys() and all(np.array_equal(classify[k], npz[k]) for k in npz)
    assert calls == [("index", np.float32, 3, True, "exact")]
    # the start token, the context, the continuation; batches of 2 mix lengths 3 and 4 (padding masked)
    assert sorted(model.seen) == [[0, 1, 2, 2], [0, 1, 3], [0, 2, 4], [0, 3, 1]]
    # distinct prefixes: "a" (shared by both of item 0's continuations), "a b", "c", "b"
    assert (meta["n_pairs"], meta["n_tokens"], meta["n_queries"], meta["n_items"]) == (4, 5, 4, 2)
    assert rec == {"meta": meta, "items": [{"options": [[0], [1]], "domain": None, "gold": 0},
                                           {"options": [[2], [3]], "domain": None, "gold": 1}]}
    assert npz["pair_len"].tolist() == [2, 1, 1, 1]
    dtypes = {k: npz[k].dtype for k in ("t_pair", "t_row", "t_target", "t_lm", "q_dists", "q_vals", "q_ids",
                                        "pair_len")}
    assert dtypes == {"t_pair": np.int64, "t_row": np.int64, "t_target": np.int32, "t_lm": np.float32,
                      "q_dists": np.float32, "q_vals": np.int32, "q_ids": np.int64, "pair_len": np.int64}
    # (pair, target, log p_lm, neighbours of the query of the token's prefix), by pair, in position order
    tokens = sorted(zip(npz["t_pair"].tolist(), npz["t_target"].tolist(), npz["t_lm"].tolist(),
                        npz["q_dists"][npz["t_row"]].tolist(), npz["q_ids"][npz["t_row"]].tolist(), strict=True),
                    key=lambda t: t[0])
    assert [(p, t) for p, t, *_ in tokens] == [(0, 2), (0, 2), (1, 3), (2, 1), (3, 4)]
    np.testing.assert_allclose([lp for _, _, lp, *_ in tokens], np.log([0.5, 0.2, 0.2, 0.6, 0.2]), rtol=1e-6)
    last = [1, 2, 1, 3, 2]  # the prefixes' last tokens: "a", "a b", "a", "c", "b"
    assert [d for *_, d, _ in tokens] == [NEAR[t][0] for t in last]
    assert [i for *_, i in tokens] == [NEAR[t][2] for t in last]
    assert sorted(map(tuple, npz["q_ids"].tolist())) == sorted(tuple(NEAR[t][2]) for t in (1, 2, 3, 2))
    # without a start token the end-of-sequence token leads each sequence
    monkeypatch.setattr(_ToyTok, "bos_token_id", None)
    monkeypatch.setattr(_ToyTok, "eos_token_id", 3)
    _, _, _, _, model = _score_stage(tmp_path, monkeypatch, entry, items)
    assert sorted(model.seen) == [[3, 1, 2, 2], [3, 1, 3], [3, 2, 4], [3, 3, 1]]


def test_score_stage_generate_decodes_at_the_base_lm_the_grid_and_the_pinned_point(tmp_path, monkeypatch):
    entry = {"name": "t", "kind": "generate", "max_new_tokens": 2, "stop": ["d"]}
    items = [{"context": "a"}, {"context": "c b"}]
    gen = {"max_new_tokens": 5, "points": "grid"}
    grid = {"lambdas": [0.5], "ks": [3], "sigmas": [1.0]}
    meta, npz, rec, calls, _ = _score_stage(tmp_path, monkeypatch, entry, items, generate=gen, grid=grid,
                                            point=(0.9, 3, 1.0))
    assert npz["generated_points"].tolist() == [3] and rec["meta"] == meta and meta["n_items"] == 2
    prompts = [[0, 1], [0, 3, 2]]
    points = [None, (0.5, 3, 1.0), (0.9, 3, 1.0)]
    assert [(r["lambda"], r["k"], r["sigma"]) for r in rec["points"]] == [(0.0, None, None), *points[1:]]
    for r, pt in zip(rec["points"], points, strict=True):
        texts = []
        for prompt in prompts:
            ids = []
            for t in _greedy_by_hand(prompt, pt, 2):  # at most 2 new tokens (the task's), until "d" is written
                ids.append(t)
                if t == 4:
                    break
            words = " ".join(_ToyTok.names[i] for i in ids if i != 0)
            texts.append(words[: words.index("d")].strip() if "d" in words else words)
        assert r["texts"] == texts, pt
        assert r["neighbours"] == ([None, None] if pt is None else [NEAR[1][2], NEAR[2][2]])
    # points: "chosen" decodes the base LM and the pinned point only; a pinned point on the grid is not repeated
    _, _, rec, _, _ = _score_stage(tmp_path, monkeypatch, entry, items, generate={**gen, "points": "chosen"},
                                   grid=grid, point=(0.9, 3, 1.0))
    assert [r["lambda"] for r in rec["points"]] == [0.0, 0.9]
    _, _, rec, _, _ = _score_stage(tmp_path, monkeypatch, entry, items, generate=gen, grid=grid,
                                   point=(0.5, 3, 1.0))
    assert [r["lambda"] for r in rec["points"]] == [0.0, 0.5]
    # the end-of-sequence token ends an answer (kept in its text: the toy decoder skips only the start token)
    monkeypatch.setattr(_ToyTok, "eos_token_id", 4)
    _, _, rec, _, _ = _score_stage(tmp_path, monkeypatch, {**entry, "stop": ["\n"]}, items, generate=gen, grid=grid,
                                   point=(0.9, 3, 1.0))
    for r, pt in zip(rec["points"], points, strict=True):
        texts = []
        for prompt in prompts:
            ids = []
            for t in _greedy_by_hand(prompt, pt, 2):
                ids.append(t)
                if t == 4:
                    break
            texts.append(" ".join(_ToyTok.names[i] for i in ids if i != 0))
        assert r["texts"] == texts, pt
    assert rec["points"][2]["texts"][0] == "d"  # at λ .9 the first answer ends at its first token
    monkeypatch.setattr(_ToyTok, "eos_token_id", None)
    # the task's default stop is a newline and its default length the config's: 5 tokens, none a newline
    _, _, rec, _, _ = _score_stage(tmp_path, monkeypatch, {"name": "t", "kind": "generate"}, items[:1],
                                   generate={**gen, "points": "chosen"}, grid=grid, point=None)
    want = " ".join(_ToyTok.names[i] for i in _greedy_by_hand([0, 1], None, 5) if i != 0)  # the start token skipped
    assert [r["texts"] for r in rec["points"]] == [[want]]


def test_score_stage_generate_reads_the_perplexity_choice_the_model_window_and_the_newline_stop(tmp_path,
                                                                                                 monkeypatch):
    """Without a pinned point the answers are decoded at the datastore's perplexity choice; prompts keep the model's
    window (max_position_embeddings 4) less the 2 new tokens, not the datastore's 8; a task without a stop list
    stops at a newline (here the token "c", after which the decoding would go on with a visible word)."""
    from types import SimpleNamespace

    monkeypatch.setattr(_SpyLM, "config", SimpleNamespace(max_position_embeddings=4), raising=False)
    monkeypatch.setattr(_ToyTok, "names", {**_ToyTok.names, 3: "\n"})
    # perplexity summary: datastore "other" chose (.5, 3, 1), "d" (.9, 3, 1) on valid, as its test row records
    write_table(pl.DataFrame({"eval_set": ["valid", "test"], "datastore": ["other", "d"], "lambda": [0.5, 0.9],
                              "k": [3, 3], "sigma": [1.0, 1.0], "chosen_on": ["valid", "valid"]}),
                tmp_path / "ppl.csv", tmp_path / "ppl.parquet")
    items = [{"context": "c b a c"}, {"context": "a"}, {"context": "b"}]
    _, _, rec, _, model = _score_stage(tmp_path, monkeypatch, {"name": "t", "kind": "generate", "max_new_tokens": 2},
                                       items, summary_csv=tmp_path / "ppl.csv",
                                       generate={"max_new_tokens": 5, "points": "chosen"}, point=None)
    prompts = [[1, 3], [0, 1], [0, 2]]  # the start token and the context, cut from the left to 4 - 2 tokens
    assert model.seen[:3] == prompts and model.batches[:2] == [2, 1]  # batch_size 2
    assert [(r["lambda"], r["k"], r["sigma"]) for r in rec["points"]] == [(0.0, None, None), (0.9, 3, 1.0)]
    stopped = 0
    for r, pt in zip(rec["points"], [None, (0.9, 3, 1.0)], strict=True):
        texts = []
        for prompt in prompts:
            ids = []
            for t in _greedy_by_hand(prompt, pt, 2):
                ids.append(t)
                if t == 3:  # "\n": the default stop ends the answer, cut before it
                    stopped += 1
                    break
            words = " ".join(_ToyTok.names[i] for i in ids if i != 0)  # the start token skipped
            texts.append(words[: words.index("\n")].strip() if "\n" in words else words)
        assert r["texts"] == texts, pt
    assert stopped >= 2


def test_task_sweep_of_the_last_token_protocol_by_hand(tmp_path, monkeypatch):
    """The memory tasks' sweep from the score stage's cache: each item's class by DCPMI (or Σ p without PMI) at
    every grid point, computed here from the toy model's table and the datastore's neighbours."""
    syn = [[" d"], [" c", " b"]]
    items = [{"premise": "a", "domain_premise": "c", "gold": 0}, {"premise": "b", "domain_premise": "c", "gold": 1},
             {"premise": "d", "domain_premise": "b", "gold": 1}, {"premise": "c", "domain_premise": "a", "gold": 0}]
    last = {"a": 1, "b": 2, "c": 3, "d": 4}
    grid = {"lambdas": [0.0, 0.5, 0.9], "ks": [1, 3], "sigmas": [1.0, 0.1]}

    def p_mix(t, w, lam, k, s):
        d, v, _ = NEAR[t]
        return lam * p_knn_by_hand(d, v, w, k, s) + (1 - lam) * TABLE[t][w]

    def by_hand(it, pmi, lam, k, s):
        prem, dom = last[it["premise"]], last[it["domain_premise"]]
        scores = []
        for words in syn:
            ws = [WORDS[w.strip()] for w in words]
            if pmi:
                scores.append(sum(math.log(p_mix(prem, w, lam, k, s) + 1e-10)
                                  - math.log(p_mix(dom, w, lam, k, s) + 1e-10) for w in ws))
            else:
                scores.append(sum(p_mix(prem, w, lam, k, s) for w in ws))
        return int(np.argmax(scores))

    for pmi in (True, False):
        entry = {"name": "t", "kind": "classify", "protocol": "last_token", "synonyms": syn, "pmi": pmi,
                 "metric": "accuracy", "category": "memory"}
        _score_stage(tmp_path, monkeypatch, entry, [{**it, "labels": ["no", "yes"]} for it in items])
        p = {"task": "t", "model": "m", "datastore": "d", "entry": entry, "grid": grid}
        s = evaluate.sweep_task(tmp_path / "s.npz", tmp_path / "s.json", tmp_path / "items.parquet", p, None,
                                tmp_path / "sweep.csv", tmp_path / "sweep.parquet", tmp_path / "pred.parquet",
                                tmp_path / "summary.json")
        gold = [it["gold"] for it in items]
        want = {}
        for lam in grid["lambdas"]:
            for k in grid["ks"]:
                for sg in grid["sigmas"]:
                    preds = [by_hand(it, pmi, lam, k, sg) for it in items]
                    want[(lam, k, sg)] = (np.mean(np.equal(preds, gold)), preds)
        base_preds = [by_hand(it, pmi, 0.0, 1, 1.0) for it in items]
        sweep_rows = pl.read_csv(tmp_path / "sweep.csv")
        assert {(r["lambda"], r["k"], r["sigma"]): r["score"] for r in sweep_rows.iter_rows(named=True)} == {
            pt: sc for pt, (sc, _) in want.items()}
        assert (sweep_rows["base"] == np.mean(np.equal(base_preds, gold))).all() and (sweep_rows["n"] == 4).all()
        best = min(want, key=lambda pt: (-want[pt][0], *pt))
        assert (s["base"], s["best"], s["knn"]) == (np.mean(np.equal(base_preds, gold)), want[best][0], want[best][0])
        assert (s["lambda"], s["k"], s["sigma"], s["chosen_on"]) == (*best, "task (no perplexity choice)")
        assert (s["best_lambda"], s["best_k"], s["best_sigma"]) == best
        pred = pl.read_parquet(tmp_path / "pred.parquet")
        assert pred["base_pred"].to_list() == [["no", "yes"][j] for j in base_preds]
        assert pred["knn_pred"].to_list() == [["no", "yes"][j] for j in want[best][1]]
        assert pred["base_score"].to_list() == [float(a == b) for a, b in zip(base_preds, gold, strict=True)]
        assert pred["knn_score"].to_list() == [float(a == b) for a, b in zip(want[best][1], gold, strict=True)]
        assert pred["neighbours"].to_list() == [NEAR[last[it["premise"]]][2] for it in items]
    assert len({pt for pt, (sc, _) in want.items()}) == 12 and len({sc for sc, _ in want.values()}) > 1
    # a pinned point off the grid (k = 2) is scored beside it and is the point reported
    s = evaluate.sweep_task(tmp_path / "s.npz", tmp_path / "s.json", tmp_path / "items.parquet",
                            {**p, "point": [0.7, 2, 1.0]}, None, tmp_path / "sweep.csv", tmp_path / "sweep.parquet",
                            tmp_path / "pred.parquet", tmp_path / "summary.json")
    preds = [by_hand(it, False, 0.7, 2, 1.0) for it in items]
    assert (s["lambda"], s["k"], s["sigma"], s["chosen_on"]) == (0.7, 2, 1.0, "pinned in config")
    assert s["knn"] == np.mean(np.equal(preds, gold)) and pl.read_csv(tmp_path / "sweep.csv").height == 13


def test_queries_are_rounded_to_the_datastores_float16_keys():
    """The datastore stores keys in float16: every query is rounded the same way before the search (0.1 is
    0.0999755859375 in float16), in the teacher-forced, last-token and generate paths alike."""
    model = ToyLM(TABLE)
    model.h[0].emb.weight.data = 0.1 * torch.eye(V)  # keys 0.1 · one_hot(x): not a float16 number
    seen = []

    def search(q):
        seen.append(q.copy())
        return SEARCH(q)

    seqs, starts, _ = scoring.build_pairs([{"options": [[["a", "b"]]], "gold": 0}], encode, 0, 8)
    scoring.score_cache(model, "h.0.mlp", seqs, starts, search, batch=2)
    scoring.last_token_cache(model, "h.0.mlp", [[0, 1]], [2, 3], search, batch=2)
    scoring.greedy_generate(model, "h.0.mlp", [[0, 1]], [(0.5, 3, 1.0)], search, V, 1, lambda ids: False, batch=2)
    assert len(seen) == 3
    for q in seen:
        assert q.dtype == np.float32 and q.max() == np.float32(np.float16(0.1)) != np.float32(0.1)


# --------------------------------------------------------------------------------------------- chunked scoring
WORDS4 = ["a", "b", "c", "d"]
CHUNK_ITEMS = {  # 20 items each: with batch_size 1, blocks of 8 items (memory.task_block): 3 blocks
    "pairs": [{"options": [[[f"{WORDS4[i % 4]} {WORDS4[i // 4 % 4]}", WORDS4[(i + j) % 4]]] for j in range(2)],
               "domain": [[["d", w]] for w in "ab"], "gold": i % 2} for i in range(20)],
    "last_token": [{"premise": " ".join(WORDS4[(i + j) % 4] for j in range(1 + i % 3)),
                    "domain_premise": "c" if i % 2 else None, "gold": i % 2} for i in range(20)],
    "generate": [{"context": " ".join(WORDS4[(i * j) % 4] for j in range(1 + i % 3))} for i in range(20)],
}
CHUNK_ENTRIES = {
    "pairs": {"name": "t", "kind": "choice", "metric": "accuracy", "pmi": True},
    "last_token": {"name": "t", "kind": "classify", "protocol": "last_token", "synonyms": [[" d"], [" c", " b"]],
                   "pmi": True},
    "generate": {"name": "t", "kind": "generate", "max_new_tokens": 2, "stop": ["d"]},
}


@pytest.mark.parametrize("how", ["pairs", "last_token", "generate"])
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_chunks_of_a_task_join_into_the_one_job_cache_byte_for_byte(tmp_path, monkeypatch, how, chunks):
    """tasks.chunks: each chunk scores whole blocks of items (8 here) as the one job does, and merge_chunks shifts
    their pair ids and query rows into the one job's; the npz is the one job's byte for byte (its arrays, and the
    file: fixed member timestamps), the record too but for its timing and the number of chunks joined. With 5
    chunks two have no items and load no model."""
    entry, items = CHUNK_ENTRIES[how], CHUNK_ITEMS[how]
    p = {"batch_size": 1, "generate": {"max_new_tokens": 5, "points": "grid"},
         "grid": {"lambdas": [0.5], "ks": [3], "sigmas": [1.0]}} if how == "generate" else {"batch_size": 1}
    one, one_npz, one_rec, one_calls, model = _score_stage(tmp_path, monkeypatch, entry, items, name="one", **p)
    assert one["n_items"] == 20
    if how != "generate":  # one search call per block of 8 items
        assert len(one_calls) == 3
    metas = []
    for i in range(chunks):
        meta, *_ = _score_stage(tmp_path, monkeypatch, entry, items, chunk=(i, chunks), name=f"c{i}", **p)
        metas.append(tmp_path / f"c{i}.json")
        a, b = scoring.chunk_items(20, {"batch_size": 1}, (i, chunks))
        assert meta["chunk"] == {"index": i, "of": chunks, "start": a, "end": b, "items": 20}
        assert a % 8 == 0 and meta["n_items"] == b - a
    sizes = [json.loads(m.read_text())["meta"]["n_items"] for m in metas]
    assert sum(sizes) == 20 and sizes.count(0) == max(0, chunks - 3)  # 3 blocks
    params = {"entry": entry, "task": "t", "k_max": 3, "block_size": 8, **p}
    joined = scoring.merge_chunks(metas, tmp_path / "items.parquet", params, tmp_path / "j.npz", tmp_path / "j.json")
    assert (tmp_path / "j.npz").read_bytes() == (tmp_path / "one.npz").read_bytes()
    drop = ("seconds", "chunks")
    assert joined["chunks"] == chunks
    assert {k: v for k, v in joined.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    rec = json.loads((tmp_path / "j.json").read_text())
    assert {**rec, "meta": None} == {**one_rec, "meta": None}
    # what the task sweep reads from the joined cache is what it reads from the one job's
    if how == "pairs":  # item 5's first option: its context "b b" + "b"; the domain pairs are a block's own
        struct = rec["items"][5]
        assert one_npz["t_target"][one_npz["t_pair"] == struct["options"][0][0]].tolist() == [2]
        assert struct["domain"][0] != rec["items"][13]["domain"][0]  # items 5 and 13: blocks 0 and 1
    # a chunk of another split (here: the chunks out of order) is refused by name, and nothing is written
    with pytest.raises(ArtifactError, match=r"c1\.json: chunk .* expected \{'index': 0"):
        scoring.merge_chunks(metas[1:] + metas[:1], tmp_path / "items.parquet", params, tmp_path / "bad.npz",
                             tmp_path / "bad.json")
    assert not (tmp_path / "bad.npz").exists()


def test_a_chunk_npz_altered_since_it_was_written_is_refused(tmp_path, monkeypatch):
    entry, items = CHUNK_ENTRIES["pairs"], CHUNK_ITEMS["pairs"]
    for i in range(2):
        _score_stage(tmp_path, monkeypatch, entry, items, chunk=(i, 2), name=f"c{i}", batch_size=1)
    z = dict(np.load(tmp_path / "c1.npz"))
    z["t_lm"] = z["t_lm"] + 1
    np.savez(tmp_path / "c1.npz", **z)
    params = {"entry": entry, "task": "t", "k_max": 3, "block_size": 8, "batch_size": 1}
    with pytest.raises(ArtifactError, match=r"c1\.npz: sha256 differs .* rerun score_task_chunk"):
        scoring.merge_chunks([tmp_path / "c0.json", tmp_path / "c1.json"], tmp_path / "items.parquet", params,
                             tmp_path / "j.npz", tmp_path / "j.json")


def _score_files(work, task):
    d = work / "results"
    return (d / "models/micro-gpt2/model.json", d / "datastores/micro/manifest.json",
            d / "datastores/micro/index.faiss", d / "datastores/micro/index.json", d / f"task_data/{task}.parquet")


@pytest.mark.slow
def test_chunked_scoring_on_the_micro_model_is_byte_identical_to_one_job(task_run, tmp_path, monkeypatch):
    """The micro model and datastore of the task run, four kinds: choice (synth_recall), classify with a domain
    premise (synth_occupation), the last-token protocol and generate (items made here from the corpus). With
    batch_size 2 (blocks of 16 items: 3 blocks of the 40 items), the 3 chunks' caches, joined, are the one job's:
    the npz byte for byte, the record but for its timing and the number of chunks (real forward passes and FAISS
    calls, whose float32 results depend on their batches). The byte bound the rule plans with holds at least the
    scored tokens the job counted."""
    from workflow_scripts import memory

    work, _ = task_run
    monkeypatch.chdir(work)  # model.json names the model by its path in the run
    reg = registry.registry()
    docs = pl.read_parquet(work / "results/corpus/micro/test.parquet")["text"].to_list()
    words = [w for d in docs for w in d.split()][:2000]
    made = {
        "lt": ({"name": "lt", "kind": "classify", "protocol": "last_token", "metric": "accuracy", "pmi": True,
                "category": "memory", "synonyms": [[" born", " lived"], [" works", " city"]]},
               [{"premise": " ".join(words[7 * i : 7 * i + 3 + i % 5]), "domain_premise": "It is",
                 "gold": i % 2} for i in range(40)]),
        "gen": ({"name": "gen", "kind": "generate", "metric": "exact_match", "category": "reasoning",
                 "max_new_tokens": 3, "stop": ["."]},
                [{"context": " ".join(words[9 * i : 9 * i + 4 + i % 6]), "answers": [words[9 * i + 4 + i % 6]]}
                 for i in range(40)]),
    }
    for name, (_, items) in made.items():
        task_items.write_items([{"id": str(i), "question": "", "answer": "", **it} for i, it in enumerate(items)],
                             tmp_path / f"{name}.parquet")
    base = {"datastore": "micro", "k_max": 32, "block_size": 32, "batch_size": 2, "device": "cpu",
            "dtype": "float32", "nprobe": None, "distances": None, "gpu_shard_above_gb": 4.0, "point": [0.5, 8, 1.0],
            "generate": {"points": "chosen", "max_new_tokens": 16}}
    for task in ("synth_recall", "synth_occupation", "lt", "gen"):
        entry = made[task][0] if task in made else reg[task]
        *files, items = _score_files(work, task)
        items = tmp_path / f"{task}.parquet" if task in made else items
        p = {**base, "task": task, "entry": entry}
        one = scoring.score(*files, items, p, tmp_path / task / "one.npz", tmp_path / task / "one.json")
        metas = []
        for i in range(3):
            d = tmp_path / task / f"chunk{i}"
            scoring.score(*files, items, {**p, "chunk": [i, 3]}, d / "scored.npz", d / "scored.json", chunk=(i, 3))
            metas.append(d / "scored.json")
        joined = scoring.merge_chunks(metas, items, p, tmp_path / task / "j.npz", tmp_path / task / "j.json",
                                      files[1], files[3])
        assert (tmp_path / task / "j.npz").read_bytes() == (tmp_path / task / "one.npz").read_bytes(), task
        drop = ("seconds", "chunks")
        assert {k: v for k, v in joined.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
        a, b = (json.loads((tmp_path / task / f).read_text()) for f in ("j.json", "one.json"))
        assert {**a, "meta": None} == {**b, "meta": None}
        assert one["n_items"] == 40 and joined["chunks"] == 3
        if task.startswith("synth"):  # the byte bound the rule plans with holds the tokens the step counts
            bound = memory.task_queries(task_items.read_items(items), p)[0]
            assert one["n_queries"] <= one["n_tokens"] <= bound, (one, bound)
        if task == "gen":
            assert [pt["lambda"] for pt in a["points"]] == [0.0, 0.5] and len(a["points"][1]["texts"]) == 40


@pytest.mark.slow
def test_the_task_runs_score_task_plan_holds_its_measured_peak_memory(task_run):
    """Each score_task job of the task run logged its plan; its benchmark's max_rss (the job's measured peak) is
    below it."""
    work, _ = task_run
    for task in ("synth_recall", "synth_occupation", "synth_twohop", "synth_arithmetic"):
        logged = (work / f"results/logs/score_task/micro/{task}.log").read_text()
        plan = int(re.search(r"memory plan for score_task: about (\d+) MiB", logged)[1])
        rss = pl.read_csv(work / f"results/benchmarks/score_task/micro/{task}.tsv", separator="\t")["max_rss"][0]
        assert 0 < rss < plan, (task, rss, plan)


# --------------------------------------------------------------------------------------------- memory planning
PAPER_MANIFEST = {"dim": 4096, "rows": 610_000_000, "shards": [{"rows": 9_531_250}] * 64}  # paper 1's datastore


def _distinct_items(n):
    """Choice items with distinct contexts, two continuations each of 3 and 11 bytes, one shared domain premise."""
    return [{"options": [[[f"context {i}", " yes"]], [[f"context {i}", " not at all"]]],
             "domain": [[["Answer:", " yes"]], [["Answer:", " not at all"]]], "gold": 0} for i in range(n)]


def test_task_memory_plan_counts_a_bound_on_scored_tokens_and_grows_with_items_and_k():
    from workflow_scripts import memory

    p = {"entry": {"kind": "choice"}, "batch_size": 8}  # blocks of 64 items
    assert memory.task_block(p) == 64
    # by hand: per item (4 + 1) + (11 + 1) bytes; per block the two domain pairs once (the block's own dedup)
    for n in (1, 64, 65, 1000):
        blocks = -(-n // 64)
        assert memory.task_queries(_distinct_items(n), p) == (17 * n + 17 * blocks, 17 * min(n, 64) + 17)
    # the step counts tokens with its tokenizer instead: here one token a word
    assert memory.task_queries(_distinct_items(100), p, lambda block: 2 * len(block)) == (200, 128)
    flat, ivf = {"type": "Flat"}, {"type": "IVFPQ", "distances": "pq", "nlist": 4096, "m": 64, "nbits": 8}
    plan = {"window": 1024, "batch": 8, "vocab": 32000, "device": "cuda", "block_queries": 0}
    mb = {(n, k, cfg["type"]): memory.estimate_mb("score_task", PAPER_MANIFEST, cfg, k, n, plan)[0]
          for n in (100_000, 200_000) for k in (1024, 2048) for cfg in (flat, ivf)}
    for cfg in ("Flat", "IVFPQ"):
        # the kept arrays: K dists, vals, ids (16 B each), the float16 key (2·d B) and a token row per query
        assert mb[200_000, 2048, cfg] - mb[100_000, 2048, cfg] == pytest.approx(
            100_000 * (2048 * 16 + 4096 * 2 + 24) / 2**20, abs=1)
        assert mb[100_000, 1024, cfg] < mb[100_000, 2048, cfg] < mb[200_000, 2048, cfg]
    # on a CPU the logits of a forward batch (batch x window x vocab float32) are host memory too
    cpu = memory.estimate_mb("score_task", PAPER_MANIFEST, flat, 2048, 100_000, {**plan, "device": "cpu"})[0]
    assert cpu - mb[100_000, 2048, "Flat"] == pytest.approx(8 * 1024 * 32000 * 4 / 2**20, abs=1)
    # the job joining chunks holds one array of the largest chunk, read and shifted: no model, no search
    items = _distinct_items(1000)
    largest = memory.task_join_rows(items, p, 4)
    assert largest == max(memory.task_queries(items[a:b], p)[0] for a, b in memory.chunk_bounds(1000, 4, 64))
    assert memory.estimate_mb("score_task", PAPER_MANIFEST, flat, 2048, largest, {"model": False})[0] == (
        memory.BASE_MB + 2 * largest * 2048 * 8 // 2**20)


def test_a_task_job_with_less_memory_than_its_plan_stops_before_scoring_naming_the_key(tmp_path, monkeypatch):
    from workflow_scripts import memory

    monkeypatch.setattr(memory, "available_mb", lambda: (1000, "SLURM_MEM_PER_NODE"))
    entry, items = CHUNK_ENTRIES["pairs"], CHUNK_ITEMS["pairs"]
    with pytest.raises(memory.NotEnoughMemory) as e:
        _score_stage(tmp_path, monkeypatch, entry, items, batch_size=1)
    msg = str(e.value)
    assert re.match(r"score_task needs about \d+ MiB \(1500 MiB base \+ .*\), but this machine or allocation has 1000 "
                    r"MiB \(SLURM_MEM_PER_NODE\); lower the items per job \(raise tasks\.chunks\), or give the job "
                    r"more memory \(snakemake --set-resources score_task:mem_mb=\d+\)$", msg), msg
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.json").exists()
    with pytest.raises(memory.NotEnoughMemory, match="^score_task_chunk needs about"):
        _score_stage(tmp_path, monkeypatch, entry, items, chunk=(0, 2), batch_size=1)
    monkeypatch.setattr(memory, "available_mb", lambda: (memory.BASE_MB + 1, "test"))  # the toy's plan: it runs
    assert _score_stage(tmp_path, monkeypatch, entry, items, batch_size=1)[0]["n_items"] == 20


def test_dag_scores_each_task_in_tasks_chunks_jobs_joined_by_score_task(tmp_path):
    """tasks.chunks: 3 on the tasks config: 3 score_task_chunk jobs per (datastore, task), whose temporary caches
    one score_task job per task joins (--chunks, in order); each chunk's params are the join's plus which chunk it
    is, and the join's leave the key out (it changes no output)."""
    cfg = load_test_config("tasks")
    cfg["tasks"]["chunks"] = 3
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml")).stdout
    jobs = job_stats(out)
    n = len(cfg["tasks"]["evaluate"]["micro"])
    assert jobs["score_task_chunk"] == 3 * n and jobs["score_task"] == n
    d = "results/tasks/micro/synth_recall/chunks"
    assert re.search(rf"--chunks {d}/000/scored.json {d}/001/scored.json {d}/002/scored.json(?: --| 2>)", out)
    params = [json.loads(x) for x in re.findall(r"score-task(?:-chunk)? --params '([^']*\"synth_recall\"[^']*)'", out)]
    join = [x for x in params if "chunk" not in x]
    assert len(params) == 4 and len(join) == 1 and "chunks" not in json.dumps(join[0])
    assert sorted(tuple(x.pop("chunk")) for x in params if "chunk" in x) == [(0, 3), (1, 3), (2, 3)]
    assert all(x == join[0] for x in params)
