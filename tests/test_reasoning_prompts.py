"""Paper 1's reasoning-task protocol, task by task: the prompt our registry builds for a fixture row equals the
string the paper's evaluation code (github.com/GSYfate/knnlm-limits, eval_*.py) would build, written out here
independently; answer extraction and metrics agree with the paper's on hand-made generations (expected values
worked out by hand from its code); BBH's shots come from the same subtask and are never scored; the BBH score is
the mean of the per-subtask accuracies."""

import copy
import json

import numpy as np
import polars as pl
import pytest
from conftest import ROOT

from workflow_scripts.artifacts import write_table
from workflow_scripts.tasks import evaluate, metrics, registry, scoring
from workflow_scripts.tasks import items as task_items

FIXTURES = ROOT / "tests" / "fixtures" / "tasks"
REG = registry.registry()


def items(task, **kw):
    return task_items.load_items(REG[task], data_files=str(FIXTURES / f"{task}.jsonl"), **kw)


def rows(task):
    return [json.loads(line) for line in (FIXTURES / f"{task}.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- GSM8K
# eval_gsm8k.py build_qa_prompt: system prompt + "\n".join(8 exemplars) + "\n" + "Question: {q}\nAnswer: "
GSM8K_SYSTEM = (
    "Your task is to solve a primary school level math problem. "
    "You should provide both a chain of reasoning and a final answer. "
    "The final answer should be clearly indicated, preceded by '####', for instance, #### 72.\n"
    "Here are some examples:\n"
)
GSM8K_EXEMPLARS = [
    "Question: There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
    "done, there will be 21 trees. How many trees did the grove workers plant today?\n"
    "Answer: There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
    "have been 21 - 15 = 6. #### 6",
    "Question: If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?\n"
    "Answer: There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. #### 5",
    "Question: Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
    "total?\n"
    "Answer: Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating "
    "35, they had 74 - 35 = 39. #### 39",
    "Question: Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
    "did Jason give to Denny?\n"
    "Answer: Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = "
    "8. #### 8",
    "Question: Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
    "have now?\n"
    "Answer: Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 "
    "= 9. #### 9",
    "Question: There were nine computers in the server room. Five more computers were installed each day, from "
    "Monday to Thursday. How many computers are now in the server room?\n"
    "Answer: There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
    "computers were added. 9 + 20 = 29. #### 29",
    "Question: Michael had 58 golf balls. On Tuesday, he lost 23 golf balls. On Wednesday, he lost 2 more. How many "
    "golf balls did he have at the end of Wednesday?\n"
    "Answer: Michael started with 58 golf balls. After losing 23 on Tuesday, he had 58 - 23 = 35. After losing 2 "
    "more, he had 35 - 2 = 33 golf balls. #### 33",
    "Question: Olivia has $23. She bought five bagels for $3 each. How much money does she have left?\n"
    "Answer: Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
    "dollars left. 23 - 15 = 8. #### 8",
]


def test_gsm8k_prompt_is_the_system_prompt_the_8_exemplars_and_the_question():
    its = items("gsm8k")
    for it, row in zip(its, rows("gsm8k"), strict=True):
        expected = GSM8K_SYSTEM
        for ex in GSM8K_EXEMPLARS:
            expected += ex + "\n"
        expected += "Question: " + row["question"] + "\nAnswer: "
        assert it["context"] == expected
    assert its[0]["context"].count("Question: ") == 9 and its[0]["context"].endswith("eggs does she have?\nAnswer: ")
    # the gold is the text after '####' as written: the paper's check reads "2,000" as 2 on both sides
    assert [it["answers"] for it in its] == [["42"], ["2,000"]]
    e = REG["gsm8k"]
    assert e["max_new_tokens"] == 512 and e["stop"] == ["\n"] and e["metric"] == "gsm8k"


@pytest.mark.parametrize(
    "text, value",
    [
        ("Janet sells 16 - 3 - 4 = 9 duck eggs a day. She makes 9 * 2 = $18 every day. #### 18", 18.0),
        ("The answer is 18.", None),  # no '#### ' marker: the paper finds no answer
        ("so 18 in total.#### 18", 18.0),
        ("####18", None),  # the marker needs its space
        ("#### $18", 18.0),
        ("#### 18.", 18.0),
        ("#### 3.50 dollars", 3.5),
        ("#### 1,200", 1.0),  # its first run of digits and dots stops at the comma
        ("#### 1.2.3", 0),  # three parts -> 0
        ("#### -3", None),  # a sign is not in the character class
        ("#### 5 then #### 6", 5.0),  # the first marker
        ("#### $", None),
    ],
)
def test_gsm8k_answer_reads_the_marked_number_as_the_paper(text, value):
    assert metrics.gsm8k_answer(text) == value


def test_gsm8k_check_compares_both_sides_the_papers_way():
    m = metrics.gsm8k_match
    assert m("She has 42 eggs. #### 42", ["42"]) == 1.0
    assert m("The answer is 42.", ["42"]) == 0.0  # final_number would say 42; the paper needs '####'
    assert metrics.number_match("The answer is 42.", ["42"]) == 1.0
    assert m("#### 42.0", ["42"]) == 1.0
    assert m("#### 1,200", ["1,200"]) == 1.0 and m("#### 1,999", ["1,200"]) == 1.0  # both read 1
    assert m("#### 1200", ["1,200"]) == 0.0  # 1200 vs 1
    assert m("no answer", ["-3"]) == 1.0 and m("#### 3", ["-3"]) == 0.0  # None == None, as check_answer
    # the prediction is the first line only (stop "\n"): a marked answer on a later line is not read
    assert m(scoring.cut_at_stop("I think 5 + 3.\n#### 8", REG["gsm8k"]["stop"]), ["8"]) == 0.0


# ------------------------------------------------------------------------------------------- BBH
def test_bbh_prompt_is_the_first_3_samples_of_the_same_subtask_then_the_question():
    raw = rows("bbh")
    its = items("bbh")
    by_subset = {}
    for r in raw:
        by_subset.setdefault(r["subset"], []).append(r)
    scored = [r for s in by_subset.values() for r in s[3:]]
    assert [it["answers"] for it in its] == [[r["target"]] for r in scored]
    assert [it["group"] for it in its] == ["boolean_expressions", "boolean_expressions", "sports_understanding"]
    for it, r in zip(its, scored, strict=True):
        shots = by_subset[r["subset"]][:3]
        expected = "".join(s["input"] + "\nAnswer:" + " " + s["target"] + "\n\n" for s in shots)
        expected += r["input"] + "\nAnswer:"
        assert it["context"] == expected
        assert it["context"].count("\nAnswer:") == 4
        assert not it["context"].startswith(r["input"])  # the scored row is not its own shot
    # the sports item sees only sports shots
    assert "not" not in its[2]["context"] and its[2]["context"].startswith('Is the following sentence plausible? "Bam')
    # a subsample draws from the scored rows only, never a shot
    shot_inputs = {r["input"] for s in by_subset.values() for r in s[:3]}
    for seed in range(5):
        sub = items("bbh", max_items=2, seed=seed)
        assert len(sub) == 2 and all(it["context"].split("\n\n")[-1].split("\n")[0] not in shot_inputs for it in sub)
    e = REG["bbh"]
    assert e["max_new_tokens"] == 32 and e["stop"] == [] and len(e["source"]["name"]) == 27


@pytest.mark.parametrize(
    "generation, target, ok",
    [
        (" True\n\nnot ( False ) is\nAnswer: True", "True", 1.0),  # no stop: the whole generation, stripped
        ("\n\nTrue", "True", 1.0),  # leading newlines are stripped away
        ("False", "True", 0.0),
        ("The answer is True", "True", 0.0),
        ("true", "True", 0.0),  # case-sensitive
        ("Trueish", "True", 1.0),  # a prefix is enough
        ("(A) blue", "(A)", 1.0),
        ("(B)", "(A)", 0.0),
        ("yes, it is plausible", "yes", 1.0),
    ],
)
def test_bbh_answer_matching_is_the_papers_startswith(generation, target, ok):
    pred = scoring.cut_at_stop(generation, REG["bbh"]["stop"])
    assert metrics.prefix_match(pred, [target]) == ok


def test_bbh_score_is_the_macro_average_over_subtasks():
    its = [{"group": g} for g in ["a", "a", "a", "b", "c", "c"]]
    scores = [1, 1, 0, 0, 1, 0]
    macro = (2 / 3 + 0 + 1 / 2) / 3
    assert metrics.aggregate(REG["bbh"], its, scores) == pytest.approx(macro)
    assert metrics.aggregate(REG["drop"], its, scores) == pytest.approx(0.5)  # the others: the item mean
    assert macro != pytest.approx(0.5)


def test_the_sweep_reports_the_macro_average_for_bbh(tmp_path):
    its = items("bbh")  # groups: boolean, boolean, sports; targets True, False, no
    task_items.write_items(its, tmp_path / "items.parquet")
    base_texts = ["True", "True", "no"]  # boolean 1/2, sports 1/1 -> macro .75 (item mean 2/3)
    knn_texts = ["False", "False", "yes"]  # boolean 1/2, sports 0/1 -> macro .25 (item mean 1/3)
    record = {
        "meta": {"n_items": 3, "task": "bbh"},
        "points": [
            {"lambda": 0.0, "k": None, "sigma": None, "texts": base_texts, "neighbours": [[], [], []]},
            {"lambda": 0.2, "k": 8, "sigma": 1.0, "texts": knn_texts, "neighbours": [[1], [2], [3]]},
        ],
    }
    (tmp_path / "scored.json").write_text(json.dumps(record))
    write_table(pl.DataFrame(
        {"eval_set": ["valid"], "datastore": ["d"], "lambda": [0.2], "k": [8], "sigma": [1.0], "chosen_on": ["valid"]}
    ), tmp_path / "ppl.csv", tmp_path / "ppl.parquet")
    p = {"entry": REG["bbh"], "task": "bbh", "datastore": "d", "model": "m"}
    out = [tmp_path / f for f in ("sweep.csv", "sweep.parquet", "pred.parquet", "summary.json")]
    s = evaluate.sweep_task(None, tmp_path / "scored.json", tmp_path / "items.parquet", p, tmp_path / "ppl.csv", *out)
    assert s["base"] == pytest.approx(0.75) and s["knn"] == pytest.approx(0.25)
    assert pl.read_csv(out[0])["score"].to_list() == pytest.approx([0.25])
    preds = pl.read_parquet(out[2])
    assert preds["base_score"].to_list() == [1.0, 0.0, 1.0]


# ------------------------------------------------------------------------------------------- NQ, HotpotQA, DROP
def test_nq_and_hotpotqa_prompts_are_the_zero_shot_answer_these_questions_form():
    nq = items("nq_open")
    # eval_qa.py: rows with an answer ")" are dropped; the question gets a '?' and a lower-case first letter
    assert [it["answers"] for it in nq] == [["Paris", "paris"], ["William Shakespeare"], ["1989", "9 November 1989"]]
    assert [it["context"] for it in nq] == [
        "Answer these questions:\nQuestion: what is the capital of france?\nAnswer:",
        "Answer these questions:\nQuestion: who wrote hamlet?\nAnswer:",
        "Answer these questions:\nQuestion: when did the Berlin Wall fall?\nAnswer:",
    ]
    hp = items("hotpotqa")
    assert hp[0]["context"] == (
        "Answer these questions:\nQuestion: were Scott Derrickson and Ed Wood of the same nationality?\nAnswer:"
    )
    assert "Scott Derrickson is an American director" not in hp[0]["context"]  # closed book
    for t in ("nq_open", "hotpotqa", "drop"):
        assert REG[t]["max_new_tokens"] == 15 and REG[t]["stop"] == ["\n"]


def test_drop_prompt_is_the_passage_then_the_question():
    its = items("drop")
    for it, r in zip(its, rows("drop"), strict=True):
        q = r["question"] if r["question"].endswith("?") else r["question"] + "?"
        q = q[0].lower() + q[1:]
        assert it["context"] == (
            r["passage"] + "\n\nBased on these texts, answer these questions:\nQuestion: " + q + "\nAnswer:"
        )
    assert its[0]["context"].endswith("Question: how many points did the Raiders score in the first half?\nAnswer:")


@pytest.mark.parametrize(
    "pred, golds, f1",
    [
        ("Yes, they were both American", ["yes"], 1.0),  # yes/no golds: a substring of the prediction
        ("no", ["yes"], 0.0),
        ("not sure", ["no"], 1.0),  # ... even inside a word ("no" in "not sure")
        ("Chief of Protocol of the United States", ["Chief of Protocol"], 2 * 0.5 * 1 / 1.5),
        ("Paris", ["Paris", "paris"], 1.0),
        ("", ["Paris"], 0.0),
        ("William", ["William Shakespeare", "Shakespeare"], 2 / 3),
    ],
)
def test_qa_f1_is_eval_qa_f1(pred, golds, f1):
    assert metrics.qa_f1(pred, golds) == pytest.approx(f1)


@pytest.mark.parametrize(
    "pred, golds, f1",
    [
        ("12 points", ["12", "twelve"], 1.0),  # numeric gold: a whole number of the prediction
        ("112", ["12"], 0.0),
        ("12.5", ["12"], 0.0),  # normalised to "125"
        ("1520", ["1,520"], 1.0),  # the gold normalises to "1520"
        ("twelve points", ["12", "twelve"], 2 * 0.5 * 1 / 1.5),  # token F1 for the word gold
        ("the Raiders", ["Raiders"], 1.0),
        ("In 1520 the city fell", ["1520"], 1.0),
    ],
)
def test_drop_f1_is_eval_drop_f1(pred, golds, f1):
    assert metrics.drop_f1(pred, golds) == pytest.approx(f1)


# ------------------------------------------------------------------------------------------- choice tasks
def test_choice_premises_are_the_question_alone_and_hypotheses_space_choice():
    for task, stem in (
        ("openbookqa", "question_stem"),
        ("arc_easy", "question"),
        ("arc_challenge", "question"),
        ("mmlu", "question"),
    ):
        for it, r in zip(items(task), rows(task), strict=True):
            texts = r["choices"]["text"] if isinstance(r["choices"], dict) else r["choices"]
            assert it["options"] == [[[r[stem], " " + t]] for t in texts]
            assert it["domain"] is None  # lm score: no PMI
        assert REG[task]["metric"] == "accuracy" and REG[task]["domain"] == " the answer is:"
    assert REG["openbookqa"]["source"]["name"] == "additional"
    assert items("arc_easy")[1]["gold"] == 0  # answerKey "1" among labels "1".."4": scored, not dropped


def test_hellaswag_premise_and_endings_are_cleaned_as_the_paper():
    its = items("hellaswag")
    assert its[0]["options"][0] == [["Baking: A woman rolls dough. she", " puts the dough in the oven."]]
    # strip, " [title]" -> ". ", drop [..], one pass of "  " -> " " (worked by hand from eval_pmi.py preprocess)
    assert its[2]["question"] == "Home and Garden: How to water a plant. Check the soil."
    assert [o[0][1] for o in its[2]["options"]] == [
        "  Pour water slowly.",
        " Eat the plant.",
        " Paint the pot blue.",
        " Sell the soil.",
    ]
    assert REG["hellaswag"]["metric"] == "accuracy"


def test_winogrande_context_is_the_sentence_to_the_blank_plus_the_option():
    it = items("winogrande")[0]
    assert it["options"] == [
        [["The ball broke the window because the ball", " was heavy."]],
        [["The ball broke the window because the window", " was heavy."]],
    ]
    e = copy.deepcopy(REG["winogrande"])
    row = {"sentence": "He put _ away.", "option1": "it ", "option2": "them", "answer": "2"}
    # the option is appended as it is (no rstrip), as partial_context does
    assert task_items.make_item(e, row, 0)["options"][0][0] == ["He put it ", " away."]


# ------------------------------------------------------------------------------------------- checks
@pytest.mark.parametrize(
    "task, change, field",
    [
        ("gsm8k", lambda e: e["fewshot"].pop("examples"), "fewshot"),
        ("gsm8k", lambda e: e["fewshot"].update({"from": "random"}), "fewshot"),
        ("bbh", lambda e: e["fewshot"].pop("k"), "fewshot"),
        ("bbh", lambda e: e["fewshot"].update({"template": 3}), "fewshot"),
        ("bbh", lambda e: e.pop("group"), "group"),
        ("bbh", lambda e: e.update({"aggregate": "median"}), "aggregate"),
        ("bbh", lambda e: e.update({"stop": "\n"}), "stop"),
        ("bbh", lambda e: e.update({"max_new_tokens": 0}), "max_new_tokens"),
        ("nq_open", lambda e: e.update({"exclude": {"field": "answer"}}), "exclude"),
        ("nq_open", lambda e: e.update({"clean": {"fields": {"question": "nope"}}}), "clean"),
        ("hellaswag", lambda e: e.update({"clean": {"passage": "hellaswag"}}), "clean"),
        ("hellaswag", lambda e: e.update({"aggregate": "macro", "group": "activity_label"}), "aggregate"),
        ("sst2", lambda e: e.update({"fewshot": {"from": "inline", "examples": ["x"]}}), "fewshot"),
        ("gsm8k", lambda e: e["answers"].update({"extract": "last"}), "answers"),
        ("gsm8k", lambda e: e.update({"metric": "accuracy"}), "metric"),
    ],
)
def test_a_bad_reasoning_field_is_refused_naming_it(task, change, field):
    e = copy.deepcopy(REG[task])
    change(e)
    with pytest.raises(registry.TaskError, match=f"field '{field}'"):
        registry.check_entry("x", e)


def test_a_subtask_with_no_row_left_after_its_shots_is_refused(tmp_path):
    f = tmp_path / "bbh.jsonl"
    f.write_text(
        "".join(
            json.dumps({"input": f"q{i}", "target": "t", "subset": s}) + "\n"
            for i, s in enumerate(["a", "a", "a", "a", "b", "b", "b"])
        )
    )
    with pytest.raises(registry.TaskError, match=r"\['b'\]"):
        task_items.load_items(REG["bbh"], data_files=str(f))


def test_inline_fewshot_and_clean_are_generic(tmp_path):
    e = {
        "category": "reasoning",
        "kind": "generate",
        "metric": "em",
        "source": {"type": "local", "path": "x"},
        "prompt": "Q: {q}\nA:",
        "answers": {"field": "a"},
        "clean": {"fields": {"q": "question"}},
        "fewshot": {"from": "inline", "prefix": "P\n", "join": "\n\n", "examples": ["Q: a?\nA: 1", "Q: b?\nA: 2"]},
    }
    registry.check_entry("mine", e)
    it = task_items.make_item(e, {"q": "What", "a": "3"}, 0)
    assert it["context"] == "P\nQ: a?\nA: 1\n\nQ: b?\nA: 2\n\nQ: what?\nA:"
    assert np.isclose(metrics.exact_match(" 3 ", it["answers"]), 1.0)


def test_generation_keeps_the_prompt_within_the_models_window_not_the_datastores():
    class Cfg:
        max_position_embeddings = 4096

    class Model:
        config = Cfg()

    # GSM8K: 512 new tokens; with block_size 1024 the 8 exemplars would be cut, the model's 4096 keeps them
    assert scoring.generation_window(Model(), 1024, 512) == 3584
    assert scoring.generation_window(object(), 1024, 15) == 1009  # no config: the datastore's window
    with pytest.raises(ValueError, match="max_new_tokens 1024"):
        scoring.generation_window(object(), 1024, 1024)
