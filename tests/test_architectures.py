"""Key extraction on GPT-2, Llama and Mistral: hook point, what the key is, log-probs, sharding, manifests."""

from pathlib import Path

import numpy as np
import pytest
import torch

from workflow_scripts.artifacts import ArtifactError, save_npy
from workflow_scripts.datastore import Datastore, shard_ranges, write_manifest
from workflow_scripts.extraction import extract_shard
from workflow_scripts.forward import capture_keys, find_hook_point, run_model
from workflow_scripts.lm import weights_hash

VOCAB, DIM = 100, 32
ARCHS = ("gpt2", "llama", "mistral")
HOOKS = {"gpt2": "transformer.h.1.mlp", "llama": "model.layers.1.mlp", "mistral": "model.layers.1.mlp"}


def build(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=DIM, n_layer=2, n_head=4)
        model = tf.GPT2LMHeadModel(cfg)
    else:
        common = {"vocab_size": VOCAB, "hidden_size": DIM, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
        if arch == "llama":
            model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
        else:
            model = tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=None))
    # random init leaves layer norm weights at 1: perturb them so that "after the norm" is observable
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, build(request.param)


def last_ffn_norm(arch: str, model):
    if arch == "gpt2":
        return model.transformer.h[-1].ln_2
    return model.model.layers[-1].post_attention_layernorm


def identity(model, hook: str, **over) -> dict:
    return {"source": "local", "path": "/nowhere/tiny", "revision": None,
            "architecture": type(model).__name__,
            "model_sha256": weights_hash(model), "tokenizer_sha256": "ab" * 32, "hook_point": hook,
            "dim": DIM, "vocab_size": VOCAB, **over}


def stream(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int32)


def test_hook_point_is_last_block_mlp(arch_model):
    arch, model = arch_model
    hook = find_hook_point(model)
    assert hook == HOOKS[arch]
    assert model.get_submodule(hook) is (model.transformer.h[-1].mlp if arch == "gpt2"
                                         else model.model.layers[-1].mlp)


def test_key_is_output_of_post_attention_norm(arch_model):
    arch, model = arch_model
    x = torch.from_numpy(stream(2 * 12).reshape(2, 12).astype(np.int64))
    seen = {}
    handle = last_ffn_norm(arch, model).register_forward_hook(lambda m, a, out: seen.__setitem__("ln", out))
    try:
        with torch.inference_mode(), capture_keys(model, find_hook_point(model)) as box:
            model(input_ids=x)
    finally:
        handle.remove()
    keys, ln_out = box["keys"], seen["ln"]
    assert keys.shape == (2, 12, DIM)
    torch.testing.assert_close(keys, ln_out, rtol=0, atol=0)
    # and not the residual stream entering the norm
    pre = {}
    handle = last_ffn_norm(arch, model).register_forward_pre_hook(lambda m, a: pre.__setitem__("in", a[0]))
    try:
        with torch.inference_mode():
            model(input_ids=x)
    finally:
        handle.remove()
    assert not torch.allclose(pre["in"], keys, atol=1e-3)


def collect(gen):
    parts = list(gen)
    firsts = [p[0] for p in parts]
    assert firsts == sorted(firsts)
    keys = np.concatenate([p[1] for p in parts])
    lps = None if parts[0][2] is None else np.concatenate([p[2] for p in parts])
    return firsts, keys, lps


@pytest.mark.parametrize("start,end,block,batch", [(0, 49, 16, 2), (5, 40, 8, 3)])
def test_run_model_logprobs_and_stop_early(arch_model, start, end, block, batch):
    arch, model = arch_model
    hook = find_hook_point(model)
    tokens = stream(50)
    firsts, keys, lps = collect(run_model(model, hook, tokens, start, end, block, batch, with_logprobs=True))
    n = end - start
    assert firsts[0] == start and keys.shape == (n, DIM) and lps.shape == (n,) and lps.dtype == np.float32
    # independently: each window [a, b) is its own context; position i predicts tokens[i + 1]
    ref_lp, ref_keys = [], []
    norm = last_ffn_norm(arch, model)
    for a in range(start, end, block):
        b = min(a + block, end)
        seen = {}
        h = norm.register_forward_hook(lambda m, i, o, seen=seen: seen.__setitem__("k", o))
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(tokens[a:b].astype(np.int64))[None]).logits[0]
        h.remove()
        logp = torch.log_softmax(logits.float(), -1)
        targets = torch.from_numpy(tokens[a + 1 : b + 1].astype(np.int64))
        ref_lp.append(logp[torch.arange(b - a), targets].numpy())
        ref_keys.append(seen["k"][0].numpy())
    np.testing.assert_allclose(lps, np.concatenate(ref_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(keys, np.concatenate(ref_keys), rtol=1e-5, atol=1e-5)
    assert (lps < 0).all()

    # stop early: same keys, and the output layer never runs
    calls = []
    h = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    try:
        firsts2, keys2, lps2 = collect(run_model(model, hook, tokens, start, end, block, batch,
                                                 with_logprobs=False))
    finally:
        h.remove()
    assert lps2 is None and calls == [] and firsts2 == firsts
    np.testing.assert_array_equal(keys2, keys)


def test_run_model_rejects_position_without_target(arch_model):
    _, model = arch_model
    with pytest.raises(ValueError, match="no next token"):
        list(run_model(model, find_hook_point(model), stream(20), 0, 20, 8, 2, with_logprobs=False))


def extract(model, ident, tokens_npy, outdir: Path, n_shards: int, block: int, batch: int):
    files = []
    for s in range(n_shards):
        k, v, m = (outdir / f"keys_{s}.npy", outdir / f"vals_{s}.npy", outdir / f"meta_{s}.json")
        extract_shard(model, ident, tokens_npy, s, n_shards, block, batch, k, v, m)
        files.append((str(k), str(v), str(m)))
    return files


def test_shards_manifest_and_datastore(arch_model, tmp_path):
    arch, model = arch_model
    hook = find_hook_point(model)
    ident = identity(model, hook)
    tokens = stream(75, seed=2)
    save_npy(tmp_path / "train.npy", tokens)
    block, batch = 8, 3
    ranges = shard_ranges(tokens.size, 2, block)
    assert ranges[0][0] == 0 and ranges[-1][1] == tokens.size - 1
    assert all(a % block == 0 for a, _ in ranges) and ranges[0][1] == ranges[1][0]

    one = extract(model, ident, tmp_path / "train.npy", tmp_path / "one", 1, block, batch)
    two = extract(model, ident, tmp_path / "train.npy", tmp_path / "two", 2, block, batch)
    keys1, vals1 = np.load(one[0][0]), np.load(one[0][1])
    keys2 = np.concatenate([np.load(k) for k, _, _ in two])
    vals2 = np.concatenate([np.load(v) for _, v, _ in two])
    assert keys1.dtype == np.float16 and keys1.shape == (tokens.size - 1, DIM)
    np.testing.assert_array_equal(vals1, tokens[1:])
    np.testing.assert_array_equal(vals2, vals1)
    # batches group windows differently; allow for float16 rounding of tiny differences
    np.testing.assert_allclose(keys2.astype(np.float32), keys1.astype(np.float32), rtol=1e-3, atol=1e-3)
    # the stored keys are the post-norm activations of the model, window by window
    _, ref, _ = collect(run_model(model, hook, tokens, 0, tokens.size - 1, block, 1, with_logprobs=False))
    np.testing.assert_allclose(keys1.astype(np.float32), ref, rtol=2e-3, atol=2e-3)

    manifest_path = tmp_path / "two" / "manifest.json"
    manifest = write_manifest(ident, tmp_path / "train.npy", two, manifest_path)
    assert manifest["rows"] == tokens.size - 1 and manifest["hook_point"] == HOOKS[arch]
    assert [s["keys"] for s in manifest["shards"]] == ["keys_0.npy", "keys_1.npy"]
    ds = Datastore(manifest_path)
    assert ds.rows == tokens.size - 1 and ds.dim == DIM
    ids = np.array([[0, ranges[0][1] - 1], [ranges[1][0], tokens.size - 2]])
    np.testing.assert_array_equal(ds.gather_vals(ids), tokens[1:][ids])
    np.testing.assert_array_equal(ds.gather_keys(ids), keys2[ids].astype(np.float32))
    ds.check_model(ident)

    other = identity(model, hook, model_sha256="cd" * 32)
    with pytest.raises(ArtifactError) as e:
        ds.check_model(other, "other/model.json")
    assert ident["model_sha256"] in str(e.value) and other["model_sha256"] in str(e.value)
    assert "other/model.json" in str(e.value)
    with pytest.raises(ArtifactError, match="hook_point"):
        ds.check_model(identity(model, "transformer.h.0.mlp"))

    # a shard built by another model is refused when the manifest is written
    with pytest.raises(ArtifactError, match="meta_0.json"):
        write_manifest(other, tmp_path / "train.npy", two, tmp_path / "two" / "other_manifest.json")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_shard_refused(arch_model, tmp_path, damage):
    _, model = arch_model
    ident = identity(model, find_hook_point(model))
    save_npy(tmp_path / "train.npy", stream(40, seed=3))
    files = extract(model, ident, tmp_path / "train.npy", tmp_path, 2, 8, 4)
    manifest_path = tmp_path / "manifest.json"
    write_manifest(ident, tmp_path / "train.npy", files, manifest_path)
    Datastore(manifest_path)
    victim = Path(files[1][0])
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:-7])
    elif damage == "flip":
        victim.write_bytes(data[:-5] + bytes([data[-5] ^ 0xFF]) + data[-4:])
    else:
        victim.unlink()
    with pytest.raises(ArtifactError, match=str(victim)):
        Datastore(manifest_path)
    if damage == "flip":  # a same-size change is caught only by the hash
        assert len(Datastore(manifest_path, deep=False).keys) == 2
