"""Integrity of what readers trust (issue 18, items 1, 3, 6), on a tiny world built here in a few seconds: a random
one-layer GPT-2 with a word-level tokenizer, a two-shard datastore written by ``extract_shard`` + ``write_manifest``,
a Flat and an IVFPQ index, a retrieval cache written by ``retrieve`` and a task cache written by ``score``.

* the retrieval cache and the task cache carry the sha256 of their files; readers refuse a file that differs, and
  non-finite distances by file and row;
* exactness is a property of the FAISS index loaded, not of ``index.json``'s ``exact`` flag;
* manifest shard paths stay inside the datastore directory (relative, no ``..``, no links), and a manifest edited
  after it was written is named as the altered file, never the good shard it disagrees with.
"""

import json
import re
import shutil
from pathlib import Path

import faiss
import numpy as np
import polars as pl
import pytest
import torch

from workflow_scripts import lm
from workflow_scripts.artifacts import ArtifactError, save_npy, sha256_file, write_json
from workflow_scripts.datastore import Datastore, write_manifest
from workflow_scripts.extraction import extract_shard
from workflow_scripts.index import build_index, load_index
from workflow_scripts.retrieval import retrieve
from workflow_scripts.retrieval_cache import CACHE_FILES, load_cache
from workflow_scripts.sweep import run_sweep
from workflow_scripts.tasks import evaluate, scoring
from workflow_scripts.tasks.items import write_items

VOCAB, DIM, BLOCK = 40, 32, 32
RETRIEVAL = {"k_max": 8, "max_tokens": 120, "block_size": BLOCK, "batch_size": 8, "device": "cpu", "nprobe": None,
             "dtype": "float16", "gpu_shard_above_gb": 4}  # as the rules pass them
GRID = {"lambdas": [0.0, 0.25, 0.5], "ks": [1, 8], "sigmas": [1.0, 10.0]}
IVFPQ = {"type": "IVFPQ", "nlist": 4, "m": 4, "nbits": 4, "nprobe": 2, "train_sample": 384}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before_faiss, before_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before_faiss)
    torch.set_num_threads(before_torch)


def _model(root: Path) -> Path:
    """A random GPT-2 saved with a whitespace word-level tokenizer ("t3 t7" -> [3, 7]); its model.json."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    vocab = {lm.EOS: 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=lm.EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=lm.EOS, bos_token=lm.EOS, unk_token=lm.EOS)
    config = tf.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=DIM, n_layer=1, n_head=2, bos_token_id=0,
                           eos_token_id=0)
    model = tf.GPT2LMHeadModel(config).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_json(root / "model.json", lm.describe(model, tok, {"source": "local", "path": str(root / "model")}))
    return root / "model.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """model.json, a datastore of 2 x 192 rows (ds/manifest.json, ds/shards/), ds/index.{faiss,json} (Flat),
    ds/ivfpq.{faiss,json}, the retrieval cache cache/ of 120 tokens (K = 8) and the eval tokens."""
    root = tmp_path_factory.mktemp("world")
    model_json = _model(root)
    model, _, ident = lm.load_checked(model_json, device="cpu")
    rng = np.random.default_rng(0)
    save_npy(root / "train.npy", rng.integers(1, VOCAB, 385).astype(np.int32))  # 384 positions: 2 x 6 blocks
    save_npy(root / "test.npy", rng.integers(1, VOCAB, 121).astype(np.int32))
    shards = root / "ds" / "shards"
    files = []
    for s in range(2):
        f = tuple(str(shards / n) for n in (f"keys_{s:03d}.npy", f"vals_{s:03d}.npy", f"shard_{s:03d}.json"))
        extract_shard(model, ident, root / "train.npy", s, 2, BLOCK, 8, *f)
        files.append(f)
    write_manifest(ident, root / "train.npy", files, root / "ds" / "manifest.json")
    build_index(root / "ds/manifest.json", {"type": "Flat"}, 0, root / "ds/index.faiss", root / "ds/index.json")
    build_index(root / "ds/manifest.json", IVFPQ, 0, root / "ds/ivfpq.faiss", root / "ds/ivfpq.json")
    retrieve(model_json, root / "ds/manifest.json", root / "ds/index.faiss", root / "ds/index.json",
             root / "test.npy", RETRIEVAL, root / "cache")
    return root


@pytest.fixture
def w(world, tmp_path):
    """A copy of the world to damage."""
    return Path(shutil.copytree(world, tmp_path / "w", symlinks=True))


def _sweep(w: Path, cache: Path):
    return run_sweep(cache, w / "ds/manifest.json", GRID, w / "out/ppl.csv", w / "out/ppl.parquet")


def _no_deletion_advice(msg: str) -> None:
    assert not re.search(r"\bdelete\b|\bremove\b|\brm\b", msg), msg


# --------------------------------------------------------------------------------------------- 1. retrieval cache
def test_retrieval_cache_records_the_sha256_of_each_file(world):
    meta = json.loads((world / "cache/meta.json").read_text())
    assert meta["sha256"] == {f"{n}.npy": sha256_file(world / "cache" / f"{n}.npy") for n in CACHE_FILES}
    load_cache(world / "cache", world / "ds/manifest.json")  # the cache as written loads


def test_vals_overwritten_with_the_targets_is_refused(w):
    """Same shape and dtype, a perfect kNN: before, the sweep reported a far better perplexity."""
    cache = w / "cache"
    honest = _sweep(w, cache).filter(pl.col("lambda") == 0.5)["ppl"].min()
    targets = np.load(cache / "targets.npy")
    vals = np.load(cache / "vals.npy")
    save_npy(cache / "vals.npy", np.broadcast_to(targets[:, None], vals.shape).astype(np.int32))
    shutil.rmtree(w / "out")
    with pytest.raises(ArtifactError) as e:
        print("honest ppl at λ .5:", honest, "tampered:", _sweep(w, cache).filter(pl.col("lambda") == 0.5)["ppl"].min())
    msg = str(e.value)
    assert msg.startswith(f"{cache / 'vals.npy'}: sha256 differs from the one recorded in {cache / 'meta.json'}")
    assert "rerun retrieve" in msg and str(cache / "meta.json") in msg
    assert not (w / "out").exists()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_distances_are_refused_by_file_and_row(w, bad):
    """A cache whose digests agree (as if retrieval itself wrote the NaN): before, NaN passed the ascending check
    (NaN compares false) and the sweep reported NaN perplexities, with an "oracle" at λ = 0."""
    cache = w / "cache"
    dists = np.load(cache / "dists.npy")
    dists[7, 3:] = bad
    dists[50] = bad
    save_npy(cache / "dists.npy", dists)
    meta = json.loads((cache / "meta.json").read_text())
    meta.setdefault("sha256", {})["dists.npy"] = sha256_file(cache / "dists.npy")
    write_json(cache / "meta.json", meta)
    with pytest.raises(ArtifactError) as e:
        df = _sweep(w, cache)
        print(df.filter(pl.col("lambda") > 0).head(3), df.sort("ppl").head(1))
    msg = str(e.value)
    assert msg.startswith(f"{cache / 'dists.npy'}: non-finite distance ({bad}) at row 7, column 3")
    assert "2 of 120 rows" in msg and "rerun retrieve" in msg
    _no_deletion_advice(msg)


def test_cache_meta_altered_blames_meta_not_the_arrays(w):
    """K changed in meta.json: every array matches its recorded digest, so the message must not advise deleting."""
    meta = json.loads((w / "cache/meta.json").read_text())
    meta["K"] = 9
    write_json(w / "cache/meta.json", meta)
    with pytest.raises(ArtifactError) as e:
        load_cache(w / "cache")
    msg = str(e.value)
    assert "meta.json says N=120, K=9" in msg and "match the sha256 recorded" in msg and "rerun retrieve" in msg
    _no_deletion_advice(msg)


def test_cache_without_digests_is_refused(w):
    meta = json.loads((w / "cache/meta.json").read_text())
    meta.pop("sha256", None)
    write_json(w / "cache/meta.json", meta)
    with pytest.raises(ArtifactError, match=re.escape(f"{w / 'cache/meta.json'}: no sha256 record")):
        load_cache(w / "cache")


def _choice_items(path: Path) -> None:
    items = []
    for i in range(6):
        ctx = f"t{1 + i} t{2 + i} t{3 + i}"
        items.append({"id": str(i), "question": ctx, "answer": "A", "labels": ["A", "B"], "gold": i % 2,
                      "options": [[[ctx, f"t{10 + i}"]], [[ctx, f"t{20 + i} t{21 + i}"]]], "domain": None})
    write_items(items, path)


def test_task_cache_records_its_npz_sha256_and_the_sweep_checks_it(w):
    p = {**RETRIEVAL, "task": "toy", "datastore": "ds", "model": "m",
         "entry": {"kind": "choice", "metric": "accuracy", "category": "reasoning"}, "grid": GRID}
    _choice_items(w / "items.parquet")
    d = w / "task"
    scoring.score(w / "model.json", w / "ds/manifest.json", w / "ds/index.faiss", w / "ds/index.json",
                  w / "items.parquet", p, d / "scored.npz", d / "scored.json")
    record = json.loads((d / "scored.json").read_text())
    assert record["meta"]["npz_sha256"] == sha256_file(d / "scored.npz")
    out = [d / n for n in ("sweep.csv", "sweep.parquet", "pred.parquet", "summary.json")]
    evaluate.sweep_task(d / "scored.npz", d / "scored.json", w / "items.parquet", p, None, *out)
    with np.load(d / "scored.npz", allow_pickle=False) as z:
        cache = {k: z[k] for k in z.files}
    cache["q_vals"] = cache["q_vals"][::-1].copy()  # same shapes, other neighbours
    np.savez(d / "scored.npz", **cache)
    with pytest.raises(ArtifactError) as e:
        evaluate.sweep_task(d / "scored.npz", d / "scored.json", w / "items.parquet", p, None, *out)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'scored.npz'}: sha256 differs from the one recorded in {d / 'scored.json'}")
    assert "rerun score_task" in msg


# --------------------------------------------------------------------------------------------- 3. index exactness
def test_exactness_comes_from_the_index_not_from_index_json(w):
    ds = Datastore(w / "ds/manifest.json")
    _, meta = load_index(w / "ds/ivfpq.faiss", w / "ds/ivfpq.json", ds)
    assert meta["exact"] is False
    _, meta = load_index(w / "ds/index.faiss", w / "ds/index.json", ds)
    assert meta["exact"] is True
    for name, flag, kind in (("ivfpq", True, "IndexIVFPQ"), ("index", False, "IndexFlatL2")):
        m = json.loads((w / f"ds/{name}.json").read_text())
        m["exact"] = flag
        write_json(w / f"ds/{name}.json", m)
        with pytest.raises(ArtifactError) as e:
            load_index(w / f"ds/{name}.faiss", w / f"ds/{name}.json", ds)
        msg = str(e.value)
        assert f"{w / f'ds/{name}.json'} says exact={str(flag).lower()}" in msg
        assert f"{w / f'ds/{name}.faiss'} is a FAISS {kind} (" in msg
        assert "rerun the job that built it (merge_index" in msg
        _no_deletion_advice(msg)


def test_exactness_without_a_flag_is_read_off_the_index(w):
    m = json.loads((w / "ds/ivfpq.json").read_text())
    del m["exact"]
    write_json(w / "ds/ivfpq.json", m)
    _, meta = load_index(w / "ds/ivfpq.faiss", w / "ds/ivfpq.json", Datastore(w / "ds/manifest.json"))
    assert meta["exact"] is False


# --------------------------------------------------------------------------------------------- 6. manifest paths
def _edit_manifest(w: Path, edit) -> Path:
    path = w / "ds/manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=2, sort_keys=True))
    return path


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_path_outside_the_datastore_is_refused(w, where):
    outside = w / "elsewhere" / "keys_001.npy"  # a faithful copy, so that only the path is wrong
    outside.parent.mkdir()
    shutil.copy(w / "ds/shards/keys_001.npy", outside)
    rel = "../elsewhere/keys_001.npy" if where == "parent" else str(outside)
    path = _edit_manifest(w, lambda m: m["shards"][1].update(keys=rel))
    with pytest.raises(ArtifactError) as e:
        Datastore(path)
    msg = str(e.value)
    what = "is absolute" if where == "absolute" else "leads outside"
    assert msg.startswith(f"manifest {path}: shard 1 keys path {rel!r} {what}"), msg
    assert "rerun datastore_manifest" in msg
    _no_deletion_advice(msg)


def test_shard_path_to_etc_passwd_is_refused_without_advice_to_delete_it(w):
    path = _edit_manifest(w, lambda m: m["shards"][0].update(values="../../../../../../../../etc/passwd"))
    with pytest.raises(ArtifactError) as e:
        Datastore(path)
    msg = str(e.value)
    assert "'../../../../../../../../etc/passwd' leads outside" in msg
    _no_deletion_advice(msg)


@pytest.mark.parametrize("target", ["outside", "other shard"])
def test_symlinked_shard_is_refused(w, target):
    link = w / "ds/shards/keys_001.npy"
    if target == "outside":
        dest = w / "elsewhere.npy"
        shutil.copy(link, dest)  # identical content: the digests in the manifest agree with it
    else:
        dest = w / "ds/shards/keys_000.npy"
    link.unlink()
    link.symlink_to(dest)
    with pytest.raises(ArtifactError) as e:
        Datastore(w / "ds/manifest.json")
    msg = str(e.value)
    assert msg.startswith(f"manifest {w / 'ds/manifest.json'}: shard 1 keys path 'shards/keys_001.npy' is a "
                          f"symbolic link (to {dest})"), msg
    _no_deletion_advice(msg)


def test_tampered_digest_in_the_manifest_blames_the_manifest_not_the_shard(w):
    path = _edit_manifest(w, lambda m: m["shards"][1].update(keys_sha256="0" * 64))
    with pytest.raises(ArtifactError) as e:
        Datastore(path)
    msg = str(e.value)
    assert msg.startswith(f"manifest {path} was edited after it was written")
    assert "rerun datastore_manifest" in msg
    assert "keys_001.npy" not in msg  # the good shard is not blamed
    _no_deletion_advice(msg)


def test_shard_altered_under_an_intact_manifest_is_blamed(w):
    """The manifest checks out, so the shard is provably the altered file: deleting it is the right advice."""
    shard = w / "ds/shards/vals_000.npy"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=re.escape(f"{shard}: sha256 differs from manifest {w / 'ds/manifest.json'}"
                                                      " (altered); delete it and rerun extract_keys")):
        Datastore(w / "ds/manifest.json")
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(ArtifactError, match=re.escape(f"{shard}: {len(data) - 8} bytes, manifest")):
        Datastore(w / "ds/manifest.json")


def test_legacy_manifest_without_self_digest_does_not_blame_the_shard(w):
    """A manifest written before the self digest: the two records disagree and nothing says which is right."""
    def edit(m):
        m.pop("self_sha256", None)
        m["shards"][1]["keys_sha256"] = "0" * 64
    path = _edit_manifest(w, edit)
    with pytest.raises(ArtifactError) as e:
        Datastore(path)
    msg = str(e.value)
    assert "keys_001.npy" in msg and "disagree" in msg and "the manifest may be the altered one" in msg
    _no_deletion_advice(msg)


# --------------------------------------------------------------------------------------------- 7. chunked retrieval
@pytest.mark.parametrize("index", ["index", "ivfpq"])
def test_chunked_retrieval_is_byte_identical_to_one_job(world, tmp_path, index):
    """retrieval.chunks: the eval set cut on whole model and search batches (unit 32 here: batch_size 1 window of
    32, search batches of 32), 3 chunk caches joined by ``merge_chunks``: every array file is the one-job cache's,
    byte for byte (windows, forward passes and FAISS calls are the same), and meta.json too but for its timings."""
    from workflow_scripts.retrieval_cache import chunk_bounds, chunk_unit, merge_chunks

    cfg = {**RETRIEVAL, "batch_size": 1, "search_batch": 32, "nprobe": IVFPQ["nprobe"] if index == "ivfpq" else None}
    args = (world / "model.json", world / "ds/manifest.json", world / f"ds/{index}.faiss", world / f"ds/{index}.json",
            world / "test.npy", cfg)
    one = retrieve(*args, tmp_path / "one")
    assert chunk_unit(cfg) == 32 and chunk_bounds(120, 3, 32) == [(0, 32), (32, 96), (96, 120)]
    metas = []
    for i in range(3):
        retrieve(*args, tmp_path / f"chunk{i}", chunk=(i, 3))
        metas.append(tmp_path / f"chunk{i}" / "meta.json")
    joined = merge_chunks(metas, world / "test.npy", cfg, tmp_path / "joined")
    for name in CACHE_FILES:
        assert (tmp_path / "joined" / f"{name}.npy").read_bytes() == (tmp_path / "one" / f"{name}.npy").read_bytes()
    assert joined["sha256"] == one["sha256"]
    drop = ("seconds", "chunks")
    assert {k: v for k, v in joined.items() if k not in drop} == {k: v for k, v in one.items() if k not in drop}
    assert load_cache(tmp_path / "joined", world / "ds/manifest.json")["meta"]["n_tokens"] == 120
    # a chunk of another run (here: the chunks given out of order) is refused by name
    with pytest.raises(ArtifactError, match=r"chunk1/meta\.json: chunk .* expected \{'index': 0"):
        merge_chunks(metas[1:] + metas[:1], world / "test.npy", cfg, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
