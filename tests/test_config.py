"""Config validation: the shipped config passes with defaults; every invalid one fails naming its key path."""

import copy
import logging
import re
from pathlib import Path

import pytest
import yaml
from conftest import load_test_config, write_paper_data
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts.config import ConfigError, load, validate
from workflow_scripts.tasks.registry import check_config, synthetic_tasks

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs"
VALID = load(ROOT / "config.yaml")
UNKNOWN = "zz_unknown"


def fresh() -> dict:
    return copy.deepcopy(VALID)


def set_at(config, path, value):
    node = config
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value


def check(config) -> dict:
    """Validate as the workflow does before building its DAG (rules/common.smk): the schema and cross-checks
    (config.validate), then the task section against the task registry (tasks.registry.check_config)."""
    validate(config)
    check_config(config)
    return config


def rejects(config, *fragments) -> str:
    """Validation raises ConfigError whose message contains every fragment (key paths, mostly)."""
    with pytest.raises(ConfigError) as err:
        check(config)
    msg = str(err.value)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    return msg


# ------------------------------------------------------------------------------------------- valid


def test_shipped_config_validates_with_defaults():
    c = load(ROOT / "config.yaml")
    assert c["sweep"]["k_max"] == max(c["sweep"]["ks"]) == 2048
    assert c["models"]["tiny-gpt2"]["trust_remote_code"] is False
    assert c["index"]["type"] == "Flat" and c["index"]["nprobe"] == 32
    assert set(c) == {
        "seed", "corpora", "models", "datastores", "eval_sets", "extraction", "index", "sweep", "tasks", "analyses",
        "retrieval", "scaling", "neighbours", "arithmetic_threads", "rule_threads", "incontext",
    }
    assert c["incontext"] == {"datastores": ["synthwiki"], "max_tokens": 1024, "max_items": 100, "passage_tokens": 32,
                              "passages": 1, "query_tokens": 32, "stride": 4, "leak_ngram": 32, "tasks": True,
                              "n_boot": 1000}  # a smaller setting than the schema's (docs/incontext.md)
    assert c["arithmetic_threads"] == 2  # the threads the default run's steps used on 2 cores (docs/conventions.md)
    assert c["rule_threads"] == {}  # no rule computes on other threads than that
    assert c["neighbours"] == {"positions": 5, "items_per_task": 5, "neighbours": 4, "window": 24}
    assert c["retrieval"] == {"chunks": 1}  # one retrieval job per (eval set, datastore) unless asked
    assert c["index"]["polysemous"] is False and c["index"]["retrain"] is False
    assert c["scaling"] == {"datastores": ["synthwiki"], "fractions": [0.003, 0.01, 0.03, 0.1, 1], "seed": 0,
                            "n_boot": 1000}
    c.pop("scaling")  # the schema's defaults, as the docs give them
    c["scaling"] = {"datastores": ["synthwiki"]}
    assert validate(copy.deepcopy(c))["scaling"]["fractions"] == [0.01, 0.03, 0.1, 0.3, 1]
    c = load(ROOT / "config.yaml")
    a = c["analyses"]  # paper 2's values filled in where the config leaves them
    assert a["macondo"]["knn"] == {"k": 1024, "lambda": 0.25, "sigma": 1.0}
    assert a["macondo"]["generate"]["n_villagers"] == 500 and a["macondo"]["generate"]["n_train"] == 1500
    again = validate(copy.deepcopy(c))  # idempotent on an already-validated config
    assert again == c


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("macondo", {"model": "nope"}, "analyses.macondo.model: 'nope' is not one of the models"),
        ("projection", {"datastore": "synthwiki", "eval_set": "dev"}, "analyses.projection.eval_set"),
        ("mlp", {"datastore": "nope"}, "analyses.mlp.datastore"),
        ("macondo", {"model": "tiny-gpt2", "knn": {"k": 0}}, "analyses.macondo.knn.k"),
        ("hurdle", {"model": "tiny-gpt2"}, "analyses.hurdle: needs analyses.macondo too"),
    ],
)
def test_bad_analyses_entries_name_the_key(key, value, message):
    c = yaml.safe_load((ROOT / "config.yaml").read_text())
    c["analyses"] = {key: value}
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c)


def test_micro_config_validates():
    c = check(load(CONFIGS / "micro.yaml"))
    assert c["sweep"]["k_max"] == 32
    assert c["models"]["micro-gpt2"]["train"]["warmup_fraction"] == 0.05


def _raw(name: str) -> dict:
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def test_every_test_config_validates_and_says_how_it_is_used(tmp_path, monkeypatch):
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert names == ["analyses", "full", "ivfpq", "micro", "paper_tasks", "tasks"]
    for name in names:
        if name == "paper_tasks":  # its memory tasks read paper_data/, which its fixture writes into the run
            with monkeypatch.context() as m:
                m.chdir(write_paper_data(tmp_path / "paper_data", ["one two three four five ."] * 12).parent)
                check(load(CONFIGS / f"{name}.yaml"))
            continue
        check(load(CONFIGS / f"{name}.yaml"))
        header = (CONFIGS / f"{name}.yaml").read_text().split("\n\n")[0]
        assert "Used by:" in header and f"snakemake --cores 2 --configfile tests/configs/{name}.yaml" in header


def test_ivfpq_config_is_the_micro_config_with_an_ivfpq_index_and_three_shards():
    """ivfpq_run and test_slurm rerun copies of the micro run with it: only the datastore's shards and the index
    differ."""
    micro, ivfpq = _raw("micro"), _raw("ivfpq")
    assert ivfpq["index"]["type"] == "IVFPQ" and ivfpq["datastores"]["micro"]["shards"] == 3
    ivfpq["datastores"]["micro"]["shards"] = micro["datastores"]["micro"]["shards"]
    assert {k: v for k, v in ivfpq.items() if k != "index"} == {k: v for k, v in micro.items() if k != "index"}


def analyses_raw() -> dict:
    return _raw("analyses")


def test_tasks_and_analyses_configs_are_the_micro_config_plus_their_own_stages():
    """Their runs start from a copy of the micro run: every backbone setting must be micro's, or the backbone
    would be rebuilt (and the tests that count jobs would fail for a reason that is not theirs)."""
    micro = _raw("micro")
    tasks = _raw("tasks")
    assert {k: v for k, v in tasks.items() if k != "tasks"} == {k: v for k, v in micro.items() if k != "tasks"}
    assert tasks["tasks"]["evaluate"] == {"micro": synthetic_tasks()}  # the whole synthetic suite
    analyses = _raw("analyses")
    long = analyses["models"].pop("micro-long")
    assert long == {"source": "train", "train": {**micro["models"]["micro-gpt2"]["train"], "block_size": 96}}
    assert {k: v for k, v in analyses.items() if k != "analyses"} == micro
    assert set(analyses["analyses"]) == {"macondo", "projection", "mlp", "hurdle"}
    paper = _raw("paper_tasks")  # micro plus a start-token twin of its model, its datastore and the memory tasks
    twin = paper["models"].pop("micro-bos")
    assert twin == {"source": "train", "train": {**micro["models"]["micro-gpt2"]["train"], "start_token": True}}
    assert paper["datastores"].pop("micro-bos") == {**micro["datastores"]["micro"], "model": "micro-bos"}
    assert {k: v for k, v in paper.items() if k != "tasks"} == {k: v for k, v in micro.items() if k != "tasks"}
    full = _raw("full")  # the analyses config with the task stages, the scaling study (one datastore subsampled
    # for real from micro's rows) and in-context retrieval: its run starts from the analyses run
    assert full["datastores"].pop("micro_tenth") == {"subsample": {"of": "micro", "fraction": 0.1, "seed": 5}}
    assert full.pop("scaling") == {"datastores": ["micro"], "seed": 5, "n_boot": 200}
    assert full.pop("incontext") == {"datastores": ["micro"], "passage_tokens": 8, "query_tokens": 8, "n_boot": 200}
    assert {k: v for k, v in full.items() if k != "tasks"} == {k: v for k, v in analyses_raw().items() if k != "tasks"}
    assert full["tasks"] == tasks["tasks"]


def test_omitted_keys_get_schema_defaults():
    c = fresh()
    c["extraction"] = {}
    c["datastores"]["synthwiki"] = {"model": "tiny-gpt2", "corpus": "synthwiki"}
    c["index"] = {"type": "IVFPQ"}
    for k in ("warmup_fraction", "weight_decay", "dropout", "log_every"):
        del c["models"]["tiny-gpt2"]["train"][k]
    c["sweep"]["k_max"] = None
    out = validate(c)
    assert out is c
    assert c["extraction"] == {"block_size": 128, "batch_size": 32, "device": "auto", "dtype": "float16"}
    assert c["datastores"]["synthwiki"]["split"] == "train" and c["datastores"]["synthwiki"]["shards"] == 1
    assert c["index"] == {"type": "IVFPQ", "nlist": 1024, "m": 32, "nbits": 8, "nprobe": 32, "train_sample": 200000,
                          "distances": "exact", "gpu_shard_above_gb": 4, "polysemous": False, "retrain": False}
    assert "select_on" not in c["datastores"]["synthwiki"]  # no default: 'valid' when it exists (rules/common.smk)
    assert c["models"]["tiny-gpt2"]["train"]["log_every"] == 25
    assert c["sweep"]["k_max"] == 2048


def test_k_max_larger_than_max_k_is_kept():
    c = fresh()
    c["sweep"]["k_max"] = 4096
    assert validate(c)["sweep"]["k_max"] == 4096


# ------------------------------------------------------------------------------------------ invalid


def test_unknown_keys_are_rejected_naming_where():
    c = fresh()
    c["bogus"] = 1
    rejects(c, "<top level>", "bogus", "allowed keys")
    c = fresh()
    c["sweep"]["bogus"] = 1
    rejects(c, "config key sweep:", "bogus", "lambdas")
    c = fresh()
    c["models"]["tiny-gpt2"]["train"]["n_layers"] = 4  # a typo of n_layer
    rejects(c, "config key models.tiny-gpt2.train:", "n_layers")
    c = fresh()
    c["corpora"]["synthwiki"]["generate"]["n_peoples"] = 4
    rejects(c, "config key corpora.synthwiki.generate:", "n_peoples")


@pytest.mark.parametrize(("path", "value", "where"), [
    (("seed",), "zero", "seed"),
    (("seed",), -1, "seed"),
    (("seed",), True, "seed"),
    (("sweep", "ks"), "16", "sweep.ks"),
    (("sweep", "ks"), [], "sweep.ks"),
    (("sweep", "ks"), [16, 16], "sweep.ks"),
    (("sweep", "ks", 0), -16, "sweep.ks.0"),
    (("sweep", "ks", 2), 0, "sweep.ks.2"),
    (("sweep", "ks", 1), 2.5, "sweep.ks.1"),
    (("sweep", "lambdas", 1), 1.5, "sweep.lambdas.1"),
    (("sweep", "lambdas", 0), -0.1, "sweep.lambdas.0"),
    (("sweep", "lambdas", 2), "0.3", "sweep.lambdas.2"),
    (("sweep", "sigmas", 0), 0, "sweep.sigmas.0"),
    (("sweep", "sigmas", 3), -2.0, "sweep.sigmas.3"),
    (("sweep", "k_max"), 0, "sweep.k_max"),
    (("sweep", "k_max"), 100, "sweep.k_max"),
    (("index", "type"), "HNSW", "index.type"),
    (("index", "nbits"), 17, "index.nbits"),
    (("index", "nprobe"), "32", "index.nprobe"),
    (("extraction", "device"), "gpu", "extraction.device"),
    (("extraction", "block_size"), 1, "extraction.block_size"),
    (("extraction", "block_size"), 256, "extraction.block_size"),  # exceeds the model's context
    (("datastores", "synthwiki", "model"), "gpt-9", "datastores.synthwiki.model"),
    (("datastores", "synthwiki", "corpus"), "wikitext", "datastores.synthwiki.corpus"),
    (("datastores", "synthwiki", "split"), "dev", "datastores.synthwiki.split"),
    (("datastores", "synthwiki", "shards"), 0, "datastores.synthwiki.shards"),
    (("eval_sets", "valid", "corpus"), "wikitext", "eval_sets.valid.corpus"),
    (("eval_sets", "test", "max_tokens"), 0, "eval_sets.test.max_tokens"),
    (("models", "tiny-gpt2", "train", "corpus"), "wikitext", "models.tiny-gpt2.train.corpus"),
    (("models", "tiny-gpt2", "train", "n_head"), 3, "models.tiny-gpt2.train.n_head"),
    (("models", "tiny-gpt2", "train", "lr"), 0, "models.tiny-gpt2.train.lr"),
    (("models", "tiny-gpt2", "train", "dropout"), 1.5, "models.tiny-gpt2.train.dropout"),
    (("models", "tiny-gpt2", "source"), "hub", "models.tiny-gpt2"),  # then `path` is required
    (("corpora", "synthwiki", "source"), "local", "corpora.synthwiki"),  # then `local` is required
    (("corpora", "synthwiki", "generate", "eval_fraction"), 0.5, "corpora.synthwiki.generate.eval_fraction"),
    (("datastores",), {}, "datastores"),
    (("datastores", "bad name"), {"model": "tiny-gpt2", "corpus": "synthwiki"}, "datastores"),
])
def test_invalid_value_names_its_key_path(path, value, where):
    c = fresh()
    set_at(c, path, value)
    rejects(c, f"config key {where}")


@pytest.mark.parametrize(("edit", "where"), [
    (lambda c: c["datastores"]["synthwiki"].update(select_on="dev"),
     "config key datastores.synthwiki.select_on: 'dev' is not one of the eval_sets (valid, test)"),
    (lambda c: c["datastores"]["synthwiki"].update(select_on=3), "config key datastores.synthwiki.select_on"),
    (lambda c: c["tasks"].update(points={"synthwiki": {"lambda": 0.2, "k": 4096, "sigma": 5}}),
     "config key tasks.points.synthwiki.k: 4096 exceeds sweep.k_max = 2048"),
    (lambda c: c["tasks"].update(points={"wiki": {"lambda": 0.2, "k": 16, "sigma": 5}}),
     "config key tasks.points.wiki: 'wiki' is not one of the datastores"),
    (lambda c: c["tasks"].update(points={"synthwiki": {"lambda": 0.2, "k": 16}}),
     "config key tasks.points.synthwiki: 'sigma' is a required property"),
    (lambda c: c["tasks"].update(points={"synthwiki": {"lambda": 1.2, "k": 16, "sigma": 5}}),
     "config key tasks.points.synthwiki.lambda"),
    (lambda c: c["tasks"].update(points={"synthwiki": {"lambda": 0.2, "k": 16, "sigma": 0}}),
     "config key tasks.points.synthwiki.sigma"),
    (lambda c: c["tasks"].update(points={"synthwiki": {"lambda": 0.2, "k": 16, "sigma": 5, "temp": 1}}),
     "config key tasks.points.synthwiki: Additional properties"),
    (lambda c: c["index"].update(distances="pq"), "config key index.distances: pq keeps an IVFPQ index's"),
    (lambda c: c["index"].update(type="IVFPQ", distances="approx"), "config key index.distances"),
])
def test_points_selection_sets_and_distances_are_checked_naming_the_key(edit, where):
    c = fresh()
    edit(c)
    rejects(c, where)


def test_a_pinned_point_and_a_selection_set_per_datastore_validate():
    c = fresh()
    c["eval_sets"]["math_valid"] = {"corpus": "synthwiki", "split": "valid"}
    c["datastores"]["synthwiki"]["select_on"] = "math_valid"
    c["tasks"]["points"] = {"synthwiki": {"lambda": 0.25, "k": 2048, "sigma": 7}}  # k = k_max, off the grid
    c["index"] = {"type": "IVFPQ", "distances": "pq"}
    check(c)
    assert c["tasks"]["points"]["synthwiki"] == {"lambda": 0.25, "k": 2048, "sigma": 7}
    assert c["index"]["distances"] == "pq"


def check_preset(path, tmp_path, monkeypatch) -> dict:
    """Check a preset as the workflow would in a run directory that holds its tasks.paper_data folder."""
    c = load(path)
    folder = (c.get("tasks") or {}).get("paper_data")
    if folder:
        write_paper_data(tmp_path / folder, ["one two three four five ."] * 12)
        monkeypatch.chdir(tmp_path)
    return check(c)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "experiments").glob("*.yaml")))
def test_every_experiment_preset_validates(preset, tmp_path, monkeypatch):
    check_preset(ROOT / "experiments" / preset, tmp_path, monkeypatch)


def test_paper1_preset_pins_the_papers_points_and_chooses_math_on_math(tmp_path, monkeypatch):
    """script/evaluate_downstream_knn.sh of the paper's code: (λ, k, σ) per (model, datastore); perplexity on
    WikiText-103's validation split (script/eval_perplexity.sh); σ on FAISS's PQ distances."""
    c = check_preset(ROOT / "experiments/paper1.yaml", tmp_path, monkeypatch)
    points = {d: (p["lambda"], p["k"], p["sigma"]) for d, p in c["tasks"]["points"].items()}
    assert points == {
        "llama2-wiki": (0.2, 2048, 5), "llama2-math": (0.2, 1600, 3),
        "llama3-wiki": (0.1, 2048, 5), "llama3-math": (0.1, 2048, 3),
        "mistral-wiki": (0.1, 2048, 10), "mistral-math": (0.1, 2048, 10),
    }
    for d, spec in c["datastores"].items():
        sel = c["eval_sets"][spec["select_on"]]
        assert (sel["corpus"], sel["split"]) == (("math", "valid") if spec["corpus"] == "math" else
                                                 ("wikitext103", "valid")), d
    hf = c["corpora"]["wikitext103"]["hf"]
    assert (hf["path"], hf["name"], hf["splits"]["valid"]) == ("Salesforce/wikitext", "wikitext-103-raw-v1",
                                                              "validation")
    assert c["index"]["type"] == "IVFPQ" and c["index"]["distances"] == "pq"


def test_missing_required_key_is_named():
    c = fresh()
    del c["sweep"]
    rejects(c, "<top level>", "'sweep' is a required property")
    c = fresh()
    del c["sweep"]["sigmas"]
    rejects(c, "config key sweep:", "'sigmas'")
    c = fresh()
    del c["datastores"]["synthwiki"]["model"]
    rejects(c, "config key datastores.synthwiki:", "'model'")


@pytest.mark.parametrize(("path", "value", "where"), [
    (("sweep", "sigmas", 0), float("nan"), "sweep.sigmas.0"),
    (("sweep", "lambdas", 1), float("nan"), "sweep.lambdas.1"),
    (("sweep", "sigmas", 2), float("inf"), "sweep.sigmas.2"),
    (("models", "tiny-gpt2", "train", "lr"), float("nan"), "models.tiny-gpt2.train.lr"),
    (("sweep", "k_max"), 2048.0, "sweep.k_max"),
    (("sweep", "ks", 0), 16.0, "sweep.ks.0"),
    (("datastores", "synthwiki", "shards"), 2.0, "datastores.synthwiki.shards"),
])
def test_non_finite_numbers_and_integral_floats_are_rejected(path, value, where):
    """NaN passes every JSON-schema bound (all comparisons are false) and 2048.0 counts as an integer in
    draft 2020-12; either would crash or silently poison a later stage, so validation refuses them."""
    c = fresh()
    set_at(c, path, value)
    rejects(c, f"config key {where}")


def test_local_corpus_files_are_checked(tmp_path):
    c = fresh()
    good = tmp_path / "train.txt"
    good.write_text("some text\n")
    empty = tmp_path / "valid.txt"
    empty.write_text("")
    c["corpora"]["mine"] = {"source": "local", "local": {"format": "text", "files": {
        "train": str(good), "valid": [str(good), str(empty)], "test": str(tmp_path / "missing.txt")}}}
    rejects(c, "config key corpora.mine.local.files.valid", "empty")
    c["corpora"]["mine"]["local"]["files"]["valid"] = [str(good)]
    rejects(c, "config key corpora.mine.local.files.test", "does not exist")
    c["corpora"]["mine"]["local"]["files"]["test"] = str(good)
    validate(c)
    assert c["corpora"]["mine"]["local"]["files"]["test"] == str(good)


def test_an_eval_set_on_a_datastores_own_text_is_refused_unless_allowed():
    """Issue 18, item 2: a set scored against a datastore built from the same corpus split finds every target
    among its neighbours (an "oracle" at k = 1); it is refused unless the set says it means it."""
    c = fresh()
    c["eval_sets"]["oracle"] = {"corpus": "synthwiki", "split": "train"}
    rejects(c, "config key eval_sets.oracle: corpus synthwiki, split train is the text of datastores.synthwiki",
            "datastores.synthwiki.split", "eval_sets.oracle.allow_datastore_overlap: true")
    c["eval_sets"]["oracle"]["allow_datastore_overlap"] = True
    check(c)
    c = fresh()
    c["datastores"]["synthwiki"]["split"] = "valid"  # a datastore over the valid split, the valid set beside it
    rejects(c, "config key eval_sets.valid: corpus synthwiki, split valid is the text of datastores.synthwiki")
    c = fresh()
    c["eval_sets"]["valid"]["allow_datastore_overlap"] = "yes"
    rejects(c, "config key eval_sets.valid.allow_datastore_overlap")
    assert fresh()["eval_sets"]["valid"]["allow_datastore_overlap"] is False  # the default


def test_a_second_corpus_name_for_the_datastores_text_is_refused_unless_allowed(tmp_path):
    """Issue 30, item 3: two corpora with one generate spec, or two local corpora listing one file, are one text:
    an eval set on the second over the split the datastore is built from is refused, naming both corpora."""
    c = fresh()
    c["corpora"]["twin"] = copy.deepcopy(c["corpora"]["synthwiki"])
    c["eval_sets"]["leak"] = {"corpus": "twin", "split": "train"}
    rejects(c, "config key eval_sets.leak: corpus twin, split train is the text of datastores.synthwiki",
            "corpora.twin and corpora.synthwiki resolve to the same generate spec", "allow_datastore_overlap: true")
    c["eval_sets"]["leak"]["split"] = "test"  # the twin's test split is not the datastore's train split
    check(c)
    c = fresh()
    c["eval_sets"]["leak"] = {"corpus": "twin", "split": "train", "allow_datastore_overlap": True}
    c["corpora"]["twin"] = copy.deepcopy(c["corpora"]["synthwiki"])
    check(c)
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"text of {name}\n")
    c = fresh()
    files = {"train": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "valid": str(tmp_path / "c.txt"),
             "test": str(tmp_path / "c.txt")}
    c["corpora"]["mine"] = {"source": "local", "local": {"format": "text", "files": files}}
    c["corpora"]["yours"] = {"source": "local", "local": {"format": "text", "files": {
        "train": str(tmp_path / "c.txt"), "valid": str(tmp_path / "c.txt"), "test": str(tmp_path / "sub/../b.txt")}}}
    c["datastores"]["mine"] = {**c["datastores"]["synthwiki"], "corpus": "mine", "split": "train"}
    c["eval_sets"]["yours"] = {"corpus": "yours", "split": "test"}
    (tmp_path / "sub").mkdir()
    rejects(c, "config key eval_sets.yours: corpus yours, split test is the text of datastores.mine",
            f"resolve to the same file {tmp_path / 'b.txt'}")


def test_a_local_corpus_listing_one_file_for_two_splits_warns(tmp_path, caplog):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"text of {name}\n")
    (tmp_path / "sub").mkdir()
    c = fresh()
    c["corpora"]["mine"] = {"source": "local", "local": {"format": "text", "files": {
        "train": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "valid": str(tmp_path / "c.txt"),
        "test": str(tmp_path / "sub" / ".." / "b.txt")}}}  # b.txt again, spelt another way
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.config"):
        check(c)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "corpora.mine.local.files.train" in warned[0] and "corpora.mine.local.files.test" in warned[0]
    assert str(tmp_path / "b.txt") in warned[0]
    caplog.clear()
    c["corpora"]["mine"]["local"]["files"] = {s: str(tmp_path / f"{n}.txt") for s, n in
                                              (("train", "a"), ("valid", "b"), ("test", "c"))}
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.config"):
        check(c)
    assert caplog.records == []  # three files, one split each
    c["corpora"]["hub"] = {"source": "hf", "hf": {"path": "someone/data", "splits": {
        "train": "train", "valid": "validation", "test": "validation"}}}
    with caplog.at_level(logging.WARNING, logger="workflow_scripts.config"):
        check(c)
    assert [r.getMessage() for r in caplog.records] == [
        "config keys corpora.hub.hf.splits.valid, corpora.hub.hf.splits.test all name split 'validation': its text "
        "is in each of these splits"]


def _local_model_config(d: Path, **cfg) -> Path:
    """A Hugging Face config.json as a local model directory holds it (the config check reads only that)."""
    from transformers import GPT2Config

    GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2, **cfg).save_pretrained(d)
    return d


def test_block_size_beyond_a_local_models_context_is_refused(tmp_path):
    """Issue 18, item 8: a window longer than the model's positions crashed extraction (IndexError)."""
    c = fresh()  # extraction.block_size 128
    c["models"]["tiny"] = {"source": "local", "path": str(_local_model_config(tmp_path / "tiny", n_positions=64))}
    c["datastores"]["tiny"] = {"model": "tiny", "corpus": "synthwiki"}
    rejects(c, "config key extraction.block_size: 128 exceeds the context of models.tiny (datastores.tiny)",
            "n_positions = 64", str(tmp_path / "tiny" / "config.json"))
    c["extraction"]["block_size"] = 64
    check(c)
    # a model no datastore uses is not extracted with, and a path that is not there yet is checked when its
    # identity is known (the model_identity step; extraction, retrieval and task scoring refuse it then)
    c = fresh()
    c["models"]["tiny"] = {"source": "local", "path": str(_local_model_config(tmp_path / "t2", n_positions=16))}
    check(c)
    c["models"]["gone"] = {"source": "local", "path": str(tmp_path / "nowhere")}
    c["datastores"]["gone"] = {"model": "gone", "corpus": "synthwiki"}
    check(c)


def test_load_rejects_missing_unparsable_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sweep: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)
    seq = tmp_path / "seq.yaml"
    seq.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load(seq)


# ------------------------------------------------------------------------- generated invalid configs


def _nodes(node, path=()):
    """(path, value) for every leaf, and (path, dict) for every mapping (a place to add an unknown key)."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _nodes(v, (*path, i))
    else:
        yield path, node


NODES = list(_nodes(VALID))


@st.composite
def invalid_configs(draw):
    """The valid config with one leaf made invalid (wrong type / out of range) or one unknown key added.

    Every leaf of the shipped config is constrained so that these replacements are invalid whatever the leaf:
    numbers all have a lower bound >= 0, strings are enums or names that must exist, flags are booleans.
    """
    path, value = draw(st.sampled_from(NODES))
    c = fresh()
    if isinstance(value, dict):
        extra = draw(st.sampled_from([UNKNOWN, f"{UNKNOWN}_2"]))
        bad = draw(st.one_of(st.integers(), st.text(max_size=3), st.none(), st.booleans()))
        set_at(c, (*path, extra), bad)
        return c, path, extra
    if isinstance(value, bool):
        bad = draw(st.one_of(st.sampled_from(["yes", "true", 0, 1, None]), st.lists(st.booleans(), max_size=2)))
    elif isinstance(value, int):
        bad = draw(st.one_of(st.integers(max_value=-1), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                             st.booleans(), st.just(float("nan")), st.floats(-1e6, -1e-9)))
    elif isinstance(value, float):
        bad = draw(st.one_of(st.floats(max_value=-1e-9), st.text(max_size=4), st.booleans(), st.none(),
                             st.just(float("nan")), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1)))
    elif value is None:  # an optional integer left at its null default (e.g. tasks.max_items)
        bad = draw(st.one_of(st.integers(max_value=0), st.text(max_size=4), st.booleans()))
    else:
        assert isinstance(value, str)
        bad = draw(st.one_of(st.integers(), st.none(), st.booleans(), st.lists(st.text(max_size=2), max_size=2),
                             st.text(max_size=8).map(lambda s: f"zz-not-a-name-{s}")))
    set_at(c, path, bad)
    return c, path, None


@settings(max_examples=60, deadline=None)
@given(invalid_configs())
def test_generated_invalid_configs_are_rejected_naming_a_key_path(case):
    config, path, extra = case
    where = ".".join(str(p) for p in path) or "<top level>"
    msg = rejects(config, f"config key {where}")
    if extra is not None:
        assert extra in msg


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([p for p, v in NODES if not isinstance(v, dict)]))
def test_rewriting_a_leaf_with_its_own_value_stays_valid(path):
    """The control for the test above: the mutation machinery alone does not make a config invalid."""
    c = fresh()
    node = VALID
    for p in path:
        node = node[p]
    set_at(c, path, copy.deepcopy(node))
    assert validate(c) == VALID


def test_a_subsample_datastore_takes_its_parents_model_corpus_split_and_shards():
    c = load_test_config("micro")
    c["datastores"]["half"] = {"subsample": {"of": "micro", "fraction": 0.5}}
    validate(c)
    assert c["datastores"]["half"] == {"subsample": {"of": "micro", "fraction": 0.5, "seed": 0}, "model": "micro-gpt2",
                                       "corpus": "micro", "split": "train", "shards": 2}
    assert validate(copy.deepcopy(c)) == c  # idempotent


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["datastores"].update(half={"subsample": {"of": "nope", "fraction": 0.5}}),
     "datastores.half.subsample.of: 'nope' is not one of the datastores"),
    (lambda c: c["datastores"].update(half={"subsample": {"of": "micro", "fraction": 0.5}},
                                      quarter={"subsample": {"of": "half", "fraction": 0.5}}),
     "datastores.quarter.subsample.of: half is itself a subsample"),
    (lambda c: c["datastores"].update(half={"subsample": {"of": "micro", "fraction": 0.5}, "model": "other"}),
     "datastores.half.model: a subsample takes its model from datastores.micro"),
    (lambda c: c["datastores"].update(half={"subsample": {"of": "micro", "fraction": 0}}),
     "datastores.half.subsample.fraction"),
    (lambda c: c["datastores"].update(half={"shards": 2}), "datastores.half: 'model' is a required property"),
    (lambda c: c.update(scaling={"datastores": ["nope"]}), "scaling.datastores.0: 'nope' is not one of the datastores"),
    (lambda c: c.update(scaling={"datastores": ["micro"], "fractions": [0.1, 1.5]}), "scaling.fractions.1"),
])
def test_bad_scaling_and_subsample_entries_are_refused_naming_the_key(edit, message):
    c = load_test_config("micro")
    edit(c)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(c)


# ------------------------------------------------------------------------- issue 30: YAML and names
def test_a_key_given_twice_is_refused_naming_the_key_and_the_file(tmp_path):
    """YAML keeps the last of a key given twice, silently: load() and the workflow (which Snakemake's own loader
    would let through) refuse it, naming the key, the file and both lines."""
    text = (ROOT / "config.yaml").read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text.replace("sweep:", "sweep:\n  ks: [1]\n  ks: [2]", 1))
    with pytest.raises(ConfigError, match=r"twice\.yaml: config key 'ks' is given twice in one mapping \(lines"):
        load(twice)
    top = tmp_path / "top.yaml"
    top.write_text(text + "\nseed: 7\n")  # a top-level key given again at the end of the file
    with pytest.raises(ConfigError, match="config key 'seed' is given twice"):
        load(top)
    from conftest import snakemake

    proc = snakemake(tmp_path, "-n", "--configfile", str(top), check=False, timeout=300)
    assert proc.returncode != 0
    assert "top.yaml: config key 'seed' is given twice" in proc.stdout + proc.stderr


def test_errors_show_values_cut_short_and_an_alias_bomb_is_refused_in_a_few_lines(tmp_path):
    """A value quoted in a validation error is cut (with its length); a YAML alias bomb (aliases expanding to
    10^8 values) is refused by its size before the schema quotes it (it made a 254 MB message before)."""
    c = fresh()
    c["seed"] = [f"value{i}" for i in range(20000)]
    msg = rejects(c, "config key seed:", "characters)")
    assert len(msg) < 1000
    bomb = tmp_path / "bomb.yaml"
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 8)]
    bomb.write_text("bombs:\n" + "\n".join("  " + line for line in levels) + "\n"
                    + (ROOT / "config.yaml").read_text().replace("seed:", "seed: *a7\nold_seed:", 1))
    with pytest.raises(ConfigError) as err:
        load(bomb)
    assert "alias bomb" in str(err.value) and len(str(err.value)) < 300


CASE_TWINS = [("eval_sets", "test", "Test"), ("datastores", "synthwiki", "Synthwiki"),
              ("corpora", "synthwiki", "SynthWiki"), ("models", "tiny-gpt2", "TINY-GPT2")]


@pytest.mark.parametrize(("kind", "a", "b"), CASE_TWINS)
def test_names_differing_only_by_case_are_refused_naming_both(kind, a, b):
    """Issue 30 item 14: names that become folders under results/ collide on a case-insensitive filesystem."""
    c = fresh()
    assert a in c[kind], sorted(c[kind])
    c[kind][b] = copy.deepcopy(c[kind][a])
    rejects(c, f"config key {kind}:", f"{a!r} and {b!r} differ only by case")


def test_task_names_differing_only_by_case_are_refused():
    c = fresh()
    ds = next(iter(c["datastores"]))
    from workflow_scripts.tasks.registry import registry

    entry = {**registry()["gsm8k"], "source": {"type": "local", "path": str(ROOT / "tests/fixtures/tasks/gsm8k.jsonl")}}
    check({**fresh(), "tasks": {"evaluate": {ds: ["mine"]}, "custom": {"mine": entry}}})  # one of them is valid
    c["tasks"] = {"evaluate": {ds: []}, "custom": {"mine": entry, "Mine": entry}}
    rejects(c, "config key tasks.custom:", "'mine' and 'Mine' differ only by case")


@pytest.mark.parametrize(("edit", "message"), [
    ({"nlist": 4096, "train_sample": 2000}, "2000 keys cannot train index.nlist = 4096 lists"),
    ({"nlist": 4, "nbits": 12, "train_sample": 2000}, "2^index.nbits = 4096 codes"),
])
def test_ivfpq_with_more_centroids_than_train_sample_is_a_config_error(edit, message):
    """Issue 30 item 11: what config time can know (the training sample; the datastore's size is known at job time,
    index.train_in_place)."""
    c = fresh()
    c["index"] |= {"type": "IVFPQ", **edit}
    rejects(c, "config key index.train_sample:", message)
    c["index"] |= {"nlist": 4, "nbits": 8, "train_sample": 256}  # exactly enough
    check(c)


def _scalar_defaults(node, out=None) -> set:
    """(key, default) of every scalar default in the schema."""
    out = set() if out is None else out
    if isinstance(node, dict):
        for k, sub in (node.get("properties") or {}).items():
            d = sub.get("default", None) if isinstance(sub, dict) else None
            if isinstance(d, (int, float, str)) and not isinstance(d, bool):
                out.add((k, d))
        for v in node.values():
            _scalar_defaults(v, out)
    elif isinstance(node, list):
        for v in node:
            _scalar_defaults(v, out)
    return out


def test_no_schema_default_is_written_again_in_the_code():
    """Every default lives in the schema: no rule or module reads a config key with its schema default as the
    fallback (`.get("n_boot", 1000)`), which would drift from the schema the day one of them changes."""
    from workflow_scripts.config import SCHEMA_PATH

    found = []
    files = [*(ROOT / "workflow_scripts").rglob("*.py"), *(ROOT / "rules").glob("*.smk"), ROOT / "Snakefile"]
    texts = {f: f.read_text() for f in files}
    for key, d in _scalar_defaults(yaml.safe_load(SCHEMA_PATH.read_text())):
        lit = re.escape(repr(d)) if not isinstance(d, str) else f"[\"']{re.escape(d)}[\"']"
        if isinstance(d, float) and d.is_integer():
            lit = rf"{int(d)}(?:\.0*)?"
        pat = re.compile(rf"\.get\(\s*[\"']{re.escape(key)}[\"']\s*,\s*{lit}\s*\)")
        found += [f"{f.relative_to(ROOT)}: {m[0]}" for f, t in texts.items() for m in pat.finditer(t)]
    assert not found, found
