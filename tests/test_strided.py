"""Sliding windows and the papers' text preparation (issue 29), against re-implementations of the reference code.

* ``reference_windows`` is GSYfate/knnlm-limits run_clm.py's ``group_texts`` loop (the one knn-transformers'
  run_clm.py has), written out here: windows of ``block`` tokens advanced by ``stride``, labels masked to -100 but
  the last ``trg_len``, padded to ``block``; the model shifts the labels, keys are saved (KNNSaver) and the kNN-LM
  scores (KNNWrapper) only where the shifted label is not -100. The loop alone: run_clm.py first cuts each batch of
  1000 rows to a multiple of ``block`` tokens, which the pipeline does not do (docs/paper1.md).
* ``reference_process_texts`` is its ``process_texts`` (WikiText), verbatim but for the torch tensors.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts import knnlm, lm
from workflow_scripts.artifacts import ArtifactError, read_json, save_npy, write_json
from workflow_scripts.datastore import Datastore, strided_windows, write_manifest
from workflow_scripts.extraction import extract_shard
from workflow_scripts.index import build_index
from workflow_scripts.retrieval import retrieve
from workflow_scripts.sweep import run_sweep

VOCAB, DIM, BLOCK, K = 40, 16, 16, 8
LAMBDA, SIGMA = 0.25, 3.0
PAD = 0


@pytest.fixture(scope="module")
def model_json(tmp_path_factory) -> Path:
    """A random two-layer GPT-2 (context BLOCK) with a word-level tokenizer, saved; its model.json."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("strided_model")
    torch.manual_seed(0)
    backend = Tokenizer(models.WordLevel({lm.EOS: 0, **{f"t{i}": i for i in range(1, VOCAB)}}, unk_token=lm.EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=lm.EOS, bos_token=lm.EOS, unk_token=lm.EOS)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=DIM, n_layer=2, n_head=2,
                                             bos_token_id=0, eos_token_id=0)).eval()
    with torch.no_grad():  # layer norms away from 1, so that "the input of the last MLP" is observable
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_json(root / "model.json", lm.describe(model, tok, {"source": "local", "path": str(root / "model")}))
    return root / "model.json"


def reference_windows(model, tokens: np.ndarray, block: int, stride: int):
    """run_clm.py's sliding windows, one window a batch: per window, the (key, value, log p_lm(value)) of each
    position whose shifted label is not -100, keys captured at the input of the last block's MLP."""
    box = {}
    handle = model.transformer.h[-1].mlp.register_forward_pre_hook(lambda _m, args: box.update(keys=args[0]))
    out = []
    total_length = len(tokens)
    try:
        for i in range(0, total_length, stride):
            begin_loc = max(i + stride - block, 0)
            end_loc = min(i + stride, total_length)
            trg_len = end_loc - i
            cur_input_ids = [int(t) for t in tokens[begin_loc:end_loc]]
            cur_labels = list(cur_input_ids)
            cur_labels[:-trg_len] = [-100] * (len(cur_labels) - trg_len)
            if len(cur_input_ids) < block:
                padding_size = block - len(cur_input_ids)
                cur_input_ids += [PAD] * padding_size
                cur_labels += [-100] * padding_size
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([cur_input_ids]), attention_mask=torch.ones(1, block)).logits
            labels = torch.tensor(cur_labels)[1:]  # the shift of the loss and of KNNSaver (captured_keys[:, :-1])
            keep = labels != -100
            logp = torch.log_softmax(logits[0, :-1].float(), -1)[keep]
            values = labels[keep]
            out.append((box["keys"][0, :-1][keep].numpy(), values.numpy(),
                        logp.gather(-1, values[:, None])[:, 0].numpy()))
    finally:
        handle.remove()
    return out


def reference_knnlm(train, evals, k: int, lam: float, temp: float):
    """KNNWrapper's interpolation for each eval window: keys stored as float16 (knn_keytype), queries searched as
    the pipeline's cache stores them (float16), the k nearest by squared L2, softmax(-d / temp) scattered over the
    vocabulary, log(lam p_knn + (1 - lam) p_lm). Returns each window's per-token log-probabilities."""
    keys = np.concatenate([w[0] for w in train]).astype(np.float16).astype(np.float64)
    vals = np.concatenate([w[1] for w in train])
    out = []
    for q, v, lp in evals:
        q = q.astype(np.float16).astype(np.float64)
        d = ((q[:, None, :] - keys[None, :, :]) ** 2).sum(-1)
        nn = np.argsort(d, axis=1, kind="stable")[:, :k]
        dk = np.take_along_axis(d, nn, 1)
        w = np.exp(-(dk - dk[:, :1]) / temp)
        w /= w.sum(1, keepdims=True)
        p_knn = (w * (vals[nn] == v[:, None])).sum(1)
        out.append(np.log(lam * p_knn + (1 - lam) * np.exp(lp.astype(np.float64))))
    return out


@pytest.mark.parametrize("stride", [4, 8, 5, 7])  # dividing the block of 16, and not
def test_strided_pipeline_equals_run_clm_sliding_windows(model_json, tmp_path, stride):
    """Keys, values and per-token log p_lm of the strided extraction and retrieval, and the kNN-LM perplexity of
    the sweep (per token and paper 1's mean over windows), equal run_clm.py's loop to 1e-6; streams of 203 and 77
    tokens, no multiple of any stride; the datastore in two shards, each computing its first keys in the sliding
    window that scores them, however the cut falls."""
    model, _, ident = lm.load_checked(model_json, device="cpu")
    rng = np.random.default_rng(stride)
    train, test = (rng.integers(1, VOCAB, n).astype(np.int32) for n in (203, 77))
    save_npy(tmp_path / "train.npy", train)
    save_npy(tmp_path / "test.npy", test)
    ref_train = reference_windows(model, train, BLOCK, stride)
    ref_test = reference_windows(model, test, BLOCK, stride)

    files = []
    for s in range(2):
        f = tuple(str(tmp_path / "ds" / n) for n in (f"keys_{s}.npy", f"vals_{s}.npy", f"shard_{s}.json"))
        extract_shard(model, ident, tmp_path / "train.npy", s, 2, BLOCK, 3, *f, stride=stride)
        files.append(f)
    manifest = write_manifest(ident, tmp_path / "train.npy", files, tmp_path / "ds" / "manifest.json")
    assert manifest["window"] == {"block_size": BLOCK, "stride": stride}
    ds = Datastore(tmp_path / "ds" / "manifest.json")
    ref_keys = np.concatenate([w[0] for w in ref_train])
    assert ds.rows == len(ref_keys) == train.size - 1  # a key for every position, each saved once
    np.testing.assert_array_equal(ds.gather_vals(np.arange(ds.rows)), np.concatenate([w[1] for w in ref_train]))
    np.testing.assert_allclose(ds.gather_keys(np.arange(ds.rows)), ref_keys.astype(np.float16), rtol=2e-3,
                               atol=1e-6)  # stored as float16: one rounding apart at most

    build_index(tmp_path / "ds/manifest.json", {"type": "Flat"}, 0, tmp_path / "index.faiss", tmp_path / "index.json")
    cfg = {"k_max": K, "max_tokens": None, "block_size": BLOCK, "stride": stride, "batch_size": 2, "device": "cpu",
           "nprobe": None, "dtype": "float16", "gpu_shard_above_gb": 4}
    with pytest.raises(ArtifactError, match=f"extracted with windows .*'stride': {stride}.*but its datastores"):
        retrieve(model_json, tmp_path / "ds/manifest.json", tmp_path / "index.faiss", tmp_path / "index.json",
                 tmp_path / "test.npy", cfg, tmp_path / "refused")  # the config says: no stride for the datastore
    cfg["datastore_stride"] = stride
    meta = retrieve(model_json, tmp_path / "ds/manifest.json", tmp_path / "index.faiss", tmp_path / "index.json",
                    tmp_path / "test.npy", cfg, tmp_path / "cache")
    assert meta["window"] == {"block_size": BLOCK, "stride": stride}
    lp = np.load(tmp_path / "cache" / "lm_logprob.npy")
    np.testing.assert_allclose(lp, np.concatenate([w[2] for w in ref_test]), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.load(tmp_path / "cache" / "queries.npy").astype(np.float32),
                               np.concatenate([w[0] for w in ref_test]).astype(np.float16), rtol=2e-3, atol=1e-6)

    grid = {"lambdas": [LAMBDA], "ks": [K], "sigmas": [SIGMA], "block_size": BLOCK, "stride": stride,
            "word_count": "lines"}
    row = run_sweep(tmp_path / "cache", tmp_path / "ds/manifest.json", grid, tmp_path / "p.csv",
                    tmp_path / "p.parquet", tmp_path / "test.npy").row(0, named=True)
    ref = reference_knnlm(ref_train, ref_test, K, LAMBDA, SIGMA)
    per_token = np.concatenate(ref)
    assert row["n_tokens"] == per_token.size == test.size - 1
    np.testing.assert_allclose(row["ppl"], np.exp(-per_token.mean()), rtol=1e-6)
    np.testing.assert_allclose(row["window_ppl"], np.exp(np.mean([-w.mean() for w in ref])), rtol=1e-6)
    np.testing.assert_allclose(row["base_window_ppl"], np.exp(np.mean([-w[2].astype(np.float64).mean()
                                                                       for w in ref_test])), rtol=1e-6)
    assert row["window_ppl"] != pytest.approx(row["ppl"], rel=1e-9)  # the two aggregations do differ here
    # word level: "t3 t7 ..." is one line of one word a token, so the line count adds one word to the tokens
    assert row["n_words"] == meta["words"]["lines"] == per_token.size + 1 and meta["words"]["words"] == per_token.size
    np.testing.assert_allclose(row["word_ppl"], np.exp(-per_token.sum() / row["n_words"]), rtol=1e-6)

    # the contract: a sweep for other windows than the cache's is refused, naming them
    with pytest.raises(ArtifactError, match="non-overlapping blocks"):
        run_sweep(tmp_path / "cache", tmp_path / "ds/manifest.json", {**grid, "stride": None}, tmp_path / "q.csv",
                  tmp_path / "q.parquet")


def test_strided_windows_score_every_position_once():
    """Every position of [start, end) exactly once, its context starting where run_clm.py's window does whatever
    the start (a shard or chunk), for strides dividing the block or not; at stride = block, the blocks from start."""
    for block, stride in [(16, 4), (16, 5), (16, 16), (8, 1), (8, 7)]:
        whole = strided_windows(0, 100, block, stride)
        for start, end in [(0, 100), (13, 60), (37, 38)]:
            ws = strided_windows(start, end, block, stride)
            assert [p for _, a, b in ws for p in range(a, b)] == list(range(start, end))
            contexts = {p: c for c, a, b in whole for p in range(a, b)}
            if stride < block:  # counted from token 0 (non-overlapping blocks: from start, as before strides)
                assert all(c == contexts[p] for c, a, b in ws for p in range(a, b))
            assert all(b - c <= block for c, _, b in ws)
    assert strided_windows(8, 40, 16) == [(8, 8, 24), (24, 24, 40)]


def test_datastore_shards_of_other_strides_are_refused(model_json, tmp_path):
    model, _, ident = lm.load_checked(model_json, device="cpu")
    save_npy(tmp_path / "t.npy", np.arange(1, 66, dtype=np.int32) % VOCAB)
    files = []
    for s, stride in enumerate([4, None]):
        f = tuple(str(tmp_path / n) for n in (f"k{s}.npy", f"v{s}.npy", f"m{s}.json"))
        extract_shard(model, ident, tmp_path / "t.npy", s, 2, BLOCK, 2, *f, stride=stride)
        files.append(f)
    assert read_json(files[0][2])["window"] == {"block_size": BLOCK, "stride": 4}
    with pytest.raises(ArtifactError, match=r"m1\.json: shard extracted with windows of non-overlapping blocks"):
        write_manifest(ident, tmp_path / "t.npy", files, tmp_path / "manifest.json")


WIKITEXT = [
    "", " = Valkyria Chronicles III = \n", "", " Senjō no Valkyria 3 : Unrecorded Chronicles \n",
    " The game began development in 2010 . \n", "", " = = Gameplay = = \n", "", " As with previous games . \n",
    " = = = Plot = = = \n", "", " = = = Music = = = \n", " The music was composed . \n", "", " It has two parts \n",
    " = = = = Deep = = = = \n", " = Tower Building = \n", " The tower is tall . \n", "",
]


def reference_process_texts(test_data, tokenizer):
    """run_clm.py's process_texts, the ids as lists instead of torch tensors."""
    word_count = 0
    current_title = None
    current_texts = []
    all_input_ids = []
    for text in test_data:
        stripped_text = text.strip()
        if stripped_text.startswith("= = =") and stripped_text.endswith("= = ="):
            if not current_title:
                combined_text = "\n".join(current_texts)
                word_count += len(combined_text.split())
                all_input_ids += tokenizer(combined_text)["input_ids"]
                current_texts = []
            if current_title and current_texts:
                combined_text = "\n".join([current_title, "\n".join(current_texts)])
                word_count += len(combined_text.split())
                all_input_ids += tokenizer(combined_text)["input_ids"]
                current_texts = []
            elif current_title:
                word_count += len(current_title.split())
                all_input_ids += tokenizer(current_title)["input_ids"]
            current_title = stripped_text
        else:
            if stripped_text != "":
                current_texts.append(stripped_text)
    if current_title and current_texts:
        combined_text = "\n".join([current_title, "\n".join(current_texts)])
        word_count += len(combined_text.split())
        all_input_ids += tokenizer(combined_text)["input_ids"]
    elif current_title:
        word_count += len(current_title.split())
        all_input_ids += tokenizer(current_title)["input_ids"]
    return all_input_ids, word_count


@pytest.fixture(scope="module")
def start_tokenizer():
    """A byte-level BPE tokenizer that adds a start token as Llama's adds <s> (models.train.start_token)."""
    texts = [line for line in WIKITEXT if line.strip()] * 3
    return lm.bpe_tokenizer(texts, 300, start_token=True)


def test_wikitext_headings_equal_process_texts(start_tokenizer, tmp_path):
    """On a WikiText-shaped fixture (blank lines, "=", "= =", "= = =" and "= = = =" headings, a "= = =" heading
    with no lines under it), the token stream and the word count are process_texts' (the empty rows kept, as the
    hub's WikiText has them, and dropped, as corpus.load_corpus drops them: process_texts never reads them)."""
    import polars as pl

    want, words = reference_process_texts(WIKITEXT, start_tokenizer)
    assert start_tokenizer("x")["input_ids"][0] == start_tokenizer.eos_token_id  # a start token on every text
    # by hand: before the first "= = =" heading 5 + 7 + 7 + 5 + 5 ("= = Gameplay = =" is a line of it), the bare
    # "= = = Plot = = =" 7, Music with its two lines 7 + 5 + 4, "= = = = Deep = = = =" with its two 9 + 4 + 5
    assert words == 29 + 7 + 16 + 18
    for rows in (WIKITEXT, [r for r in WIKITEXT if r.strip()]):
        pl.DataFrame({"text": rows}).write_parquet(tmp_path / "valid.parquet")
        lm.tokenize_documents(start_tokenizer, tmp_path / "valid.parquet", tmp_path / "valid.npy", "wikitext_headings")
        assert np.load(tmp_path / "valid.npy").tolist() == want
        assert lm.wikitext_groups(rows)[1] == words


def test_special_tokens_per_row_concatenated(start_tokenizer, tmp_path):
    """special_tokens: run_clm.py's tokenize_function (one tokenizer(text) per row, its special tokens) and the
    concatenation of group_texts; no EOS added."""
    import polars as pl

    rows = ["first row here", "second one", "third"]
    pl.DataFrame({"text": rows}).write_parquet(tmp_path / "d.parquet")
    n = lm.tokenize_documents(start_tokenizer, tmp_path / "d.parquet", tmp_path / "d.npy", "special_tokens")
    want = [i for r in rows for i in start_tokenizer(r)["input_ids"]]
    assert np.load(tmp_path / "d.npy").tolist() == want and n == len(want)
    assert want.count(start_tokenizer.eos_token_id) == len(rows)  # the start token of each row, nothing else


def test_window_perplexity_by_hand():
    lp = np.log([0.5, 0.25, 0.5, 0.125])
    # windows [0, 1), [1, 4): mean NLLs ln 2 and (ln 4 + ln 2 + ln 8) / 3 = 2 ln 2
    assert knnlm.window_perplexity(lp, [0, 1]) == pytest.approx(np.exp((np.log(2) + 2 * np.log(2)) / 2))
    assert knnlm.perplexity(lp) == pytest.approx(np.exp(7 * np.log(2) / 4))
    with pytest.raises(ValueError, match="do not cut"):
        knnlm.window_perplexity(lp, [1, 2])


def test_stride_in_the_config():
    """A stride above the block is refused by name; a subsample takes its parent's stride; with none, none."""
    from conftest import load_test_config

    from workflow_scripts.config import ConfigError, validate

    c = load_test_config("micro")
    c["eval_sets"]["valid"]["stride"] = 33
    with pytest.raises(ConfigError, match=r"eval_sets\.valid\.stride: 33 exceeds extraction\.block_size \(32\)"):
        validate(c)
    c = load_test_config("micro")
    c["datastores"]["micro"]["stride"] = 16
    c["datastores"]["half"] = {"subsample": {"of": "micro", "fraction": 0.5}}
    validate(c)
    assert c["datastores"]["half"]["stride"] == 16 and c["eval_sets"]["valid"]["stride"] is None


def test_shard_tokens_shards_hash_and_extract_from_their_first_windows_context(model_json, tmp_path):
    """shard_tokens with a stride: the shards' keys are those of one shard over the whole stream, and each planned
    slice's digest covers the context of its first window (a token changed before the shard makes the plan stale)."""
    from workflow_scripts.datastore import context_start, shard_plan, slice_sha256

    model, _, ident = lm.load_checked(model_json, device="cpu")
    tokens = np.random.default_rng(1).integers(1, VOCAB, 150).astype(np.int32)
    save_npy(tmp_path / "t.npy", tokens)
    plan = shard_plan(tmp_path / "t.npy", 32, BLOCK, 5)
    assert plan["window"] == {"block_size": BLOCK, "stride": 5} and context_start(32, BLOCK, 5) == 19
    files = []
    for span in plan["shards"]:
        i = span["shard"]
        f = tuple(str(tmp_path / n) for n in (f"k{i}.npy", f"v{i}.npy", f"m{i}.json"))
        extract_shard(model, ident, tmp_path / "t.npy", i, None, BLOCK, 2, *f, span=span, stride=5)
        files.append(f)
    write_manifest(ident, tmp_path / "t.npy", files, tmp_path / "manifest.json")
    whole = tuple(str(tmp_path / n) for n in ("kw.npy", "vw.npy", "mw.json"))
    extract_shard(model, ident, tmp_path / "t.npy", 0, 1, BLOCK, 2, *whole, stride=5)
    np.testing.assert_array_equal(Datastore(tmp_path / "manifest.json").gather_keys(np.arange(149)),
                                  np.load(whole[0]).astype(np.float32))
    changed = tokens.copy()
    changed[25] = tokens[25] % (VOCAB - 1) + 1  # before shard 1 [32, 64), in its first window's context [19, ...)
    assert slice_sha256(changed, 32, 64, {"window": plan["window"]}) != plan["shards"][1]["slice_sha256"]
    assert slice_sha256(changed, 32, 64) == slice_sha256(tokens, 32, 64)  # blocks: the token is not shard 1's
