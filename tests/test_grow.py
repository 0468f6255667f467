"""A datastore that grows (datastores.<name>.shard_tokens): shards of a fixed number of positions, planned from the
tokens (checkpoint plan_shards, a range and the sha256 of its token slice each), so a stream that grows at its end
re-extracts and re-encodes only its old last shard and the new ones, keeps the trained quantizer and re-merges.

* unit: the plan's ranges and slice hashes (against hashlib on the slice, and across a grown stream), the
  block-multiple and exclusivity checks of the config, the manifest refusing a shard whose token slice changed;
* end-to-end (slow): a shard_tokens IVFPQ datastore over a local corpus, built on a copy of the micro run; the
  corpus grows by a file; the rerun's jobs (from Snakemake's own log), the kept files, the merged index against
  one built here with FAISS from every shard's keys and the same trained quantizer, and index.retrain's plan.
"""

import copy
import hashlib
import re
import shutil

import faiss
import numpy as np
import pytest
import yaml
from conftest import ROOT, background, snakemake
from hypothesis import given, settings
from hypothesis import strategies as st

from workflow_scripts.artifacts import ArtifactError, read_json, save_npy, sha256_file
from workflow_scripts.config import ConfigError, validate
from workflow_scripts.datastore import (
    shard_digests,
    shard_plan,
    slice_sha256,
    token_shard_ranges,
    write_manifest,
    write_shard_meta,
)

IDENT = {"model_sha256": "m", "tokenizer_sha256": "t", "hook_point": "h", "dim": 8, "vocab_size": 50,
         "source": "local", "path": "x", "revision": None, "architecture": "GPT2"}


# ------------------------------------------------------------------------------------------ the plan
@settings(max_examples=200, deadline=None)
@given(st.integers(2, 3000), st.integers(1, 20), st.integers(1, 64), st.integers(0, 2000))
def test_token_shards_are_fixed_cuts_and_a_longer_stream_keeps_all_but_the_last(n_tokens, blocks, block, more):
    S = blocks * block
    ranges = token_shard_ranges(n_tokens, S, block)
    n_pos = n_tokens - 1
    assert ranges[0][0] == 0 and ranges[-1][1] == n_pos
    assert all(b == c for (_, b), (c, _) in zip(ranges, ranges[1:], strict=False))
    assert all(a == i * S and 0 < b - a <= S for i, (a, b) in enumerate(ranges))
    assert all(b - a == S for a, b in ranges[:-1])
    assert len(ranges) == -(-n_pos // S)
    grown = token_shard_ranges(n_tokens + more, S, block)
    assert grown[: len(ranges) - 1] == ranges[:-1]  # every shard before the old last one is unchanged
    assert grown[len(ranges) - 1][0] == ranges[-1][0]


@pytest.mark.parametrize("S, block", [(48, 32), (0, 32), (-32, 32)])
def test_token_shards_must_be_a_positive_multiple_of_the_block(S, block):
    with pytest.raises(ValueError, match=f"shard_tokens {S} is not a positive multiple of extraction.block_size"):
        token_shard_ranges(1000, S, block)


def test_plan_hashes_each_shards_token_slice_and_a_grown_stream_changes_only_the_last(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, 1000).astype(np.int32)
    grown = np.concatenate([tokens, rng.integers(0, 50, 333).astype(np.int32)])
    save_npy(tmp_path / "a.npy", tokens)
    save_npy(tmp_path / "b.npy", grown)
    plan = shard_plan(tmp_path / "a.npy", 256, 32)
    assert plan["n_tokens"] == 1000 and [(s["start"], s["end"]) for s in plan["shards"]] == [
        (0, 256), (256, 512), (512, 768), (768, 999)]
    for s in plan["shards"]:  # keys and values of positions [start, end) read tokens[start : end + 1]
        want = hashlib.sha256(tokens[s["start"] : s["end"] + 1].astype("<i4").tobytes()).hexdigest()
        assert s["slice_sha256"] == want
    after = shard_plan(tmp_path / "b.npy", 256, 32)["shards"]
    assert [(s["start"], s["end"]) for s in after] == [(0, 256), (256, 512), (512, 768), (768, 1024), (1024, 1280),
                                                      (1280, 1332)]
    assert after[:3] == plan["shards"][:3]
    assert after[3]["slice_sha256"] != plan["shards"][3]["slice_sha256"]
    changed = tokens.copy()
    changed[300] += 1  # one token of shard 1 (and the value of position 299)
    assert slice_sha256(changed, 256, 512) != slice_sha256(tokens, 256, 512)
    assert slice_sha256(changed, 0, 256) == slice_sha256(tokens, 0, 256)


# ------------------------------------------------------------------------------------------ the config
def micro_config() -> dict:
    return yaml.safe_load((ROOT / "tests" / "configs" / "micro.yaml").read_text())


def test_shard_tokens_is_checked_and_exclusive_with_shards():
    c = micro_config()
    c["datastores"]["micro"] = {"model": "micro-gpt2", "corpus": "micro", "shard_tokens": 100}
    with pytest.raises(ConfigError, match=r"datastores\.micro\.shard_tokens: 100 is not a multiple of "
                                          r"extraction\.block_size \(32\)"):
        validate(copy.deepcopy(c))
    c["datastores"]["micro"].update(shard_tokens=128, shards=2)
    with pytest.raises(ConfigError, match=r"datastores\.micro: shards \(2\) and shard_tokens \(128\)"):
        validate(copy.deepcopy(c))
    del c["datastores"]["micro"]["shards"]
    c["datastores"]["half"] = {"subsample": {"of": "micro", "fraction": 0.5}}
    v = validate(copy.deepcopy(c))
    assert "shards" not in v["datastores"]["micro"] and v["datastores"]["half"]["shard_tokens"] == 128
    assert "shards" not in v["datastores"]["half"]
    assert validate(v) == v  # validating again changes nothing
    c["datastores"]["micro"] = {"model": "micro-gpt2", "corpus": "micro"}
    assert validate(c)["datastores"]["micro"]["shards"] == 1  # neither: one shard, as before


# ------------------------------------------------------------------------------------------ the manifest
def token_datastore(root, tokens: np.ndarray, S: int, block: int = 32):
    """A datastore of random keys cut by shard_tokens, its shard metas recording their slices' sha256."""
    save_npy(root / "tokens.npy", tokens)
    plan = shard_plan(root / "tokens.npy", S, block)
    rng = np.random.default_rng(1)
    files = []
    for s in plan["shards"]:
        k, v, m = (root / "shards" / f"{kind}_{s['shard']:03d}.{ext}" for kind, ext in
                   (("keys", "npy"), ("vals", "npy"), ("shard", "json")))
        save_npy(k, rng.normal(size=(s["end"] - s["start"], IDENT["dim"])).astype(np.float16))
        save_npy(v, tokens[s["start"] + 1 : s["end"] + 1])
        write_shard_meta(m, IDENT, s["shard"], s["start"], s["end"], shard_digests(k, v),
                         slice_digest=s["slice_sha256"])
        files.append((str(k), str(v), str(m)))
    return files


def test_manifest_refuses_a_shard_extracted_from_other_tokens_naming_it(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50, 700).astype(np.int32)
    files = token_datastore(tmp_path, tokens, 256)
    m = write_manifest(IDENT, tmp_path / "tokens.npy", files, tmp_path / "manifest.json")
    assert [s["start"] for s in m["shards"]] == [0, 256, 512] and m["rows"] == 699
    changed = tokens.copy()
    changed[400] = (changed[400] + 1) % 50  # inside shard 1's slice only
    save_npy(tmp_path / "tokens.npy", changed)
    with pytest.raises(ArtifactError) as err:
        write_manifest(IDENT, tmp_path / "tokens.npy", files, tmp_path / "manifest.json")
    msg = str(err.value)
    assert "shard 1 " in msg and "rerun extract_keys for it" in msg and "keys_001.npy" in msg
    assert "delete" not in msg
    # a longer stream: every shard's slice is intact, but the last shard no longer ends the stream
    save_npy(tmp_path / "tokens.npy", np.concatenate([tokens, tokens[:50]]))
    with pytest.raises(ArtifactError, match="last shard ends at position 699, but .* has 749 positions; rerun plan_s"):
        write_manifest(IDENT, tmp_path / "tokens.npy", files, tmp_path / "manifest.json")
    # a shard missing in the middle (its rows would be someone else's ids)
    save_npy(tmp_path / "tokens.npy", tokens)
    with pytest.raises(ArtifactError, match="shard 2 starts at position 512, but the shards before it end at 256"):
        write_manifest(IDENT, tmp_path / "tokens.npy", [files[0], files[2]], tmp_path / "manifest.json")


# ------------------------------------------------------------------------------------------ end to end
def ran(output: str) -> dict[str, list[str]]:
    """Rule -> the wildcards of each job Snakemake started, read off its log ('rule x:' ... 'wildcards: ...'),
    which, unlike its first 'Job stats' table, includes the jobs added once a checkpoint has run."""
    out: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=(?:local)?(?:rule|checkpoint) \w+:\n)", output):
        m = re.match(r"(?:local)?(?:rule|checkpoint) (\w+):\n", block)
        if m:
            w = re.search(r"^\s+wildcards: (.*)$", block, re.M)
            out.setdefault(m[1], []).append(w[1] if w else "")
    return out


def shards_of(jobs: list[str]) -> list[int]:
    return sorted(int(re.search(r"shard=(\d+)", w)[1]) for w in jobs)


@background("micro")
def test_a_grown_corpus_reencodes_only_the_new_shards_and_keeps_the_quantizer(micro_run, tmp_path):
    import polars as pl

    work = tmp_path / "run"
    shutil.copytree(micro_run, work, symlinks=True)
    docs = [" ".join(d.split()) for d in
            pl.read_parquet(work / "results" / "corpus" / "micro" / "train.parquet")["text"].to_list()]
    src = tmp_path / "text"
    src.mkdir()
    # the appended file's name sorts before the first one's: the prefix below also checks the listed order is kept
    parts = {"old": docs[:150], "new": docs[150:260], "valid": docs[260:270], "test": docs[270:280]}
    for name, lines in parts.items():
        (src / f"{name}.txt").write_text("\n".join(lines) + "\n")
    # about 1.5 shards before, 2.6 after: positions per shard from the micro tokens' density (a multiple of 32)
    per_doc = (np.load(work / "results" / "tokens" / "micro-gpt2" / "micro" / "train.npy").size / len(docs))
    S = max(1, round(150 * per_doc / 1.5 / 32)) * 32
    cfg = yaml.safe_load((micro_run / "config.yaml").read_text())
    cfg["corpora"]["grow"] = {"source": "local", "local": {"format": "text", "files": {
        "train": [str(src / "old.txt")], "valid": str(src / "valid.txt"), "test": str(src / "test.txt")}}}
    cfg["datastores"]["grow"] = {"model": "micro-gpt2", "corpus": "grow", "split": "train", "shard_tokens": S}
    cfg["index"] = {"type": "IVFPQ", "nlist": 16, "m": 8, "nbits": 6, "nprobe": 4, "train_sample": 2000}
    target = "results/datastores/grow/index.faiss"
    ds = work / "results" / "datastores" / "grow"

    def run(c, *args):
        (work / "grow.yaml").write_text(yaml.safe_dump(c))
        # one thread each: the two add_shard jobs of a run share the two cores instead of queueing
        return snakemake(work, target, *args, "--set-threads", "add_shard=1", "train_index=1", "--configfile",
                         str(work / "grow.yaml"))

    first = ran(run(cfg).stderr)
    plan1 = read_json(ds / "shards" / "plan.json")
    n1 = len(plan1["shards"])
    assert n1 >= 2 and shards_of(first["extract_keys"]) == shards_of(first["add_shard"]) == list(range(n1))
    tokens1 = np.load(work / "results" / "tokens" / "micro-gpt2" / "grow" / "train.npy")
    kept = [f"{ds}/shards/keys_000.npy", f"{ds}/shards/vals_000.npy", f"{ds}/index/part_000.faiss",
            f"{ds}/index/trained.faiss"]
    before = {p: (sha256_file(p), (work / p).stat().st_mtime_ns) for p in kept}

    grown = copy.deepcopy(cfg)
    grown["corpora"]["grow"]["local"]["files"]["train"].append(str(src / "new.txt"))
    second = ran(run(grown).stderr)
    plan2 = read_json(ds / "shards" / "plan.json")
    n2 = len(plan2["shards"])
    tokens2 = np.load(work / "results" / "tokens" / "micro-gpt2" / "grow" / "train.npy")
    # appended documents of a local corpus append tokens: the old stream is a prefix of the new one
    assert tokens2.size > tokens1.size and np.array_equal(tokens2[: tokens1.size], tokens1)
    assert plan2["shards"][: n1 - 1] == plan1["shards"][: n1 - 1] and n2 > n1
    changed = list(range(n1 - 1, n2))  # the old last (partial) shard and the new ones
    assert shards_of(second["extract_keys"]) == shards_of(second["add_shard"]) == changed
    assert "train_index" not in second
    assert {r: len(j) for r, j in second.items() if r not in ("extract_keys", "add_shard")} == {
        "corpus": 1, "tokenize": 1, "plan_shards": 1, "datastore_manifest": 1, "verify_datastore": 1,
        "merge_index": 1}
    assert {p: (sha256_file(p), (work / p).stat().st_mtime_ns) for p in kept} == before

    # the merged index equals the same trained quantizer filled with every shard's keys here, in one process
    manifest = read_json(ds / "manifest.json")
    assert manifest["rows"] == tokens2.size - 1 and len(manifest["shards"]) == n2
    keys = np.concatenate([np.load(ds / s["keys"]) for s in manifest["shards"]]).astype(np.float32)
    ref = faiss.read_index(str(ds / "index" / "trained.faiss"))
    ref.add(keys)
    merged = faiss.read_index(str(ds / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
    for index in (ref, merged):
        faiss.extract_index_ivf(index).nprobe = 4
    q = keys[:: 7] + np.random.default_rng(0).normal(scale=0.1, size=keys[:: 7].shape).astype(np.float32)
    d0, i0 = ref.search(q, 16)
    d1, i1 = merged.search(q, 16)
    np.testing.assert_array_equal(i1, i0)
    np.testing.assert_array_equal(d1, d0)
    assert (i0 >= 0).all() and (i0 >= plan1["shards"][-1]["end"]).any()  # new rows are found, under their ids

    # index.retrain: true trains again on the grown datastore, and so re-encodes every shard. In the same dry run
    # (one Snakemake start less), a subsample of the grown datastore: its shards are its parent's plan's
    retrain = copy.deepcopy(grown)
    retrain["index"]["retrain"] = True
    retrain["datastores"]["half"] = {"subsample": {"of": "grow", "fraction": 0.5}}
    (work / "retrain.yaml").write_text(yaml.safe_dump(retrain))
    out = snakemake(work, target, target.replace("grow", "half"), "-n", "--configfile", str(work / "retrain.yaml"))
    plan = {r: sorted(w) for r, w in ran(out.stdout + out.stderr).items()}
    every = [f"ds={d}, shard={i:03d}" for d in ("grow", "half") for i in range(n2)]
    assert plan == {"train_index": ["ds=grow", "ds=half"], "add_shard": sorted(every),
                    "verify_datastore": ["ds=grow", "ds=half"], "merge_index": ["ds=grow", "ds=half"],
                    "subsample_datastore": ["ds=half"]}


# ------------------------------------------------------------------------------------------ extraction
def test_a_planned_shard_has_the_keys_of_its_positions_and_a_stale_plan_is_refused(tmp_path):
    from test_reliability import _tiny_gpt2

    from workflow_scripts.extraction import extract_shard

    model, ident = _tiny_gpt2(dim=32)
    tokens = np.random.default_rng(0).integers(0, 50, 300).astype(np.int32)
    save_npy(tmp_path / "tokens.npy", tokens)
    whole = [tmp_path / "all" / n for n in ("k.npy", "v.npy", "m.json")]
    extract_shard(model, ident, tmp_path / "tokens.npy", 0, 1, 32, 4, *whole)
    plan = shard_plan(tmp_path / "tokens.npy", 64, 32)
    for span in (plan["shards"][1], plan["shards"][-1]):  # a full shard and the last, partial one
        out = [tmp_path / str(span["shard"]) / n for n in ("k.npy", "v.npy", "m.json")]
        extract_shard(model, ident, tmp_path / "tokens.npy", span["shard"], None, 32, 4, *out, span=span)
        a, b = span["start"], span["end"]
        np.testing.assert_array_equal(np.load(out[0]), np.load(whole[0])[a:b])  # keys do not depend on the cut
        np.testing.assert_array_equal(np.load(out[1]), tokens[a + 1 : b + 1])
        assert read_json(out[2])["slice_sha256"] == span["slice_sha256"]
    stale = {**plan["shards"][2], "slice_sha256": plan["shards"][1]["slice_sha256"]}
    out = [tmp_path / "stale" / n for n in ("k.npy", "v.npy", "m.json")]
    with pytest.raises(ArtifactError, match="shard 2 differ from those it was planned .* the shard plan is stale: "
                                            "rerun plan_shards"):
        extract_shard(model, ident, tmp_path / "tokens.npy", 2, None, 32, 4, *out, span=stale)
    assert not (tmp_path / "stale").exists() or not any((tmp_path / "stale").iterdir())
