"""GPU paths are used when present and fall back to CPU otherwise: torch device and dtype, FAISS GPU index."""

import faiss
import numpy as np
import torch
import transformers as tf
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from workflow_scripts import index, lm
from workflow_scripts.artifacts import sha256_file, write_json


def test_auto_device_is_cpu_without_cuda_and_cuda_with_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lm.pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lm.pick_device("auto").type == "cuda"
    assert lm.pick_device("cpu").type == "cpu"


def test_float16_request_falls_back_to_float32_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0}, "a")), eos_token="a")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm.write_identity({"source": "local", "path": str(tmp_path / "m")}, tmp_path / "model.json", device="cpu")
    loaded, _, _ = lm.load_checked(tmp_path / "model.json", device="auto", dtype="float16")
    assert next(loaded.parameters()).dtype == torch.float32 and next(loaded.parameters()).device.type == "cpu"


def test_faiss_gpu_is_used_only_when_gpus_answer(monkeypatch, tmp_path):
    assert index.gpu_available() == (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    assert not index.gpu_available()
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)
    assert not index.gpu_available()  # a faiss-cpu build without the GPU API at all

    moved = []
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda idx: moved.append(idx) or idx, raising=False)
    assert index.gpu_available()

    class DS:  # what load_index reads of a Datastore
        rows, dim, hash, path = 10, 4, "h", tmp_path / "manifest.json"

    flat = faiss.IndexFlatL2(4)
    flat.add(np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32))
    faiss.write_index(flat, str(tmp_path / "i.faiss"))
    write_json(tmp_path / "i.json", {"index_sha256": sha256_file(tmp_path / "i.faiss"), "manifest_sha256": "h"})
    got, _ = index.load_index(tmp_path / "i.faiss", tmp_path / "i.json", DS())
    assert len(moved) == 1 and got is moved[0] and got.ntotal == 10  # handed to the GPUs

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    got, _ = index.load_index(tmp_path / "i.faiss", tmp_path / "i.json", DS())
    assert len(moved) == 1 and isinstance(got, faiss.IndexFlatL2)  # CPU: not handed over
