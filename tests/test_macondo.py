"""Macondo (paper 2, §4.2 / App. B.1): the generator's invariants with the paper's defaults and small random
configurations, determinism, the files ``write`` makes and the errors for unusable lists and templates."""

from __future__ import annotations

import math
import re
from collections import Counter

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workflow_scripts.analyses import macondo_data as macondo
from workflow_scripts.analyses.macondo_data import (
    DESCS,
    LISTS,
    MacondoError,
    generate,
    load_list,
    single_token,
    vocab_names,
)
from workflow_scripts.artifacts import read_json

EOS = "<|endoftext|>"
TRAIN_RE = re.compile(r"(?P<villager>[^,]+), who (?P<desc>.+), is the parent of (?P<child>\S+)")


def _bpe(texts, vocab_size):
    from workflow_scripts.lm import bpe_tokenizer

    return bpe_tokenizer(texts, vocab_size)


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE that has most shipped given names as single tokens (as GPT-2 has common names)."""
    given = load_list("shipped", "given_names")
    return _bpe([" ".join(given)] * 3 + [" ".join(load_list("shipped", "surnames"))], 3000)


@pytest.fixture(scope="module")
def paper(tok):
    return generate({}, 0, tok)


def check_invariants(data: dict, cfg: dict, tok) -> None:
    cfg = {**macondo.DEFAULTS, **cfg}
    villagers = {v["name"]: v for v in data["villagers"]}
    assert len(data["villagers"]) == len(villagers) == cfg["n_villagers"]
    assert all(len(v["name"].split(" ")) >= 2 for v in data["villagers"])
    given_names = {v["name"].split(" ")[0] for v in data["villagers"]}

    # attributes: the seven of App. B.1, within their ranges, marriage >= birth + 18
    (b_lo, b_hi), (m_lo, m_hi) = cfg["birth_years"], cfg["marriage_years"]
    for v in data["villagers"]:
        a = v["attributes"]
        assert set(a) == set(DESCS)
        assert b_lo <= a["birth_year"] <= b_hi
        assert m_lo <= a["marriage_year"] <= m_hi
        assert a["marriage_year"] >= a["birth_year"] + 18
        assert a["friend"] in villagers and a["friend"] != v["name"]

    # parents and children
    parents = [v for v in data["villagers"] if v["children"]]
    assert len(parents) == cfg["n_parents"]
    assert all(cfg["min_children"] <= len(v["children"]) <= cfg["max_children"] for v in parents)
    children = [c for v in parents for c in v["children"]]
    assert len(children) == len(set(children)) == data["meta"]["n_pairs"]
    assert single_token(tok, children) == children
    assert not set(children) & given_names
    assert data["meta"]["n_child_candidates"] >= len(children)

    # training sentences: floor/ceil per pair, each states one true attribute of the parent
    pairs = {(v["name"], c) for v in parents for c in v["children"]}
    assert len(data["train"]) == cfg["n_train"]
    seen = Counter()
    for s in data["train"]:
        m = TRAIN_RE.fullmatch(s)
        assert m, s
        v = villagers[m["villager"]]
        assert m["child"] in v["children"]
        assert m["desc"] in {DESCS[k].format(x) for k, x in v["attributes"].items()}, s
        seen[m["villager"], m["child"]] += 1
    q = cfg["n_train"] / len(pairs)
    assert all(math.floor(q) <= seen[p] <= math.ceil(q) for p in pairs)
    assert set(seen) <= pairs

    # test items: one per pair, no description, context + continuation == text
    assert len(data["test"]) == len(pairs)
    assert {(t["villager"], t["child"]) for t in data["test"]} == pairs
    for t in data["test"]:
        assert " who " not in t["text"]
        assert t["text"] == f"{t['villager']}, is the parent of {t['child']}"
        assert t["context"] + t["continuation"] == t["text"]
        assert t["continuation"] == " " + t["child"]
        assert t["n_children"] == len(villagers[t["villager"]]["children"])


def test_paper_defaults(paper, tok):
    check_invariants(paper, {}, tok)
    assert len(paper["villagers"]) == 500 and len(paper["train"]) == 1500
    assert sum(1 for v in paper["villagers"] if v["children"]) == 100
    assert paper["meta"]["seed"] == 0 and paper["meta"]["child_names"] == "shipped"
    # every kind of description occurs
    assert all(any(re.search(f"who {d.format('')}", s) for s in paper["train"]) for d in DESCS.values())


def test_vocab_child_names(tok):
    data = generate({"child_names": "vocab"}, 3, tok)
    check_invariants(data, {}, tok)
    words = {w for v in data["villagers"] for w in v["name"].split()}
    children = {c for v in data["villagers"] for c in v["children"]}
    assert not children & words
    assert not children & {"Who", "Parent", "Born", "Married"}


def test_child_names_path(tok, tmp_path):
    names = load_list("shipped", "given_names")[::-1]
    f = tmp_path / "kids.txt"
    f.write_text("# my list\n\n" + "\n".join(names) + "\n")
    data = generate({"child_names": str(f), "n_villagers": 50, "n_parents": 10, "n_train": 100}, 1, tok)
    check_invariants(data, {"n_villagers": 50, "n_parents": 10, "n_train": 100}, tok)
    assert data["meta"]["child_names"] == str(f)


def test_deterministic(tok, paper):
    assert generate({}, 0, tok) == paper
    other = generate({}, 1, tok)
    assert other["train"] != paper["train"] and other["villagers"] != paper["villagers"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n_villagers=st.integers(2, 40),
    parent_frac=st.floats(0, 1),
    children=st.tuples(st.integers(1, 4), st.integers(0, 3)),
    n_train=st.integers(0, 120),
    birth_lo=st.integers(1800, 2005),
    seed=st.integers(0, 2**32),
    child_names=st.sampled_from(["shipped", "vocab"]),
)
def test_small_configs_keep_invariants(tok, n_villagers, parent_frac, children, n_train, birth_lo, seed, child_names):
    cfg = {
        "n_villagers": n_villagers,
        "n_parents": max(1, round(parent_frac * n_villagers)),
        "min_children": children[0],
        "max_children": children[0] + children[1],
        "n_train": n_train,
        "birth_years": [birth_lo, birth_lo + 10],  # past 2005: clamped so that marriage by 2023 is possible
        "child_names": child_names,
    }
    check_invariants(generate(cfg, seed, tok), cfg, tok)


def test_write(paper, tmp_path):
    out = tmp_path / "out"
    macondo.write(paper, out / "train.parquet", out / "test.parquet", out / "macondo.json")
    train = pl.read_parquet(tmp_path / "out" / "train.parquet")
    test = pl.read_parquet(tmp_path / "out" / "test.parquet")
    assert train.columns == ["text"] and train["text"].to_list() == paper["train"]
    assert test.columns == list(macondo.TEST_COLUMNS) and test.to_dicts() == paper["test"]
    saved = read_json(tmp_path / "out" / "macondo.json")
    assert saved == {"villagers": paper["villagers"], "meta": paper["meta"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["macondo.json", "test.parquet", "train.parquet"]


def test_too_few_child_names(tok, tmp_path):
    f = tmp_path / "few.txt"
    f.write_text("\n".join(load_list("shipped", "given_names")[-40:]) + "\n")
    cfg = {"child_names": str(f), "min_children": 2, "max_children": 2}
    with pytest.raises(MacondoError, match=r"needs 200 distinct single-token child names.*vocab size 3000.*vocab"):
        generate(cfg, 0, tok)


def test_tiny_tokenizer_has_too_few_names():
    tiny = _bpe(["the parent of Ann and Bob and Bob and Ann"] * 5, 300)
    with pytest.raises(MacondoError, match=r"needs \d+ .* only \d+ single-token names.*child_names: vocab"):
        generate({}, 0, tiny)


@pytest.mark.parametrize("content", [None, "", "\n\n", "# only a comment\n  \n"])
def test_missing_or_empty_list(tmp_path, content, tok):
    f = tmp_path / "cities.txt"
    if content is not None:
        f.write_text(content)
    with pytest.raises(MacondoError, match=rf"'cities'.*{re.escape(str(f))}"):
        load_list(str(f), "cities")
    with pytest.raises(MacondoError, match=r"'cities'"):
        generate({"cities": str(f)}, 0, tok)


def test_load_list_format(tmp_path):
    f = tmp_path / "l.txt"
    f.write_text("# header\nParis\n\n  Lima  \nParis\n#x\nSao Paulo\n", encoding="utf-8")
    assert load_list(str(f), "cities") == ["Paris", "Lima", "Sao Paulo"]


def test_shipped_lists():
    sizes = {name: len(load_list("shipped", name)) for name in LISTS}
    assert sizes["given_names"] >= 1000 and sizes["surnames"] >= 1000
    assert min(sizes["cities"], sizes["universities"], sizes["companies"]) >= 50
    for name in LISTS:
        assert (macondo.DATA_DIR / f"{name}.txt").read_text().startswith("# ")  # source and licence
    assert all(n.isalpha() and n.istitle() for n in load_list("shipped", "given_names"))


def test_bad_configs(tok, tmp_path):
    with pytest.raises(MacondoError, match="test_template"):
        generate({"test_template": "{child} is a child of {villager}"}, 0, tok)
    with pytest.raises(MacondoError, match="train_template"):
        generate({"train_template": "{villager}, who {desc}, is the parent of {child}."}, 0, tok)
    with pytest.raises(MacondoError, match="test_template"):
        generate({"test_template": "{villager}, who {desc}, is the parent of {child}"}, 0, tok)
    with pytest.raises(MacondoError, match="marriage"):
        generate({"birth_years": [2010, 2020]}, 0, tok)
    with pytest.raises(MacondoError, match="distinct full names"):
        (tmp_path / "g.txt").write_text("Ann\nBob\n")
        (tmp_path / "s.txt").write_text("Lee\n")
        generate({"given_names": str(tmp_path / "g.txt"), "surnames": str(tmp_path / "s.txt")}, 0, tok)


def test_single_token_and_vocab_names(tok):
    assert single_token(tok, []) == []
    assert single_token(tok, ["Mary", "Xqzvwkj"]) == ["Mary"]
    names = vocab_names(tok)
    assert names == sorted(names) and len(names) > 1000
    assert "Mary" in names and "Mary" not in vocab_names(tok, exclude={"Mary"})
    assert all(re.fullmatch(r"[A-Z][a-z]{2,}", n) for n in names)
    assert single_token(tok, names) == names
    assert EOS not in names


def test_vocab_names_skips_lowercase_and_short():
    t = _bpe(["apple Apple Al al Ed Zed Zed Zed Peru Peru"] * 20, 300)
    names = vocab_names(t)
    assert "apple" not in names and "Al" not in names and "Ed" not in names
    assert {"Zed", "Peru", "Apple"} <= set(names)
