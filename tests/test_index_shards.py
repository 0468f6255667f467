"""The sharded index build (train_index -> add_shard per shard -> merge_index) and the sharded exact search, on
synthetic datastores written here (no model): each equals one index built in one process, ids and distances.

* IVFPQ: parts added shard by shard under global row ids and merged into on-disk inverted lists give the same
  search results as the same trained index filled in one process; the on-disk lists are found again after the
  directory is moved (their path is stored relative and re-pointed on load);
* Flat: ``ShardedFlat`` (ranges aligned to FAISS's BLAS blocks) equals one ``IndexFlatL2`` over all keys, ties
  (duplicate keys) broken by global row id, for shard sizes that are not multiples of the block;
* every intermediate file is checked against its recorded digest, and a part of another datastore is refused.
"""

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts import index as ix
from workflow_scripts.artifacts import ArtifactError, save_npy
from workflow_scripts.datastore import Datastore, shard_digests, write_manifest, write_shard_meta

IDENT = {"model_sha256": "m", "tokenizer_sha256": "t", "hook_point": "h", "dim": 32, "vocab_size": 50,
         "source": "local", "path": "x", "revision": None, "architecture": "GPT2"}
IVFPQ = {"type": "IVFPQ", "nlist": 16, "m": 8, "nbits": 6, "nprobe": 4, "train_sample": 2000}


def make_datastore(root: Path, sizes: list[int], dim: int = 32, seed: int = 0, dup: bool = False) -> Path:
    """A datastore of Gaussian-mixture float16 keys in shards of ``sizes`` rows; ``dup``: many exact duplicates
    (ties). Returns its manifest."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    centres = rng.normal(size=(8, dim)) * 3
    keys = (centres[rng.integers(0, 8, n)] + rng.normal(size=(n, dim))).astype(np.float16)
    if dup:
        keys = keys[rng.integers(0, 200, n)]
    save_npy(root / "tokens.npy", rng.integers(0, 50, n + 1).astype(np.int32))
    files, start = [], 0
    for s, rows in enumerate(sizes):
        k, v, m = (root / "shards" / f"{kind}_{s:03d}.{ext}" for kind, ext in
                   (("keys", "npy"), ("vals", "npy"), ("shard", "json")))
        save_npy(k, keys[start : start + rows])
        save_npy(v, rng.integers(0, 50, rows).astype(np.int32))
        write_shard_meta(m, {**IDENT, "dim": dim}, s, start, start + rows, shard_digests(k, v))
        files.append((str(k), str(v), str(m)))
        start += rows
    write_manifest({**IDENT, "dim": dim}, root / "tokens.npy", files, root / "manifest.json")
    return root / "manifest.json"


def sharded_build(manifest: Path, cfg: dict, out: Path, seed: int = 0) -> tuple[Path, Path]:
    """train_index, add_shard for every shard, merge_index, as the rules run them; (index.faiss, index.json)."""
    root = manifest.parent
    n = len(json.loads(manifest.read_text())["shards"])
    parts, metas = [], []
    trained, tmeta = out / "index" / "trained.faiss", out / "index" / "trained.json"
    if cfg["type"] != "Flat":
        ix.train_index(manifest, cfg, seed, trained, tmeta)
        for s in range(n):
            parts.append(out / "index" / f"part_{s:03d}.faiss")
            metas.append(out / "index" / f"part_{s:03d}.json")
            ix.add_shard(trained, tmeta, root / "shards" / f"keys_{s:03d}.npy", root / "shards" / f"shard_{s:03d}.json",
                         parts[-1], metas[-1])
    ix.merge_index(manifest, cfg, trained, tmeta, parts, metas, out / "index.faiss", out / "index.json")
    return out / "index.faiss", out / "index.json"


def one_process(manifest: Path, trained: Path) -> faiss.Index:
    """The same trained index, filled with every key in one process (ids 0..N-1 in shard order)."""
    index = faiss.read_index(str(trained))
    for keys in Datastore(manifest).keys:
        ix.add_keys(index, keys)
    return index


def queries(n: int, dim: int = 32, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float16).astype(np.float32) * 2


def test_ivfpq_train_add_merge_equals_one_process_build(tmp_path):
    manifest = make_datastore(tmp_path / "ds", [1500, 977, 2100])
    index_path, meta_path = sharded_build(manifest, IVFPQ, tmp_path / "ds")
    meta = json.loads(meta_path.read_text())
    assert meta["layout"] == "ondisk" and meta["ntotal"] == 4577 and not meta["exact"]
    ds = Datastore(manifest)
    merged, lmeta = ix.load_index(index_path, meta_path, ds, nprobe=4)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
    assert isinstance(invlists, faiss.OnDiskInvertedLists)  # memory-mapped, not loaded
    ref = one_process(manifest, tmp_path / "ds" / "index" / "trained.faiss")
    faiss.extract_index_ivf(ref).nprobe = 4
    q = queries(300)
    d0, i0 = ref.search(q, 50)
    d1, i1 = merged.search(q, 50)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
    assert (i0 >= 0).all() and len(np.unique(i0)) > 1000  # a real search: many distinct neighbours
    # the inverted lists' path is stored relative: the index still loads after its directory is moved
    del merged, invlists
    moved = tmp_path / "elsewhere" / "ds"
    shutil.move(tmp_path / "ds", moved)
    again, _ = ix.load_index(moved / "index.faiss", moved / "index.json", Datastore(moved / "manifest.json"), 4)
    assert faiss.downcast_InvertedLists(faiss.extract_index_ivf(again).invlists).filename == str(moved / ix.IVFDATA)
    d2, i2 = again.search(q, 50)
    np.testing.assert_array_equal(i2, i0)
    np.testing.assert_array_equal(d2, d0)


def test_polysemous_training_is_off_unless_asked(tmp_path):
    manifest = make_datastore(tmp_path / "ds", [800, 800])
    ds = Datastore(manifest)
    for flag in (False, True):
        index = ix.new_index({**IVFPQ, "nbits": 8, "polysemous": flag}, ds.dim)
        assert faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training is flag


@pytest.mark.parametrize("sizes", [[3000, 1700, 2333], [1024, 2048], [5000]])
def test_sharded_flat_equals_one_flat_index_ties_by_row_id(tmp_path, sizes):
    manifest = make_datastore(tmp_path / "ds", sizes, dup=True)  # 200 distinct keys: ties everywhere
    ds = Datastore(manifest)
    flat = faiss.IndexFlatL2(ds.dim)
    for keys in ds.keys:
        flat.add(np.asarray(keys, np.float32))
    rng = np.random.default_rng(2)
    q = np.concatenate([ds.gather_keys(rng.integers(0, ds.rows, 200)), queries(100)])  # exact hits and misses
    sharded = ix.ShardedFlat(ds, rows=ix.BLAS_BLOCK)  # the smallest range: the most merges
    for k in (1, 64, 2048):
        d0, i0 = flat.search(q, k)
        d1, i1 = sharded.search(q, k)
        np.testing.assert_array_equal(d1, d0)
        np.testing.assert_array_equal(i1, i0)
    # ties are really broken by row id: within equal distances, ids ascend
    tie = (np.diff(d1, axis=1) == 0)
    assert tie.sum() > 1000 and (np.diff(i1, axis=1)[tie] > 0).all()
    # and by brute force (float64): the 64 returned are the 64 nearest keys
    keys = ds.gather_keys(np.arange(ds.rows)).astype(np.float64)
    brute = ((q[:20, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1)
    for r in range(20):
        np.testing.assert_allclose(brute[r][i1[r, :64]], np.sort(brute[r])[:64], rtol=1e-5, atol=1e-3)

@pytest.mark.parametrize("batch", [7, 64, 300])
def test_searching_in_batches_reads_each_range_once_and_equals_one_call_per_batch(tmp_path, batch, monkeypatch):
    """index.search over a ShardedFlat: each range of keys is read (and converted to float32) once for all the
    batches of queries, and every batch's neighbours are those of a ShardedFlat.search call on that batch alone."""
    manifest = make_datastore(tmp_path / "ds", [3000, 1700], dup=True)
    ds = Datastore(manifest)
    sharded = ix.ShardedFlat(ds, rows=ix.BLAS_BLOCK)
    rng = np.random.default_rng(3)
    q = np.concatenate([ds.gather_keys(rng.integers(0, ds.rows, 150)), queries(150)])
    want = [sharded.search(q[a : a + batch], 1500) for a in range(0, len(q), batch)]
    reads = []
    keys = ix.ShardedFlat.keys
    monkeypatch.setattr(ix.ShardedFlat, "keys", lambda self, a, b: reads.append(a) or keys(self, a, b))
    d, i = ix.search(sharded, ds, q, 1500, exact=True, batch=batch)
    assert reads == list(range(0, ds.rows, ix.BLAS_BLOCK))  # 5 ranges, each read once
    np.testing.assert_array_equal(d, np.maximum(np.concatenate([w[0] for w in want]), 0))
    np.testing.assert_array_equal(i, np.concatenate([w[1] for w in want]))


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 30), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_merge_topk_sorts_by_distance_then_row_as_lexsort(n1, n2, k, seed):
    """The packed-key merge gives np.lexsort's order: distances (negative, -0.0 and ties included), then rows."""
    rng = np.random.default_rng(seed)
    pool = np.array([-1.5, -0.0, 0.0, 0.25, 0.25, 3.0, np.finfo(np.float32).max], np.float32)

    def cands(n, lo):
        d = np.sort(rng.choice(pool, (4, n)).astype(np.float32), axis=1)
        return d, rng.choice(np.arange(lo, lo + 10 * n), (4, n), replace=False).astype(np.int64)

    (d1, i1), (d2, i2) = cands(n1, 0), cands(n2, 1000)
    d, i = np.concatenate([d1, d2], 1), np.concatenate([i1, i2], 1)
    order = np.lexsort((i, d), axis=1)[:, :k]
    got_d, got_i = ix.merge_topk(d1, i1, d2, i2, k)
    np.testing.assert_array_equal(got_i, np.take_along_axis(i, order, 1))
    np.testing.assert_array_equal(got_d, np.take_along_axis(d, order, 1))


def test_sharded_flat_through_merge_index_and_load_index(tmp_path):
    manifest = make_datastore(tmp_path / "ds", [1200, 900])
    index_path, meta_path = sharded_build(manifest, {"type": "Flat"}, tmp_path / "ds")
    meta = json.loads(meta_path.read_text())
    assert meta["layout"] == "sharded" and meta["exact"] is True and meta["ntotal"] == 2100
    assert index_path.stat().st_size < 200  # an empty IndexFlatL2: no float32 copy of the keys
    ds = Datastore(manifest)
    searcher, lmeta = ix.load_index(index_path, meta_path, ds)
    assert isinstance(searcher, ix.ShardedFlat) and lmeta["exact"] is True
    flat = faiss.IndexFlatL2(ds.dim)
    flat.add(ds.gather_keys(np.arange(ds.rows)))
    q = queries(64)
    for got, want in zip(searcher.search(q, 100), flat.search(q, 100), strict=True):
        np.testing.assert_array_equal(got, want)


def test_parts_are_checked_against_their_digests_and_the_datastore(tmp_path):
    manifest = make_datastore(tmp_path / "ds", [900, 800])
    sharded_build(manifest, IVFPQ, tmp_path / "ds")
    d = tmp_path / "ds" / "index"
    parts = [d / "part_000.faiss", d / "part_001.faiss"]
    metas = [d / "part_000.json", d / "part_001.json"]
    args = (manifest, IVFPQ, d / "trained.faiss", d / "trained.json")
    # parts swapped: each matches its own digest, but not the shard it is merged as
    with pytest.raises(ArtifactError, match=r"part_001\.json: keys_sha256, start, rows differ from shard 0"):
        ix.merge_index(*args, parts[::-1], metas[::-1], tmp_path / "o.faiss", tmp_path / "o.json")
    data = bytearray(parts[1].read_bytes())
    data[len(data) // 2] ^= 1
    parts[1].write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"part_001\.faiss: sha256 differs from .*part_001\.json"):
        ix.merge_index(*args, parts, metas, tmp_path / "o.faiss", tmp_path / "o.json")
    assert not (tmp_path / "o.faiss").exists()
    data = bytearray((tmp_path / "ds" / ix.IVFDATA).read_bytes())
    data[10] ^= 1
    (tmp_path / "ds" / ix.IVFDATA).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"index\.ivfdata: sha256 differs from .*index\.json \(altered\)"):
        ix.load_index(tmp_path / "ds/index.faiss", tmp_path / "ds/index.json", Datastore(manifest))


# ------------------------------------------------------------------------------------------ memory planning
def _manifest(shards: list[int], dim: int = 1024) -> dict:
    return {"dim": dim, "rows": sum(shards), "shards": [{"rows": r} for r in shards]}


def test_memory_plan_of_add_shard_is_bounded_by_one_shard_and_search_by_a_range():
    from workflow_scripts import memory

    cfg = {**IVFPQ, "m": 64, "nbits": 8, "nlist": 4096, "train_sample": 1_000_000}
    small, big = _manifest([9_500_000] * 4), _manifest([9_500_000] * 64)  # paper 1: 64 shards of 9.5M keys
    assert memory.estimate_mb("add_shard", small, cfg) == memory.estimate_mb("add_shard", big, cfg)
    assert memory.estimate_mb("merge_index", small, cfg) == memory.estimate_mb("merge_index", big, cfg)
    keys_mb = big["rows"] * big["dim"] * 2 >> 20
    flat = {"type": "Flat"}
    assert memory.estimate_mb("retrieve", big, flat, 2048, 4096)[0] < keys_mb / 100  # ranges, not all keys
    # what it counts grows as it should: codes with the shard, cache arrays with the queries of a job
    one = memory.estimate_mb("add_shard", _manifest([1_000_000]), cfg)[0]
    two = memory.estimate_mb("add_shard", _manifest([2_000_000]), cfg)[0]
    assert two - one == pytest.approx(2 * 1_000_000 * memory.code_bytes(cfg) / 2**20, abs=1)
    q1, q2 = (memory.estimate_mb("retrieve", big, flat, 2048, n)[0] for n in (100_000, 200_000))
    assert q2 - q1 == pytest.approx(100_000 * (2048 * 16 + 1024 * 2) / 2**20, abs=1)
    assert memory.estimate_mb("add_shard", None, cfg) == (memory.BASE_MB, "placeholder until the manifest exists")


def test_a_job_with_less_memory_than_its_plan_stops_at_once_naming_the_plan_and_the_key(tmp_path, monkeypatch):
    from workflow_scripts import memory

    monkeypatch.setenv("SLURM_MEM_PER_NODE", "1000")
    assert memory.available_mb() == (1000, "SLURM_MEM_PER_NODE")
    manifest = make_datastore(tmp_path / "ds", [900, 800])
    need = memory.estimate_mb("train_index", json.loads(manifest.read_text()), IVFPQ)[0]
    with pytest.raises(memory.NotEnoughMemory) as e:
        ix.train_index(manifest, IVFPQ, 0, tmp_path / "t.faiss", tmp_path / "t.json")
    msg = str(e.value)
    assert f"train_index needs about {need} MiB" in msg and "has 1000 MiB (SLURM_MEM_PER_NODE)" in msg
    assert "lower index.train_sample" in msg and f"--set-resources train_index:mem_mb={need}" in msg
    assert not (tmp_path / "t.faiss").exists()
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(need))
    ix.train_index(manifest, IVFPQ, 0, tmp_path / "t.faiss", tmp_path / "t.json")  # exactly enough: it runs
    assert (tmp_path / "t.faiss").exists()


@pytest.mark.parametrize("shape", [(0,), (5,), (70_000,), (7, 3), ()])
@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_memory_planning_reads_an_npy_files_rows_off_any_header(tmp_path, shape, version):
    """The rules size retrieval from the eval set's token file: its rows, whatever numpy wrote as header."""
    from workflow_scripts import memory

    path = tmp_path / "tokens.npy"
    with path.open("wb") as f:
        np.lib.format.write_array(f, np.zeros(shape, np.int32), version=version)
    assert memory.npy_rows(path) == np.load(path, mmap_mode="r").reshape(-1, *shape[1:]).shape[0]
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="bad.npy: not a .npy file"):
        memory.npy_rows(tmp_path / "bad.npy")


def test_search_plans_count_ivfpqs_precomputed_table_read_off_the_built_index():
    """FAISS builds an IVFPQ table of nlist x m x 2^nbits floats when it loads an index for search (up to its
    precomputed_table_max_bytes); the step reads the index's shape off index.json's factory string."""
    from workflow_scripts import memory

    manifest = {"dim": 128, "rows": 16_000_000, "shards": [{"rows": 500_000}] * 32}
    meta = {"exact": False, "factory": ix.factory_string({**IVFPQ, "nlist": 16384, "m": 16, "nbits": 8}, 128)}
    cfg = memory.search_config(meta, "pq")
    assert cfg == {"type": "IVFPQ", "distances": "pq", "nlist": 16384, "m": 16, "nbits": 8}
    without = memory.estimate_mb("retrieve", manifest, {**cfg, "nlist": 0}, 1024, 10_000)[0]
    assert memory.estimate_mb("retrieve", manifest, cfg, 1024, 10_000)[0] - without == 16384 * 16 * 256 * 4 >> 20
    huge = {**cfg, "nlist": 1 << 20}  # 16 GiB of table: FAISS does not build it
    assert memory.estimate_mb("retrieve", manifest, huge, 1024, 10_000)[0] - without == 2048
    assert memory.search_config({"exact": True, "factory": "Flat"}, "exact") == {"type": "Flat", "distances": "exact"}


@pytest.mark.parametrize("sizes", [[3000, 1700, 2333], [5000]])
def test_gather_reads_each_row_from_its_shard_for_ids_of_any_shape(tmp_path, sizes):
    ds = Datastore(make_datastore(tmp_path / "ds", sizes))
    keys = np.concatenate([np.asarray(k, np.float32) for k in ds.keys])
    vals = np.concatenate([np.asarray(v) for v in ds.vals])
    rng = np.random.default_rng(4)
    edges = np.array([0, *np.cumsum(sizes)[:-1], ds.rows - 1])  # first rows of the shards, the last row
    for ids in (rng.integers(0, ds.rows, (7, 11)), edges, edges[::-1].reshape(1, -1)):
        np.testing.assert_array_equal(ds.gather_vals(ids), vals[ids])
        np.testing.assert_array_equal(ds.gather_keys(ids), keys[ids])


def test_ivfpq_with_more_centroids_than_training_keys_is_refused_naming_the_keys(tmp_path):
    """Issue 30 item 11: a datastore of fewer keys than index.nlist (or 2^nbits) stopped on FAISS's raw assertion
    `nx >= k`; train_index now says which keys and which config keys, before FAISS runs (config time catches
    nlist > train_sample, test_config.py)."""
    manifest = make_datastore(tmp_path, [30, 20])
    with pytest.raises(ValueError, match=r"manifest.json: 50 keys to train IVF64,PQ8x6 .*index.train_sample = 2000\), "
                       r"fewer than its 64 centroids \(index.nlist = 64"):
        ix.train_index(manifest, {**IVFPQ, "nlist": 64}, 0, tmp_path / "t.faiss", tmp_path / "t.json")
    assert not (tmp_path / "t.faiss").exists()
