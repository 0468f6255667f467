"""Every corpus source (generate, local, hf) and model source (train, local, hub), offline and in seconds."""

import json
import logging
import re
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants as hf_constants
import numpy as np
import polars as pl
import pytest
import torch

from workflow_scripts import lm
from workflow_scripts.artifacts import ArtifactError
from workflow_scripts.corpus import SPLITS, CorpusError, load_corpus, write_corpus

GEN = {"n_people": 50, "n_cities": 8, "n_companies": 6, "n_universities": 3, "n_documents": 200,
       "eval_fraction": 0.1}
TEXTS = ["Ada Lovelace was born in London .", "The city of Paris lies in France .",
         "Alan Turing studied at the University of Cambridge .", "Grace Hopper works for the Navy ."] * 5


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test may reach the network, and the datasets cache goes to a temporary directory."""
    cache = tmp_path_factory.mktemp("hf_datasets_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


def texts(ds) -> list[str]:
    return list(ds["text"])


# --------------------------------------------------------------------------------------------- generate
def gen_spec(**over) -> dict:
    return {"source": "generate", "generate": {**GEN, **over}}


def test_generate_splits_deterministic_and_seeded():
    a, world = load_corpus(gen_spec(), seed=3)
    b, _ = load_corpus(gen_spec(), seed=3)
    c, _ = load_corpus(gen_spec(), seed=4)
    assert set(a) == set(SPLITS)
    for s in SPLITS:
        assert len(a[s]) > 0 and a[s].column_names == ["text"]
        assert all(t.strip() for t in texts(a[s]))
        assert texts(a[s]) == texts(b[s])
    assert len(a["valid"]) == len(a["test"]) == 20 and len(a["train"]) == 160
    assert texts(a["train"]) != texts(c["train"])
    assert len(world["people"]) == 50 and len(world["cities"]) == 8


def test_generate_facts_recur_in_training_documents():
    dd, world = load_corpus(gen_spec(), seed=0)
    train = texts(dd["train"])
    sentences_per_doc = [re.split(r"(?<= \.) ", d) for d in train]

    def docs_stating_birth_city(p):
        return sum(any(p["name"] in s and p["birth_city"] in s and "born" in s.lower() for s in sents)
                   for sents in sentences_per_doc)

    counts = [docs_stating_birth_city(p) for p in world["people"]]
    assert max(counts) >= 2, "no person's birth city is stated in more than one training document"
    assert sum(c >= 2 for c in counts) >= 5


def test_write_corpus_writes_splits_and_world(tmp_path):
    write_corpus(gen_spec(), 0, {s: tmp_path / "c" / f"{s}.parquet" for s in SPLITS}, tmp_path / "c" / "world.json")
    dd, world = load_corpus(gen_spec(), 0)
    for s in SPLITS:
        assert pl.read_parquet(tmp_path / "c" / f"{s}.parquet")["text"].to_list() == texts(dd[s])
    assert json.loads((tmp_path / "c" / "world.json").read_text()) == world
    assert not [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------------------------- local
def local_spec(fmt, files, **extra) -> dict:
    return {"source": "local", "local": {"format": fmt, "files": files, **extra}}


def test_local_text_skips_empty_lines(tmp_path, caplog):
    for s in SPLITS:
        (tmp_path / f"{s}.txt").write_text(f"first {s} doc\n\n   \nsecond {s} doc\n")
    files = {s: str(tmp_path / f"{s}.txt") for s in SPLITS}
    with caplog.at_level(logging.WARNING):
        dd, world = load_corpus(local_spec("text", files), seed=0)
    assert world is None
    for s in SPLITS:
        assert texts(dd[s]) == [f"first {s} doc", f"second {s} doc"]
    assert "skipped 2 empty documents of 4" in caplog.text


def test_local_text_list_of_files(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\ngamma\n")
    files = {"train": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], "valid": str(tmp_path / "a.txt"),
             "test": str(tmp_path / "b.txt")}
    dd, _ = load_corpus(local_spec("text", files), seed=0)
    assert texts(dd["train"]) == ["alpha", "beta", "gamma"]
    assert texts(dd["test"]) == ["beta", "gamma"]


def test_local_jsonl_custom_text_field(tmp_path):
    for s in SPLITS:
        rows = [{"id": 1, "body": f"{s} one"}, {"id": 2, "body": ""}, {"id": 3, "body": f"{s} three"}]
        (tmp_path / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in SPLITS}
    dd, _ = load_corpus(local_spec("jsonl", files, text_field="body"), seed=0)
    for s in SPLITS:
        assert dd[s].column_names == ["text"]
        assert texts(dd[s]) == [f"{s} one", f"{s} three"]


def test_local_missing_text_field_names_it(tmp_path):
    for s in SPLITS:
        (tmp_path / f"{s}.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    files = {s: str(tmp_path / f"{s}.jsonl") for s in SPLITS}
    with pytest.raises(CorpusError, match="'content'"):
        load_corpus(local_spec("jsonl", files, text_field="content"), seed=0)


@pytest.mark.parametrize("content, message", [
    ('{"body": "a"}\n{"body": "b"}\n', "has no field 'text' in any of its 2 rows (fields: ['body'])"),
    ('{"text": "a"}\n\n{"text": 5}\n', "line 3: field 'text' holds int 5, not text"),
    ('{"text": true}\n{"text": false}\n', "line 1: field 'text' holds bool True, not text"),
    ('{"text": "a"}\n{"text": ["x", "y"]}\n', "line 2: field 'text' holds list ['x', 'y'], not text"),
    ('{"text": "a"}\n{"text": {"x": 1}}\n', "line 2: field 'text' holds dict {'x': 1}, not text"),
    ('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "line 2 is not valid JSON (Expecting ',' delimiter"),
    ('{"text": "a"}\n["text", "b"]\n', "line 2 is a list, not a JSON object"),
])
def test_local_jsonl_bad_rows_name_the_file_line_and_field(tmp_path, content, message):
    # before: a datasets traceback (DatasetGenerationError), AttributeError: 'int' object has no attribute 'strip',
    # or, in a split after one holding text, a silent cast of the values to their JSON text
    for s in SPLITS:
        (tmp_path / f"{s}.jsonl").write_text('{"text": "fine doc"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    files = {s: str(tmp_path / f"{s}.jsonl") for s in SPLITS} | {"valid": str(bad)}
    with pytest.raises(CorpusError) as e:
        load_corpus(local_spec("jsonl", files), seed=0)
    assert str(e.value).startswith(f"corpus file {bad} (split 'valid') ")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_local_jsonl_rows_without_the_text_field_are_skipped_as_empty(tmp_path):
    for s in SPLITS:
        (tmp_path / f"{s}.jsonl").write_text('{"text": "one"}\n{"id": 2}\n{"text": null}\n{"text": "four"}\n')
    dd, _ = load_corpus(local_spec("jsonl", {s: str(tmp_path / f"{s}.jsonl") for s in SPLITS}), seed=0)
    assert texts(dd["train"]) == ["one", "four"]


def test_local_parquet_text_column_that_is_not_text_is_refused(tmp_path):
    for s in SPLITS:
        pl.DataFrame({"text": [f"{s} a"]}).write_parquet(tmp_path / f"{s}.parquet")
    pl.DataFrame({"text": [1, 2]}).write_parquet(tmp_path / "train.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in SPLITS}
    with pytest.raises(CorpusError, match=rf"^corpus file {tmp_path}/train.parquet \(split 'train'\): column 'text' "
                                          r"holds int64 values, not text$"):
        load_corpus(local_spec("parquet", files), seed=0)
    for s in SPLITS:  # in every split: the same check after loading
        pl.DataFrame({"text": [1, 2]}).write_parquet(tmp_path / f"{s}.parquet")
    with pytest.raises(CorpusError, match=r"^train split: text field 'text' holds int64 values, not text$"):
        load_corpus({"source": "hf", "hf": {"path": str(tmp_path), "splits": {"train": "train", "valid": "validation",
                                                                      "test": "test"}}}, seed=0)


def test_local_parquet(tmp_path):
    for s in SPLITS:
        frame = pl.DataFrame({"text": [f"{s} a", None, f"{s} b"], "n": [1, 2, 3]})
        frame.write_parquet(tmp_path / f"{s}.parquet")
    files = {s: str(tmp_path / f"{s}.parquet") for s in SPLITS}
    dd, _ = load_corpus(local_spec("parquet", files), seed=0)
    for s in SPLITS:
        assert dd[s].column_names == ["text"]
        assert texts(dd[s]) == [f"{s} a", f"{s} b"]


def test_local_split_of_only_empty_documents_raises(tmp_path):
    for s in SPLITS:
        (tmp_path / f"{s}.txt").write_text("doc\n" if s != "valid" else "\n \n")
    files = {s: str(tmp_path / f"{s}.txt") for s in SPLITS}
    with pytest.raises(CorpusError, match="valid split has no non-empty documents"):
        load_corpus(local_spec("text", files), seed=0)


@pytest.mark.parametrize("problem", ["empty", "missing"])
def test_local_bad_file_raises_naming_it(tmp_path, problem):
    for s in SPLITS:
        (tmp_path / f"{s}.txt").write_text("doc\n")
    bad = tmp_path / "broken_valid.txt"
    if problem == "empty":
        bad.write_text("")
    files = {"train": str(tmp_path / "train.txt"), "valid": str(bad), "test": str(tmp_path / "test.txt")}
    with pytest.raises(CorpusError, match=re.escape(str(bad))) as e:
        load_corpus(local_spec("text", files), seed=0)
    assert ("empty" if problem == "empty" else "does not exist") in str(e.value)


# --------------------------------------------------------------------------------------------- hf
def test_hf_saved_dataset_dict(tmp_path):
    dd = datasets.DatasetDict({s: datasets.Dataset.from_dict({"content": [f"{s} x", "", f"{s} y"],
                                                              "id": [0, 1, 2]}) for s in SPLITS})
    dd.save_to_disk(str(tmp_path / "saved"))
    spec = {"source": "hf", "hf": {"path": str(tmp_path / "saved"), "text_field": "content"}}
    got, world = load_corpus(spec, 0)
    assert world is None
    for s in SPLITS:
        assert got[s].column_names == ["text"]
        assert texts(got[s]) == [f"{s} x", f"{s} y"]


def make_parquet_dataset_dir(root: Path) -> Path:
    d = root / "pq_dataset"
    (d / "data").mkdir(parents=True)
    for theirs in ("train", "validation", "test"):
        frame = pl.DataFrame({"text": [f"{theirs} doc {i}" for i in range(3)]})
        frame.write_parquet(d / "data" / f"{theirs}.parquet")
    return d


def test_hf_parquet_directory_with_split_mapping(tmp_path):
    d = make_parquet_dataset_dir(tmp_path)
    spec = {"source": "hf", "hf": {"path": str(d), "splits": {"train": "train", "valid": "validation",
                                                              "test": "test"}}}
    dd, _ = load_corpus(spec, 0)
    assert set(dd) == set(SPLITS)
    assert texts(dd["valid"]) == [f"validation doc {i}" for i in range(3)]
    assert texts(dd["train"]) == [f"train doc {i}" for i in range(3)]
    assert texts(dd["test"]) == [f"test doc {i}" for i in range(3)]


def test_hf_wrong_split_name_raises(tmp_path):
    d = make_parquet_dataset_dir(tmp_path)
    splits = {"train": "train", "valid": "dev", "test": "test"}
    spec = {"source": "hf", "hf": {"path": str(d), "splits": splits}}
    with pytest.raises(CorpusError, match="dev"):
        load_corpus(spec, 0)
    # without a mapping, our split names are looked up as they are: the dataset has no 'valid'
    with pytest.raises(CorpusError, match="valid"):
        load_corpus({"source": "hf", "hf": {"path": str(d)}}, 0)


def test_unknown_corpus_source():
    with pytest.raises(CorpusError, match="unknown corpus source"):
        load_corpus({"source": "ftp"}, 0)


# --------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    pl.DataFrame({"text": TEXTS}).write_parquet(d / "train.parquet")
    lm.train_tokenizer(d / "train.parquet", 300, d / "tokenizer")
    return d / "tokenizer"


def test_train_tokenizer_and_tokenize_split(tokenizer_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    assert tok.eos_token == lm.EOS and tok.eos_token_id is not None
    assert 256 < len(tok) <= 300
    docs = ["Ada Lovelace was born in London .", "Grace Hopper works for the Navy .", "unseen wörds ü"]
    pl.DataFrame({"text": docs}).write_parquet(tmp_path / "x.parquet")
    n = lm.tokenize_split(tok, tmp_path / "x.parquet", tmp_path / "x.npy", batch=2)
    stream = np.load(tmp_path / "x.npy", allow_pickle=False)
    assert stream.dtype == np.int32 and stream.ndim == 1 and stream.size == n
    eos_at = np.flatnonzero(stream == tok.eos_token_id)
    assert len(eos_at) == len(docs) and eos_at[-1] == stream.size - 1
    pieces = np.split(stream, eos_at[:-1] + 1)
    assert [tok.decode(p[:-1].tolist()) for p in pieces] == docs
    assert all(p[-1] == tok.eos_token_id and (p[:-1] != tok.eos_token_id).all() for p in pieces)


class _Spy:
    """A tokenizer that records the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, texts, **kw):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tok(texts, **kw)

    def __len__(self):
        return len(self.tok)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _long_doc(n_words: int, seed: int = 0) -> str:
    """Words, numbers, punctuation, contractions, non-ASCII and runs of spaces, tabs and newlines."""
    rng = np.random.default_rng(seed)
    words = ["Ada", "Lovelace", "was", "born", "in", "London", "café", "1815", "'s", "don't", ".", ",", "(", ")",
             "wörds", "ü", "Navy", "--", "3.14", "日本"]
    seps = [" "] * 12 + ["  ", "\n", "\n\n", "\t", " \n", "   ", ""]
    return "".join(str(rng.choice(words)) + str(rng.choice(seps)) for _ in range(n_words))


def _stream_docs(path, eos) -> list[list[int]]:
    stream = np.load(path, allow_pickle=False)
    eos_at = np.flatnonzero(stream == eos)
    return [p[:-1].tolist() for p in np.split(stream, eos_at[:-1] + 1)]


def test_tokenize_split_encodes_long_documents_in_bounded_pieces_with_the_same_ids(tokenizer_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    docs = [" " + _long_doc(6000, 1) + " ", "short doc", _long_doc(3000, 2), "  leading spaces"]
    pl.DataFrame({"text": docs}).write_parquet(tmp_path / "x.parquet")
    spy = _Spy(tok)
    n = lm.tokenize_split(spy, tmp_path / "x.parquet", tmp_path / "x.npy", max_chars=300)
    assert spy.longest <= 300 < len(docs[0]) // 50
    got = _stream_docs(tmp_path / "x.npy", tok.eos_token_id)
    assert got == [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    assert n == sum(map(len, got)) + len(docs)


def test_tokenize_split_cuts_a_long_run_without_spaces_and_keeps_its_text(tokenizer_dir, tmp_path, caplog):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    docs = ["Ada " + "x" * 2000 + " was born", "ok"]
    pl.DataFrame({"text": docs}).write_parquet(tmp_path / "x.parquet")
    spy = _Spy(tok)
    with caplog.at_level(logging.WARNING):
        lm.tokenize_split(spy, tmp_path / "x.parquet", tmp_path / "x.npy", max_chars=300)
    assert spy.longest <= 300
    got = _stream_docs(tmp_path / "x.npy", tok.eos_token_id)
    assert [tok.decode(ids) for ids in got] == docs
    assert "cut 1 document(s) inside a run of 300 characters without a space" in caplog.text


def test_tokenize_split_encodes_whole_documents_when_pieces_would_change_the_ids(tokenizer_dir, tmp_path):
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)  # each piece: a new space
    doc = _long_doc(500)
    pl.DataFrame({"text": [doc]}).write_parquet(tmp_path / "x.parquet")
    lm.tokenize_split(tok, tmp_path / "x.parquet", tmp_path / "x.npy", max_chars=300)
    assert _stream_docs(tmp_path / "x.npy", tok.eos_token_id) == [tok(doc, add_special_tokens=False)["input_ids"]]


@pytest.fixture(scope="module")
def saved_model_dir(tokenizer_dir, tmp_path_factory):
    """A tiny randomly initialised GPT-2 and its tokenizer, saved as a Hugging Face model directory."""
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    d = tmp_path_factory.mktemp("model") / "tiny"
    GPT2LMHeadModel(cfg).save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d


def test_local_model_identity_and_weight_change(saved_model_dir, tmp_path):
    from transformers import GPT2LMHeadModel

    d = tmp_path / "m"
    shutil.copytree(saved_model_dir, d)
    ident = lm.write_identity({"source": "local", "path": str(d)}, tmp_path / "model.json", device="cpu")
    assert json.loads((tmp_path / "model.json").read_text()) == ident
    assert ident["hook_point"] == "transformer.h.1.mlp" and ident["dim"] == 32
    assert ident["architecture"] == "GPT2LMHeadModel"
    model, tok, ident2 = lm.load_checked(tmp_path / "model.json", device="cpu")
    assert ident2 == ident and lm.weights_hash(model) == ident["model_sha256"]
    assert lm.tokenizer_hash(tok) == ident["tokenizer_sha256"]

    changed = GPT2LMHeadModel.from_pretrained(d)
    with torch.no_grad():
        changed.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    changed.save_pretrained(d, safe_serialization=True)
    with pytest.raises(ArtifactError, match="weights hash") as e:
        lm.load_checked(tmp_path / "model.json", device="cpu")
    assert str(d) in str(e.value) and ident["model_sha256"][:12] in str(e.value)


def test_another_checkpoint_beside_model_json_is_refused_whatever_the_dtype(saved_model_dir, tmp_path, monkeypatch):
    """Issue 30, item 2: the weights are hashed on disk, so a float16 load (a GPU's default; here the CPU is made to
    load float16 as a GPU would) of another checkpoint dropped in beside model.json is refused, naming the file."""
    from transformers import GPT2LMHeadModel

    d = tmp_path / "m"
    shutil.copytree(saved_model_dir, d)
    ident = lm.write_identity({"source": "local", "path": str(d)}, tmp_path / "model.json", device="cpu")
    monkeypatch.setattr(lm.devices, "torch_dtype", lambda device, requested="float32": requested)
    model, _, _ = lm.load_checked(tmp_path / "model.json", device="cpu", dtype="float16")
    assert next(model.parameters()).dtype == torch.float16  # the float32 state-dict hash cannot check this load
    other = GPT2LMHeadModel(GPT2LMHeadModel.from_pretrained(d).config)  # same shape, other (random) weights
    other.save_pretrained(d, safe_serialization=True)
    with pytest.raises(ArtifactError, match=r"weights hash: files model\.safetensors differ from those of the model "
                                            r"recorded in .*model\.json") as e:
        lm.load_checked(tmp_path / "model.json", device="cpu", dtype="float16")
    assert str(d) in str(e.value) and set(ident["weight_files_sha256"]) == {"model.safetensors"}


def test_local_model_tokenizer_change_detected(saved_model_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(saved_model_dir, d)
    lm.write_identity({"source": "local", "path": str(d)}, tmp_path / "model.json", device="cpu")
    tj = json.loads((d / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[100], by_id[101]
    vocab[a], vocab[b] = 101, 100
    (d / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ArtifactError, match="tokenizer differs"):
        lm.load_checked(tmp_path / "model.json", device="cpu")


def test_local_model_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        lm.load_model({"source": "local", "path": str(tmp_path / "nowhere")}, device="cpu")


@pytest.fixture
def fake_hub_cache(saved_model_dir, tmp_path, monkeypatch):
    """An offline hub cache holding ``testorg/tiny`` at one commit, as huggingface_hub lays it out."""
    home, cache = tmp_path / "hf_home", tmp_path / "hf_home" / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--testorg--tiny"
    shutil.copytree(saved_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    # the environment is read when huggingface_hub is imported, so patch its constants as well
    for var, val in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(var, str(val))
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return {"cache": cache, "commit": commit, "source_dir": saved_model_dir}


def test_hub_model_loads_from_offline_cache(fake_hub_cache, tmp_path):
    from transformers import PreTrainedTokenizerFast

    model, tok = lm.load_model({"source": "hub", "path": "testorg/tiny"}, device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_embd == 32
    ref_tok = PreTrainedTokenizerFast.from_pretrained(fake_hub_cache["source_dir"])
    assert lm.tokenizer_hash(tok) == lm.tokenizer_hash(ref_tok)
    hub_spec = {"source": "hub", "path": "testorg/tiny"}
    ident = lm.write_identity(hub_spec, tmp_path / "model.json", device="cpu")
    lspec = {"source": "local", "path": str(fake_hub_cache["source_dir"])}
    local = lm.write_identity(lspec, tmp_path / "l.json", device="cpu")
    assert ident["model_sha256"] == local["model_sha256"] and ident["source"] == "hub"
    model2, _, _ = lm.load_checked(tmp_path / "model.json", device="cpu")
    assert lm.weights_hash(model2) == ident["model_sha256"]
    # a pinned revision that is not in the cache cannot be fetched offline (and says so, not a file error)
    with pytest.raises(OSError, match="couldn't find them in the cached files"):
        lm.load_model({"source": "hub", "path": "testorg/tiny", "revision": "f" * 40}, device="cpu")


def test_hub_model_not_in_cache_fails_offline(fake_hub_cache):
    with pytest.raises(OSError, match="couldn't find them in the cached files"):
        lm.load_model({"source": "hub", "path": "testorg/absent"}, device="cpu")


@pytest.mark.parametrize("source", ["local", "hub"])
def test_a_window_beyond_the_models_context_is_refused_naming_both(source, fake_hub_cache, tmp_path):
    """Issue 18, item 8: extraction.block_size larger than the model's positions (n_positions 32 here) crashed
    extraction with a bare IndexError. The identity records the context; every step that runs the model over
    windows of extraction.block_size refuses a longer window before loading the model or reading its inputs."""
    from workflow_scripts.extraction import extract_keys
    from workflow_scripts.retrieval import retrieve_step
    from workflow_scripts.tasks.scoring import score_task

    path = str(fake_hub_cache["source_dir"]) if source == "local" else "testorg/tiny"
    ident = lm.write_identity({"source": source, "path": path}, tmp_path / "model.json", device="cpu")
    assert ident["context_length"] == 32 and ident["context_key"] == "n_positions"
    np.save(tmp_path / "tokens.npy", np.arange(200, dtype=np.int32) % 100)
    absent = tmp_path / "absent"
    want = re.escape("extraction.block_size = 64 exceeds the context of the model in ") + ".*" + re.escape(
        f"{tmp_path / 'model.json'} ({path}: n_positions = 32)")
    with pytest.raises(ValueError, match=want):
        extract_keys({"shard": 0, "shards": 1, "block_size": 64, "batch_size": 8, "device": "cpu", "dtype": "float16"},
                     tmp_path / "model.json", tmp_path / "tokens.npy", tmp_path / "k.npy", tmp_path / "v.npy",
                     tmp_path / "m.json")
    cfg = {"k_max": 4, "max_tokens": None, "block_size": 64, "batch_size": 8, "device": "cpu", "nprobe": None,
           "dtype": "float16", "gpu_shard_above_gb": 4}
    with pytest.raises(ValueError, match=want):
        retrieve_step(cfg, tmp_path / "model.json", absent, absent, absent, tmp_path / "tokens.npy",
                      tmp_path / "cache" / "meta.json")
    with pytest.raises(ValueError, match=want):
        score_task({**cfg, "task": "t", "entry": {"kind": "classify"}}, tmp_path / "model.json", absent, absent,
                   absent, absent, tmp_path / "t.npz", tmp_path / "t.json")
    assert not (tmp_path / "k.npy").exists() and not (tmp_path / "cache").exists()
    # the window the model has is fine: extraction runs
    extract_keys({"shard": 0, "shards": 1, "block_size": 32, "batch_size": 8, "device": "cpu", "dtype": "float16"},
                 tmp_path / "model.json", tmp_path / "tokens.npy", tmp_path / "k.npy", tmp_path / "v.npy",
                 tmp_path / "m.json")
    assert np.load(tmp_path / "k.npy").shape == (199, 32)


def test_local_corpora_and_task_files_leave_nothing_in_the_hf_datasets_cache(tmp_path):
    """Issue 30 item 8: `datasets` wrote Arrow copies of local corpora (and the empty-line filter's cache files)
    and of local task files into ~/.cache/huggingface/datasets, never removed. The corpus and load-task steps,
    run as the rules run them with HF_DATASETS_CACHE pointed at an empty folder, leave it empty, and leave nothing
    beside their outputs."""
    import subprocess
    import sys

    from conftest import ROOT, project_env

    cache = tmp_path / "hf_datasets"
    cache.mkdir()
    env = project_env() | {"HF_DATASETS_CACHE": str(cache), "HF_HOME": str(tmp_path / "hf_home")}
    for s in SPLITS:
        (tmp_path / f"{s}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in [f"a {s} doc", " ", "b"]))
    spec = local_spec("jsonl", {s: str(tmp_path / f"{s}.jsonl") for s in SPLITS})
    out = tmp_path / "results" / "corpus" / "mine"
    params = json.dumps({"spec": spec, "seed": 0})
    cmd = [sys.executable, "-m", "workflow_scripts", "corpus", "--params", params, "--world", str(out / "world.json")]
    subprocess.run([*cmd, *(a for s in SPLITS for a in (f"--{s}", str(out / f"{s}.parquet")))], env=env, cwd=ROOT,
                   check=True, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "valid.parquet", "world.json"]
    assert pl.read_parquet(out / "train.parquet")["text"].to_list() == ["a train doc", "b"]
    task = tmp_path / "mine.jsonl"
    task.write_text((ROOT / "tests/fixtures/tasks/gsm8k.jsonl").read_text())
    from workflow_scripts.tasks.registry import registry

    entry = {**registry()["gsm8k"], "source": {"type": "local", "path": str(task)}}
    params = json.dumps({"entry": entry, "max_items": None, "seed": 0})
    subprocess.run([sys.executable, "-m", "workflow_scripts", "load-task", "--params", params, "--source", str(task),
                    "--out", str(tmp_path / "task.parquet")], env=env, cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "task.parquet").is_file()
    assert list(cache.rglob("*")) == []
