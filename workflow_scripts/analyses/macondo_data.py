"""Macondo: the synthetic over-specification dataset of paper 2 (§4.2 and App. B.1 of "On Retrieval Augmentation
and the Limitations of Language Model Training").

A village of ``n_villagers`` people, each with a unique full name "Given Surname" and the seven attributes of
App. B.1 (the appendix says six but lists seven): year of birth, city of birth, city lived in, a friend (another
villager), university, year of marriage (at least 18 years after birth) and employer. ``n_parents`` villagers have
``min_children``..``max_children`` children, whose given names are single tokens for the tokenizer under study and
distinct across the dataset, so a test item scores exactly one next token.

* Training sentences are over-specified: "{villager}, who {desc}, is the parent of {child}", where ``{desc}``
  states one uniformly random attribute of the parent, irrelevant to the parent-child relation. The
  (parent, child) pairs are shuffled and cycled, so each pair gets ``floor`` or ``ceil`` of ``n_train / #pairs``
  sentences.
* Test items drop the description: "{villager}, is the parent of {child}", one per (parent, child) pair. A
  perfect LM gives each child of a parent probability ``1 / #children``.

``generate`` returns the dataset as plain Python objects; ``write`` stores it as ``train.parquet`` (column
``text``), ``test.parquet`` and ``macondo.json`` (villagers and meta data). All random choices come from one
``random.Random(seed)``, so a seed and a tokenizer fix the dataset.

Name lists ship under ``analyses/macondo_names/`` (given names and surnames from the US Census 1990 files,
public domain; cities, universities and Californian companies written for this project); the paper's lists
(Kantrowitz's name corpus, simplemaps' world cities, ...) are replaced by these. Any list can be replaced by a
path to a text file, one entry per line.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

import polars as pl

from ..artifacts import atomic_path, write_json
from ..cli import step
from ..config import defaults

LISTS = ("given_names", "surnames", "cities", "universities", "companies")
DATA_DIR = Path(__file__).resolve().parent / "macondo_names"

# attribute -> the relative clause that states it (App. B.1); ``{}`` is the attribute's value
DESCS = {
    "birth_year": "was born in {}",
    "birth_city": "was born in {}",
    "living_city": "used to live in {}",
    "friend": "was a friend of {}",
    "university": "graduated from {}",
    "marriage_year": "married in {}",
    "company": "used to work for {}",
}

DEFAULTS = defaults("analyses", "macondo", "generate")  # the schema's: the paper's values


class MacondoError(ValueError):
    """The configuration cannot produce a Macondo dataset (a list missing or too small, a bad template, ...)."""


# ------------------------------------------------------------------------------------------------ name lists
def load_list(spec: str, name: str) -> list[str]:
    """The entries of list ``name``: ``spec`` "shipped" reads ``macondo_names/<name>.txt``, anything else is a path.

    One entry per line, surrounding white space stripped; blank lines and lines starting with '#' are ignored,
    duplicates removed keeping the first occurrence.
    """
    path = DATA_DIR / f"{name}.txt" if spec == "shipped" else Path(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MacondoError(f"macondo list {name!r}: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MacondoError(f"macondo list {name!r}: cannot read {path} as UTF-8 text ({e})") from e
    entries = (line.strip() for line in text.splitlines())
    out = list(dict.fromkeys(e for e in entries if e and not e.startswith("#")))
    if not out:
        raise MacondoError(f"macondo list {name!r}: {path} has no entries (blank lines and '#' comments only)")
    return out


def single_token(tokenizer, names) -> list[str]:
    """The names ``n`` (in the given order) for which ``" " + n`` is exactly one token: the child's name follows
    "... is the parent of", so it is scored as the single token after a space."""
    names = list(names)
    if not names:
        return []
    ids = tokenizer([" " + n for n in names], add_special_tokens=False)["input_ids"]
    return [n for n, i in zip(names, ids, strict=True) if len(i) == 1]


def _capitalised_word(w: str) -> bool:
    return len(w) >= 3 and w.isalpha() and w[0].isupper() and (w[1:].islower())


def vocab_names(tokenizer, exclude=()) -> list[str]:
    """Child-name candidates from the tokenizer's own vocabulary, for tokenizers (e.g. a tiny BPE trained on a
    synthetic corpus) that have few real given names as tokens.

    A token qualifies when it decodes to ``" " + w`` with ``w`` a capitalised alphabetic word of at least three
    letters (first letter upper case, the rest lower case) and ``" " + w`` encodes back to that one token (a BPE
    vocabulary can hold tokens its merges never produce). Returns the words, sorted, without those in ``exclude``.
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    words = {t[1:] for t in texts if t.startswith(" ") and _capitalised_word(t[1:])}
    words -= set(exclude)
    return single_token(tokenizer, sorted(words))


# ------------------------------------------------------------------------------------------------ generation
def _check_template(cfg: dict, key: str, fields: tuple[str, ...]) -> str:
    template = cfg[key]
    if not isinstance(template, str) or not template.endswith(" {child}"):
        raise MacondoError(
            f"macondo {key} {template!r} must end with ' {{child}}': the child's name is the continuation scored"
        )
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise MacondoError(f"macondo {key} {template!r}: {e}") from e
    if not names <= set(fields) or template.count("{child}") != 1 or "{villager}" not in template:
        raise MacondoError(
            f"macondo {key} {template!r} may use only {', '.join('{' + f + '}' for f in fields)}, "
            "with {villager} present and {child} once, at the end"
        )
    return template


def _years(cfg: dict) -> tuple[int, int, int, int, int]:
    (b_lo, b_hi), (m_lo, m_hi) = (map(int, cfg["birth_years"]), map(int, cfg["marriage_years"]))
    age = int(cfg["min_marriage_age"])
    b_hi = min(b_hi, m_hi - age)  # someone born later could not marry within the marriage years
    if b_lo > b_hi or m_lo > m_hi:
        raise MacondoError(
            f"macondo birth_years {cfg['birth_years']} and marriage_years {cfg['marriage_years']}: nobody can be "
            f"born in the first range and marry at least {age} years later within the second"
        )
    return b_lo, b_hi, m_lo, m_hi, age


def _check_counts(cfg: dict) -> None:
    n_v, n_p, lo, hi, n_train = (
        int(cfg[k]) for k in ("n_villagers", "n_parents", "min_children", "max_children", "n_train")
    )
    if n_v < 2:
        raise MacondoError(f"macondo n_villagers {n_v}: need at least 2 (every villager has a friend)")
    if not 1 <= n_p <= n_v:
        raise MacondoError(f"macondo n_parents {n_p}: must be between 1 and n_villagers ({n_v})")
    if not 1 <= lo <= hi:
        raise MacondoError(f"macondo min_children {lo}, max_children {hi}: need 1 <= min_children <= max_children")
    if n_train < 0:
        raise MacondoError(f"macondo n_train {n_train}: must be >= 0")


def _words(text: str) -> set[str]:
    """The words of ``text`` as they could appear as a capitalised name: each word and its title-cased form."""
    ws = "".join(c if c.isalpha() else " " for c in text).split()
    return set(ws) | {w.title() for w in ws}


def generate(cfg: dict, seed: int, tokenizer) -> dict:
    """Generate the Macondo dataset for ``cfg`` (keys of ``DEFAULTS``; missing keys take the paper's values).

    ``child_names``: "shipped" (the given-name list), "vocab" (``vocab_names`` of the tokenizer) or a path; in
    every case only names that are single tokens for ``tokenizer`` are used, and never a word that appears in a
    villager's name, in an attribute value or in the templates, so a child's name occurs only as a child.
    """
    cfg = {**DEFAULTS, **cfg}
    _check_counts(cfg)
    train_t = _check_template(cfg, "train_template", ("villager", "desc", "child"))
    test_t = _check_template(cfg, "test_template", ("villager", "desc", "child"))
    if "{desc}" in test_t:
        raise MacondoError(f"macondo test_template {test_t!r} must not contain {{desc}}: test items state no attribute")
    b_lo, b_hi, m_lo, m_hi, age = _years(cfg)
    lists = {name: load_list(cfg[name], name) for name in LISTS}
    rng = random.Random(seed)

    # villagers: unique full names, drawn uniformly among the given x surname combinations without repetition
    n_v = int(cfg["n_villagers"])
    given, surnames = lists["given_names"], lists["surnames"]
    if n_v > len(given) * len(surnames):
        raise MacondoError(
            f"macondo n_villagers {n_v}: the lists make only {len(given)} x {len(surnames)} = "
            f"{len(given) * len(surnames)} distinct full names"
        )
    combos = rng.sample(range(len(given) * len(surnames)), n_v)
    full = [(given[c // len(surnames)], surnames[c % len(surnames)]) for c in combos]
    names = [f"{g} {s}" for g, s in full]

    villagers = []
    for i, name in enumerate(names):
        birth = rng.randint(b_lo, b_hi)
        friend = rng.randrange(n_v - 1)
        attributes = {
            "birth_year": birth,
            "birth_city": rng.choice(lists["cities"]),
            "living_city": rng.choice(lists["cities"]),
            "friend": names[friend + (friend >= i)],  # anyone but oneself
            "university": rng.choice(lists["universities"]),
            "marriage_year": rng.randint(max(m_lo, birth + age), m_hi),
            "company": rng.choice(lists["companies"]),
        }
        villagers.append({"name": name, "attributes": attributes, "children": []})

    # children: distinct single-token given names that occur nowhere else in the dataset
    parents = sorted(rng.sample(range(n_v), int(cfg["n_parents"])))
    counts = [rng.randint(int(cfg["min_children"]), int(cfg["max_children"])) for _ in parents]
    taken = set()
    for v in villagers:
        taken |= _words(v["name"])
        taken |= {w for k, x in v["attributes"].items() if k != "friend" for w in _words(str(x))}
    taken |= _words(train_t.format(villager="", desc=" ".join(DESCS.values()), child="")) | _words(
        test_t.format(villager="", child="")
    )
    spec = cfg["child_names"]
    if spec == "vocab":
        single = vocab_names(tokenizer)
        source = "the tokenizer's vocabulary has"
    else:
        listed = lists["given_names"] if spec == "shipped" else load_list(spec, "child_names")
        single = single_token(tokenizer, listed)
        source = f"the child_names list ({spec}, {len(listed)} names) has"
    pool = [n for n in single if n not in taken]
    need = sum(counts)
    if need > len(pool):
        raise MacondoError(
            f"macondo needs {need} distinct single-token child names for {len(parents)} parents, but {source} "
            f"only {len(single)} single-token names for this tokenizer (vocab size {len(tokenizer)}), "
            f"{len(pool)} of them not used elsewhere in the dataset; "
            + (
                "use fewer parents or children, or a tokenizer with a larger vocabulary"
                if cfg.get("child_names") == "vocab"
                else "use child_names: vocab or a larger list"
            )
        )
    child_names = rng.sample(pool, need)
    pairs = []
    for p, k in zip(parents, counts, strict=True):
        villagers[p]["children"] = child_names[:k]
        child_names = child_names[k:]
        pairs += [(p, c) for c in villagers[p]["children"]]

    # training sentences: every pair floor or ceil of n_train / #pairs times, each with a random description
    order = pairs[:]
    rng.shuffle(order)
    train = []
    for j in range(int(cfg["n_train"])):
        p, child = order[j % len(order)]
        attr = rng.choice(list(DESCS))
        desc = DESCS[attr].format(villagers[p]["attributes"][attr])
        train.append(train_t.format(villager=villagers[p]["name"], desc=desc, child=child))
    rng.shuffle(train)

    test = []
    for p, child in pairs:
        text = test_t.format(villager=villagers[p]["name"], child=child)
        continuation = " " + child
        assert text.endswith(continuation)
        test.append(
            {
                "villager": villagers[p]["name"],
                "child": child,
                "n_children": len(villagers[p]["children"]),
                "context": text[: -len(continuation)],
                "continuation": continuation,
                "text": text,
            }
        )
    meta = {"n_pairs": len(pairs), "n_child_candidates": len(pool), "child_names": spec, "seed": seed}
    return {"train": train, "test": test, "villagers": villagers, "meta": meta}


TEST_COLUMNS = ("villager", "child", "n_children", "context", "continuation", "text")


def write(data: dict, train_parquet, test_parquet, world_json) -> None:
    """Write the training sentences (column ``text``), the test items (``TEST_COLUMNS``) and the villagers with
    the generation's meta, each atomically."""
    train = pl.DataFrame({"text": data["train"]}, schema={"text": pl.String})
    test = pl.DataFrame(
        {c: [t[c] for t in data["test"]] for c in TEST_COLUMNS},
        schema={c: pl.Int64 if c == "n_children" else pl.String for c in TEST_COLUMNS},
    )
    with atomic_path(train_parquet, suffix=".parquet") as tmp:
        train.write_parquet(tmp)
    with atomic_path(test_parquet, suffix=".parquet") as tmp:
        test.write_parquet(tmp)
    write_json(world_json, {"villagers": data["villagers"], "meta": data["meta"]})


@step
def macondo_data(
    params: dict, train: Path, test: Path, world: Path, tokenizer_dir: Path | None = None,
    model_json: Path | None = None,
) -> None:
    """One seed's Macondo dataset; children's names checked to be single tokens for the model's tokenizer
    (--tokenizer-dir for a model trained here, --model-json for a local or hub model)."""
    from ..lm import tokenizer_of

    write(generate(params["generate"], params["seed"], tokenizer_of(tokenizer_dir, model_json)), train, test, world)
