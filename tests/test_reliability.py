"""Reliability: interrupted runs, corrupted artifacts, model mismatch, bad corpora, safe loading, a full disk.

The end-to-end tests work on copies of the shared ``micro_run`` (never on it), whole or up to its model.
"""

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from conftest import ROOT, background, job_stats, project_env, snakemake, snakemake_cmd

from workflow_scripts.artifacts import ArtifactError, load_npy, save_npy, sha256_file, write_json
from workflow_scripts.corpus import SPLITS, CorpusError, _check_utf8, load_corpus, write_corpus
from workflow_scripts.datastore import Datastore, shard_ranges, write_manifest
from workflow_scripts.extraction import extract_shard
from workflow_scripts.index import load_index
from workflow_scripts.retrieval_cache import load_cache
from workflow_scripts.sweep import run_sweep

DS = "results/datastores/micro"
SHARDS = f"{DS}/shards"
MODEL_DIR = "results/models/micro-gpt2"
TOKENS = "results/tokens/micro-gpt2/micro"
SWEEPS = [f"results/sweeps/{e}/micro/perplexity.csv" for e in ("valid", "test")]
UPSTREAM = {"corpus", "train_tokenizer", "tokenize", "train_lm"}
# the retrieval params the micro config gives the rule (see rules/common.smk retrieval_params)
RETRIEVAL_PARAMS = {"k_max": 32, "max_tokens": 300, "block_size": 32, "batch_size": 8, "device": "cpu",
                    "nprobe": None, "dtype": "float16", "gpu_shard_above_gb": 4}
SWEEP_PARAMS = {"lambdas": [0.0, 0.25, 0.5], "ks": [1, 8, 32], "sigmas": [1, 10]}


# --------------------------------------------------------------------------------------------- helpers
def _sweep_outputs(d: Path) -> tuple[Path, Path]:
    """The sweep's two output tables (csv, parquet), as the sweep rule declares them."""
    return d / "sweep/perplexity.csv", d / "sweep/perplexity.parquet"


def _cli(*args, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
    """``python -m workflow_scripts ...`` as the rules run it."""
    return subprocess.run([sys.executable, "-m", "workflow_scripts", *args], cwd=cwd, env={**project_env(), **env},
                          capture_output=True, text=True, timeout=timeout)


def _copy_run(micro_run, dest) -> Path:
    shutil.copytree(micro_run, dest, symlinks=True)
    return Path(dest)


def _group_alive(pgid: int) -> list[int]:
    """Pids of live (non-zombie) processes in process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _run_and_kill(workdir, args, ready, log_path, timeout=900) -> str:
    """Start Snakemake in its own process group, SIGKILL the whole group once ``ready()`` is true."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(snakemake_cmd(workdir, *args), env=project_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not ready():
                if proc.poll() is not None:
                    raise AssertionError(f"snakemake ended (rc {proc.returncode}) before the kill point:\n"
                                         f"{Path(log_path).read_text()[-4000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError("kill point not reached in time")
                time.sleep(0.01)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for _ in range(100):  # the jobs must die with it, or they could finish behind our back
        if not _group_alive(proc.pid):
            break
        time.sleep(0.05)
    assert not _group_alive(proc.pid), "jobs of the killed run survived"
    return Path(log_path).read_text()


def _final_files_complete(results: Path) -> int:
    """Every file under ``results`` with a final name (not a hidden temp file) is complete; returns the count."""
    n = 0
    for f in results.rglob("*"):
        if not f.is_file() or f.name.startswith(".") or f.relative_to(results).parts[0] in ("logs", "benchmarks"):
            continue
        if f.suffix == ".npy":
            np.load(f, allow_pickle=False)  # a truncated .npy raises here
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".parquet":
            pl.read_parquet(f)
        n += 1
    return n


def _mtimes(root: Path, *subdirs) -> dict[str, int]:
    return {str(f.relative_to(root)): f.stat().st_mtime_ns
            for d in subdirs for f in (root / d).rglob("*") if f.is_file()}


def _flip_byte_keep_mtime(path: Path, offset: int) -> None:
    """Bit rot: one byte changes, the size and the mtime do not (so Snakemake sees nothing)."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# --------------------------------------------------------------------------------------------- 1. interrupted runs
@background("micro")
def test_killed_runs_leave_no_partial_files_and_resume_to_the_same_results(micro_run, tmp_path):
    # the micro run up to its model (corpus, tokenizer, tokens, model and their Snakemake metadata), so the runs
    # below start at the datastore: two kills, then a resumed run
    after_model = {"datastores", "retrieval", "sweeps", "tables", "figures"}
    work = Path(shutil.copytree(micro_run, tmp_path / "run", symlinks=True, ignore=lambda d, names: [
        n for n in names if Path(d) == micro_run / "results" and n in after_model]))
    cfg = ("--configfile", str(work / "config.yaml"))
    shards = work / SHARDS

    # kill 1: while an extract_keys job writes its shard (a temp file with data in it), or just after
    def extracting():
        for f in shards.iterdir() if shards.exists() else ():
            try:
                if f.name.startswith("keys_") or f.name.startswith(".") and f.stat().st_size > 0:
                    return True
            except FileNotFoundError:  # renamed while we looked
                return True
        return False

    out1 = _run_and_kill(work, cfg, extracting, tmp_path / "run1.out")
    jobs1 = job_stats(out1)
    assert jobs1["extract_keys"] == 2 and not UPSTREAM & set(jobs1), jobs1
    assert not (work / DS / "manifest.json").exists()
    assert _final_files_complete(work / "results") > 0

    # a killed run leaves Snakemake's lock behind: the next run refuses until --unlock
    locked = snakemake(work, *cfg, "--rerun-incomplete", check=False)
    assert locked.returncode != 0 and "Directory cannot be locked" in locked.stdout + locked.stderr
    snakemake(work, *cfg, "--unlock")

    # kill 2: while a retrieve job writes its cache
    retrieval = work / "results/retrieval"

    def retrieving():
        return retrieval.exists() and any(f.is_file() for f in retrieval.rglob("*"))

    out2 = _run_and_kill(work, (*cfg, "--rerun-incomplete"), retrieving, tmp_path / "run2.out")
    jobs2 = job_stats(out2)
    assert jobs2["extract_keys"] == 2 and not UPSTREAM & set(jobs2), jobs2  # the killed extraction runs again
    _final_files_complete(work / "results")
    assert not all((work / s).exists() for s in SWEEPS)

    snakemake(work, *cfg, "--unlock")
    proc3 = snakemake(work, *cfg, "--rerun-incomplete")
    out3 = proc3.stdout + proc3.stderr
    jobs3 = job_stats(out3)
    assert jobs3["retrieve"] >= 1, jobs3
    # the jobs that finished in a killed run (run 2's datastore and index) are kept, not run again
    assert not (UPSTREAM | {"extract_keys", "datastore_manifest", "merge_index"}) & set(jobs3), jobs3
    _final_files_complete(work / "results")
    # the temp files the killed jobs left were removed when their outputs were rewritten
    assert sorted(str(f.relative_to(work)) for f in (work / "results").rglob(".*.tmp*")) == []
    for rel in (f"{DS}/manifest.json", *SWEEPS, "results/tables/perplexity_summary.csv"):
        assert (work / rel).read_bytes() == (micro_run / rel).read_bytes(), rel
    assert "Nothing to be done" in snakemake(work, *cfg, "-n").stdout


def test_a_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    stale = [tmp_path / ".keys_000.npy.k1ll3d_x.tmp.npy", tmp_path / ".meta.json.abcdefgh.tmp"]
    kept = [tmp_path / ".keys_0001.npy.abcdefgh.tmp.npy", tmp_path / ".keys_000.npy.short.tmp.npy",
            tmp_path / "notes.txt"]
    for f in stale + kept:
        f.write_bytes(b"partial")
    save_npy(tmp_path / "keys_000.npy", np.arange(3, dtype=np.int32))
    write_json(tmp_path / "meta.json", {"K": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f.name for f in kept] + ["keys_000.npy", "meta.json"])


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_step_stopped_by_sigterm_removes_its_temp_file(tmp_path, sig):
    # before: the process died at once, leaving .train.npy.XXXXXXXX.tmp.npy (with the ids so far) until the same
    # output was written again
    from workflow_scripts import lm

    pl.DataFrame({"text": ["Ada Lovelace was born in London ."] * 20}).write_parquet(tmp_path / "tok.parquet")
    lm.train_tokenizer(tmp_path / "tok.parquet", 300, tmp_path / "tokenizer")
    words = np.array(["Ada", "Lovelace", "was", "born", "in", "London", "."])
    doc = " ".join(np.random.default_rng(0).choice(words, size=3_000_000))  # ~15 MB: tens of seconds to encode
    pl.DataFrame({"text": [doc]}).write_parquet(tmp_path / "train.parquet")
    out = tmp_path / "tokens" / "train.npy"
    proc = subprocess.Popen(
        [sys.executable, "-m", "workflow_scripts", "tokenize", "--parquet", str(tmp_path / "train.parquet"),
         "--out", str(out), "--tokenizer-dir", str(tmp_path / "tokenizer")],
        cwd=tmp_path, env=project_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not any(f.stat().st_size > 128 for f in out.parent.glob(".train.npy.*")):  # ids past the header
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err
    assert f"error: tokenize: stopped by {signal.Signals(sig).name}" in err and "Traceback" not in err
    assert list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------- 2. corruption
@pytest.fixture
def damaged(micro_run, tmp_path):
    """A copy of the micro run to damage."""
    return _copy_run(micro_run, tmp_path / "copy")


@pytest.mark.slow
@pytest.mark.parametrize("keep", [0, 7, 0.5, -1])
def test_truncated_index_refused(damaged, keep):
    index = damaged / DS / "index.faiss"
    data = index.read_bytes()
    index.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep % len(data)])
    ds = Datastore(damaged / DS / "manifest.json")
    with pytest.raises(ArtifactError) as e:
        load_index(index, damaged / DS / "index.json", ds)
    msg = str(e.value)
    assert str(index) in msg and "sha256 differs" in msg and "rerun merge_index" in msg


@pytest.mark.slow
def test_same_size_bit_flip_in_index_refused(damaged):
    index = damaged / DS / "index.faiss"
    _flip_byte_keep_mtime(index, index.stat().st_size // 2)
    with pytest.raises(ArtifactError, match=r"index\.faiss: sha256 differs from .*index\.json \(altered\)"):
        load_index(index, damaged / DS / "index.json", Datastore(damaged / DS / "manifest.json"))


@pytest.mark.slow
def test_shard_altered_between_extraction_and_manifest_refused(damaged):
    """The manifest step re-hashes every shard against the digest recorded when the shard was written."""
    shards = damaged / DS / "shards"
    _flip_byte_keep_mtime(shards / "vals_001.npy", 200)
    ident = json.loads((damaged / "results/models/micro-gpt2/model.json").read_text())
    files = [tuple(str(shards / f"{kind}_{i:03d}.{ext}") for kind, ext in (("keys", "npy"), ("vals", "npy"),
                                                                           ("shard", "json"))) for i in range(2)]
    out = damaged / DS / "manifest_new.json"
    with pytest.raises(ArtifactError, match=r"vals_001\.npy: sha256 differs from the one recorded at extraction"):
        write_manifest(ident, damaged / "results/tokens/micro-gpt2/micro/train.npy", files, out)
    assert not out.exists()


@pytest.mark.slow
def test_index_from_another_datastore_version_refused(damaged):
    meta = damaged / DS / "index.json"
    m = json.loads(meta.read_text())
    m["manifest_sha256"] = "0" * 64
    meta.write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=r"index\.faiss was built from another version of .*manifest\.json; "
                                            r"rerun merge_index"):
        load_index(damaged / DS / "index.faiss", meta, Datastore(damaged / DS / "manifest.json"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["targets", "dists", "queries", "ids"])
@pytest.mark.parametrize("cut", ["tail", "header"])
def test_truncated_retrieval_cache_refused(damaged, name, cut, tmp_path):
    cache = damaged / "results/retrieval/valid/micro"
    f = cache / f"{name}.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-4] if cut == "tail" else data[:60])
    with pytest.raises(ArtifactError, match=re.escape(str(f)) + r": unreadable or truncated \.npy"):
        load_cache(cache, damaged / DS / "manifest.json")
    with pytest.raises(ArtifactError, match=re.escape(str(f))):
        run_sweep(cache, damaged / DS / "manifest.json", SWEEP_PARAMS, *_sweep_outputs(tmp_path))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
@pytest.mark.parametrize("new, expected", [
    ('"K": 33', r"dists\.npy: shape \(300, 32\), .*meta\.json says N=300, K=33; the files match the sha256 recorded "
                r"in it, so meta\.json is the altered one; rerun retrieve"),
    ('"K": 3x', r"meta\.json: not valid JSON"),
])
def test_altered_cache_meta_refused(damaged, new, expected, tmp_path):
    meta = damaged / "results/retrieval/test/micro/meta.json"
    text = meta.read_text()
    assert '"K": 32' in text
    meta.write_text(text.replace('"K": 32', new))
    with pytest.raises(ArtifactError, match=expected) as e:
        load_cache(meta.parent)
    assert str(meta.parent) in str(e.value)
    with pytest.raises(ArtifactError, match=expected):
        run_sweep(meta.parent, damaged / DS / "manifest.json", SWEEP_PARAMS, *_sweep_outputs(tmp_path))
    assert not (tmp_path / "sweep").exists()


@pytest.mark.slow
def test_sweep_cli_on_truncated_cache_reports_the_file(damaged, tmp_path):
    cache = damaged / "results/retrieval/test/micro"
    (cache / "lm_logprob.npy").write_bytes((cache / "lm_logprob.npy").read_bytes()[:-1])
    csv, parquet = _sweep_outputs(tmp_path / "out")
    proc = _cli("sweep", "--params", json.dumps(SWEEP_PARAMS), "--cache", str(cache / "meta.json"),
                "--manifest", str(damaged / DS / "manifest.json"), "--tokens", str(damaged / TOKENS / "test.npy"),
                "--csv", str(csv), "--parquet", str(parquet), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert f"error: sweep: {cache / 'lm_logprob.npy'}: unreadable or truncated .npy" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- 2b. nothing lost
# Snakemake removes a job's outputs when it starts the job. A consumer whose own input checks fail would lose the
# outputs it meant to regenerate; the verify_* jobs (rules/*.smk, docs/conventions.md) check its input first, and
# Snakemake starts no job whose upstream job failed. Each probe lists what a failed rerun lost.
def _results_digests(root: Path) -> dict[str, str]:
    """sha256 of every file under results/ but the logs and benchmarks."""
    res = root / "results"
    return {str(f.relative_to(root)): sha256_file(f) for f in res.rglob("*")
            if f.is_file() and f.relative_to(res).parts[0] not in ("logs", "benchmarks")}


def _lost(before: dict[str, str], root: Path) -> list[str]:
    """The files of ``before`` now missing or changed."""
    now = _results_digests(root)
    return sorted(f for f, h in before.items() if now.get(f) != h)


@pytest.mark.slow
def test_bit_rot_in_a_key_shard_stops_the_rerun_before_the_index_is_removed(damaged):
    # before: merge_index started, so Snakemake removed index.faiss and index.json, then merge_index failed on the
    # shard; now verify_datastore fails first and merge_index never starts
    shard = damaged / SHARDS / "keys_001.npy"
    before = _mtimes(damaged, "results/retrieval", "results/sweeps", "results/tables", "results/figures")
    _flip_byte_keep_mtime(shard, shard.stat().st_size // 2)
    digests = _results_digests(damaged)
    proc = snakemake(damaged, "--configfile", str(damaged / "config.yaml"), "--forcerun", "merge_index",
                     check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{SHARDS}/keys_001.npy: sha256 differs from manifest {DS}/manifest.json " \
           "(altered); delete it and rerun extract_keys" in out
    assert "localrule retrieve:" not in out and "localrule sweep:" not in out
    assert _mtimes(damaged, "results/retrieval", "results/sweeps", "results/tables", "results/figures") == before
    assert _lost(digests, damaged) == []  # index.faiss, index.json and the manifest kept, the damage not re-blessed


def _failed_rerun_loses(work, before: dict, message: str, *args: str) -> list:
    """Rerun ``work`` (with ``args``) after damaging an input: it must fail saying ``message``; returns the outputs
    it lost."""
    proc = snakemake(work, "--configfile", str(work / "config.yaml"), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    return _lost(before, work)


@pytest.mark.slow
def test_altered_retrieval_cache_stops_the_rerun_before_the_sweep_loses_its_tables(damaged):
    # before: the sweep started (vals.npy is newer than its tables), Snakemake removed perplexity.csv and .parquet,
    # then the sweep's load_cache refused vals.npy
    cache = damaged / "results/retrieval/valid/micro"
    vals, targets = np.load(cache / "vals.npy"), np.load(cache / "targets.npy")
    np.save(cache / "vals.npy", np.repeat(targets[:, None], vals.shape[1], axis=1).astype(vals.dtype))
    before = _results_digests(damaged)
    message = ("results/retrieval/valid/micro/vals.npy: sha256 differs from the one recorded in "
               "results/retrieval/valid/micro/meta.json")
    # results/sweeps/valid/micro/perplexity.{csv,parquet} kept
    assert _failed_rerun_loses(damaged, before, message) == []


@pytest.mark.slow
def test_a_rewritten_shard_still_costs_only_the_manifest(damaged):
    # a shard rewritten (new mtime) reruns datastore_manifest, whose own check refuses it: Snakemake has removed
    # the manifest by then (cheap to rewrite: it only hashes the shards); index, caches and sweeps are kept
    shard = damaged / SHARDS / "keys_001.npy"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    before = _results_digests(damaged)
    message = (f"{SHARDS}/keys_001.npy: sha256 differs from the one recorded at extraction in "
               f"{SHARDS}/shard_001.json")
    assert _failed_rerun_loses(damaged, before, message) == [f"{DS}/manifest.json"]


@pytest.mark.slow
def test_altered_task_cache_stops_the_rerun_before_the_task_sweep_loses_its_tables(task_run, tmp_path):
    # before: task_sweep started (scored.npz is newer than its outputs), Snakemake removed sweep.csv, sweep.parquet,
    # predictions.parquet and summary.json, then the task sweep refused scored.npz
    work = _copy_run(task_run[0], tmp_path / "copy")
    scored = work / "results/tasks/micro/synth_recall"
    with np.load(scored / "scored.npz", allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    name = next(k for k, a in arrays.items() if a.dtype.kind == "f")
    arrays[name] = arrays[name] + 1
    np.savez(scored / "scored.npz", **arrays)
    before = _results_digests(work)
    message = ("results/tasks/micro/synth_recall/scored.npz: sha256 differs from the one recorded in "
               "results/tasks/micro/synth_recall/scored.json")
    # sweep.csv, sweep.parquet, predictions.parquet, summary.json kept. task_run is full_run, which also has the
    # scaling study: its scaling_tasks job reads scored.npz without the verify_task_cache marker, so this rerun
    # leaves it out (--omit-from) and checks the task stages, as on a run of tests/configs/tasks.yaml. (Giving
    # scaling_tasks the marker as an input is no fix: the temp() marker would then be remade whenever the scaling
    # stages rerun, and task_sweep would rerun after it.)
    assert _failed_rerun_loses(work, before, message, "--omit-from", "scaling_tasks") == []


# --------------------------------------------------------------------------------------------- 3. mismatch
@pytest.mark.slow
def test_retrieve_refuses_a_model_that_did_not_build_the_datastore(micro_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workflow_scripts.lm import write_identity

    src = micro_run / MODEL_DIR / "hf"
    model, tok = AutoModelForCausalLM.from_pretrained(src), AutoTokenizer.from_pretrained(src)
    with torch.no_grad():
        model.transformer.ln_f.bias.add_(0.01)  # same shape, tokenizer and hook point; other weights
    other = tmp_path / "other-model"
    model.save_pretrained(other)
    tok.save_pretrained(other)
    model_json = tmp_path / "model.json"
    ident = write_identity({"source": "local", "path": str(other)}, model_json, device="cpu")
    manifest_path = micro_run / DS / "manifest.json"
    built_with = json.loads(manifest_path.read_text())["model_sha256"]
    assert ident["model_sha256"] != built_with

    outdir = tmp_path / "cache"
    proc = _cli("retrieve", "--params", json.dumps(RETRIEVAL_PARAMS), "--model-json", str(model_json),
                "--manifest", str(manifest_path), "--index", str(micro_run / DS / "index.faiss"),
                "--index-meta", str(micro_run / DS / "index.json"),
                "--tokens", str(micro_run / "results/tokens/micro-gpt2/micro/test.npy"),
                "--meta", str(outdir / "meta.json"), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    assert f"error: retrieve: datastore {manifest_path} was built with model_sha256={built_with}, but " \
           f"{model_json} has model_sha256={ident['model_sha256']}; rebuild the datastore or use its model" in err
    assert "Traceback" not in err
    assert not outdir.exists()


# --------------------------------------------------------------------------------------------- 4. bad corpora
@pytest.fixture
def datasets_cache(monkeypatch, tmp_path_factory):
    """Offline, and the datasets cache in a temporary directory (as in test_sources.py)."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))


def _local_spec(fmt: str, files: dict) -> dict:
    return {"source": "local", "local": {"format": fmt, "files": files}}


def _good_files(d: Path, fmt: str) -> dict:
    files = {}
    for s in SPLITS:
        f = d / f"{s}.{fmt}"
        f.write_text(json.dumps({"text": f"{s} doc"}) + "\n" if fmt == "jsonl" else f"{s} doc one\n{s} doc two\n")
        files[s] = str(f)
    return files


@pytest.mark.parametrize("fmt, content, offset", [
    ("text", b"good line\nbad \xff\xfe line\n", 14),
    ("text", "caf\u00e9 ok\n".encode() + b"cut \xc3", 13),  # a multi-byte character cut off at the end
    ("jsonl", b'{"text": "ok"}\n{"text": "bad \xc3\x28"}\n', 29),
])
def test_non_utf8_local_corpus_names_the_file(datasets_cache, tmp_path, fmt, content, offset):
    files = _good_files(tmp_path, fmt)
    bad = tmp_path / f"broken.{fmt}"
    bad.write_bytes(content)
    files["valid"] = str(bad)
    with pytest.raises(CorpusError) as e:
        load_corpus(_local_spec(fmt, files), seed=0)
    assert str(e.value).startswith(f"corpus file {bad} (split 'valid') is not valid UTF-8: byte {offset} ")


def test_utf8_check_is_exact_across_read_chunks(tmp_path):
    f = tmp_path / "t.txt"
    f.write_bytes("ééé€€€😀\n".encode() * 50)
    _check_utf8(f, "train", chunk=3)  # multi-byte characters straddle every chunk boundary: still valid
    f.write_bytes("ééé€€€😀\n".encode() * 50 + b"x\x80")
    with pytest.raises(CorpusError, match=f"byte {f.stat().st_size - 1} "):
        _check_utf8(f, "train", chunk=3)


def _corpus_cli_with_bad_train(tmp_path, fmt: str, bad: Path):
    """The corpus step run by hand on good valid/test files and ``bad`` as the train split: (proc, outdir)."""
    files = _good_files(tmp_path, "txt" if fmt == "text" else fmt)
    files["train"] = str(bad)
    outdir = tmp_path / "corpus"
    outputs = [a for s in SPLITS for a in (f"--{s}", str(outdir / f"{s}.parquet"))]
    proc = _cli("corpus", "--params", json.dumps({"spec": _local_spec(fmt, files), "seed": 0}),
                *outputs, "--world", str(outdir / "world.json"), cwd=tmp_path, HF_DATASETS_OFFLINE="1",
                HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"))
    return proc, outdir


def test_corpus_cli_on_non_utf8_file_prints_an_error_not_a_traceback(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    proc, outdir = _corpus_cli_with_bad_train(tmp_path, "text", bad)
    assert proc.returncode == 1
    assert f"error: corpus: corpus file {bad} (split 'train') is not valid UTF-8: byte 2 is b'\\xef'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not outdir.exists()


def test_corpus_cli_on_a_jsonl_number_prints_one_line_naming_file_line_and_field(tmp_path):
    # before: AttributeError: 'int' object has no attribute 'strip', a traceback naming no file
    bad = tmp_path / "numbers.jsonl"
    bad.write_text('{"text": "a doc"}\n{"text": 42}\n')
    proc, outdir = _corpus_cli_with_bad_train(tmp_path, "jsonl", bad)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: corpus: corpus file {bad} (split 'train') line 2: field 'text' holds int 42, not text"]
    assert "Traceback" not in proc.stderr
    assert not outdir.exists()


@pytest.mark.slow
def test_a_two_megabyte_line_loads_and_tokenizes(datasets_cache, micro_run, tmp_path):
    from transformers import AutoTokenizer

    from workflow_scripts.lm import tokenize_split

    rng = np.random.default_rng(0)
    words = np.array(["Ada", "Lovelace", "was", "born", "in", "London", "café", "."])
    line = " ".join(rng.choice(words, size=400_000))[:2_000_000].strip()
    files = _good_files(tmp_path, "txt")
    (tmp_path / "long.txt").write_text(f"short doc\n{line}\nlast doc\n")
    files["train"] = str(tmp_path / "long.txt")
    write_corpus(_local_spec("text", files), 0, {s: tmp_path / f"corpus/{s}.parquet" for s in SPLITS},
                 tmp_path / "corpus/world.json")
    texts = pl.read_parquet(tmp_path / "corpus/train.parquet")["text"].to_list()
    assert texts == ["short doc", line, "last doc"]
    tok = AutoTokenizer.from_pretrained(micro_run / MODEL_DIR / "tokenizer")
    n = tokenize_split(tok, tmp_path / "corpus/train.parquet", tmp_path / "train.npy")
    stream = np.load(tmp_path / "train.npy", allow_pickle=False)
    assert n == stream.size > 100_000
    eos = np.flatnonzero(stream == tok.eos_token_id)
    assert eos.size == 3
    assert tok.decode(stream[eos[0] + 1 : eos[1]].tolist(), clean_up_tokenization_spaces=False) == line


def test_too_few_tokens_for_the_shards_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="^5 tokens cannot fill 8 shards$"):
        shard_ranges(5, 8, 32)
    with pytest.raises(ValueError, match="^40 tokens make 2 blocks of 32, fewer than 3 shards$"):
        shard_ranges(40, 3, 32)
    with pytest.raises(ValueError, match="^1 tokens cannot fill 1 shards$"):
        shard_ranges(1, 1, 32)
    # through extract_shard: refused before any file is written
    model, ident = _tiny_gpt2(dim=32)
    save_npy(tmp_path / "tokens.npy", np.arange(40, dtype=np.int32) % 50)
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="fewer than 3 shards"):
        extract_shard(model, ident, tmp_path / "tokens.npy", 0, 3, 32, 4, out / "k.npy", out / "v.npy",
                      out / "m.json")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_corpus_shorter_than_the_context_window_is_a_clear_error(micro_run, tmp_path):
    from workflow_scripts.lm import train_from_scratch

    save_npy(tmp_path / "train.npy", np.arange(20, dtype=np.int32))
    save_npy(tmp_path / "valid.npy", np.arange(20, dtype=np.int32))
    cfg = {"batch_size": 2, "block_size": 32, "n_embd": 16, "n_layer": 1, "n_head": 2, "dropout": 0.0,
           "lr": 1e-3, "weight_decay": 0.0, "steps": 2, "warmup_fraction": 0.1, "log_every": 1}
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'train.npy'}: 20 tokens, fewer than one "
                                                   "block of 33")):
        train_from_scratch(tmp_path / "train.npy", tmp_path / "valid.npy", micro_run / MODEL_DIR / "tokenizer", cfg,
                           0, tmp_path / "hf", tmp_path / "loss.csv", tmp_path / "loss.parquet")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "loss.csv").exists()
    assert not (tmp_path / "loss.parquet").exists()


# --------------------------------------------------------------------------------------------- 5. safe loading
def _unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Unsafe deserialisation in ``source``: np.load without allow_pickle=False, torch.load without
    weights_only=True, any use of pickle (or its relatives), trust_remote_code=True hard-coded."""
    found = []

    def where(node):
        return f"{filename}:{node.lineno}"

    def kwarg(call, name):
        return next((k.value for k in call.keywords if k.arg == name), None)

    def is_const(node, value):
        return isinstance(node, ast.Constant) and node.value is value

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            if name == "load" and owner in ("np", "numpy") and not is_const(kwarg(node, "allow_pickle"), False):
                found.append(f"{where(node)}: np.load without allow_pickle=False")
            if name == "load" and owner == "torch" and not is_const(kwarg(node, "weights_only"), True):
                found.append(f"{where(node)}: torch.load without weights_only=True")
            if name in ("read_pickle", "load_pickle"):
                found.append(f"{where(node)}: {name}")
            if is_const(kwarg(node, "trust_remote_code"), True):
                found.append(f"{where(node)}: trust_remote_code=True")
            if is_const(kwarg(node, "allow_pickle"), True):
                found.append(f"{where(node)}: allow_pickle=True")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                if m and m.split(".")[0] in ("pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib",
                                             "shelve", "marshal"):
                    found.append(f"{where(node)}: imports {m}")
            if isinstance(node, ast.ImportFrom) and node.module in ("numpy", "torch") and any(
                    a.name == "load" for a in node.names):
                found.append(f"{where(node)}: imports {node.module}.load (its call could not be checked)")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and is_const(v, True):
                    found.append(f"{where(node)}: trust_remote_code=True")
    return found


@pytest.mark.parametrize("snippet", [
    "import numpy as np\nnp.load('x.npy')",
    "import numpy\nnumpy.load('x.npy', allow_pickle=True)",
    "import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=flag)",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import pickle\npickle.loads(b'')",
    "from joblib import load",
    "from numpy import load\nload('x.npy', allow_pickle=False)",
    "import polars as pl\nimport pandas as pd\npd.read_pickle('x')",
    "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "kw = {'trust_remote_code': True}",
])
def test_safe_loading_scanner_flags_unsafe_code(snippet):
    assert _unsafe_calls(snippet)


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_payloads_in_artifacts_are_refused_without_running(tmp_path):
    """A .npy holding pickled objects, a training checkpoint and an MLP state dict with a pickled payload: the
    project's loaders refuse each, and the payload never runs (its marker file is never created)."""
    from workflow_scripts import lm
    from workflow_scripts.analyses import mlp

    marker = tmp_path / "payload_ran"
    npy = tmp_path / "vals.npy"
    np.save(npy, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ArtifactError, match="vals.npy"):
        load_npy(npy)
    ckpt = tmp_path / "chunk.pt"
    torch.save({"identity": _Payload(marker)}, ckpt)
    with pytest.raises(ArtifactError, match="not a training checkpoint"):
        lm.load_checkpoint(ckpt, {}, 0)
    with pytest.raises(Exception, match="(?i)weights only|unpickl|global"):
        mlp.load(ckpt, _meta(tmp_path), torch.zeros(4, 2))
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    # and the same files written without the payload load: the refusal is the pickle's, not the path's
    np.save(npy, np.arange(3, dtype=np.int32))
    assert load_npy(npy).tolist() == [0, 1, 2]


def _meta(tmp_path):
    write_json(tmp_path / "mlp.json", {"dim": 2, "hidden": 3})
    return tmp_path / "mlp.json"


def test_workflow_scripts_load_nothing_unsafely():
    files = sorted((ROOT / "workflow_scripts").rglob("*.py"))  # the tasks/ and analyses/ wings too
    assert len(files) >= 10
    assert {"tasks/scoring.py", "analyses/mlp.py"} <= {str(f.relative_to(ROOT / "workflow_scripts")) for f in files}
    problems = [p for f in files for p in _unsafe_calls(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []
    assert not _unsafe_calls("import numpy as np\nnp.load('x.npy', mmap_mode='r', allow_pickle=False)\n"
                             "import torch\ntorch.load('x.pt', weights_only=True)\n"
                             "f(trust_remote_code=bool(spec.get('trust_remote_code', False)))")


# --------------------------------------------------------------------------------------------- 6. a full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 2 MiB tmpfs, or a skip saying why one cannot be mounted here."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _tiny_gpt2(dim: int):
    import transformers as tf

    from workflow_scripts.forward import find_hook_point
    from workflow_scripts.lm import weights_hash

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=50, n_positions=32, n_embd=dim, n_layer=1, n_head=2)).eval()
    hook = find_hook_point(model)
    ident = {"source": "local", "path": "/nowhere/tiny", "revision": None, "architecture": type(model).__name__,
             "model_sha256": weights_hash(model), "tokenizer_sha256": "ab" * 32, "hook_point": hook, "dim": dim,
             "vocab_size": 50}
    return model, ident


def _disk_full_scenario(mnt: str, scratch: str) -> dict:
    """Run in a child process (a SIGBUS must not take pytest down): a small shard fits on ``mnt``, a big one
    does not."""
    mnt, scratch = Path(mnt), Path(scratch)
    model, ident = _tiny_gpt2(dim=128)  # 256 bytes of float16 keys per row
    rng = np.random.default_rng(0)
    save_npy(scratch / "small.npy", rng.integers(0, 50, 257).astype(np.int32))  # 256 rows: 64 KiB of keys
    save_npy(scratch / "big.npy", rng.integers(0, 50, 12_001).astype(np.int32))  # 12000 rows: 3 MiB of keys
    small = [str(mnt / n) for n in ("keys_small.npy", "vals_small.npy", "shard_small.json")]
    extract_shard(model, ident, scratch / "small.npy", 0, 1, 32, 8, *small)
    write_manifest(ident, scratch / "small.npy", [tuple(small)], mnt / "manifest.json")
    result = {"error": None}
    try:
        extract_shard(model, ident, scratch / "big.npy", 0, 1, 32, 8, mnt / "keys_big.npy", mnt / "vals_big.npy",
                      mnt / "shard_big.json")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which asserts on it
        result["error"] = {"type": type(e).__name__, "errno": getattr(e, "errno", None), "message": str(e),
                           "is_oserror": isinstance(e, OSError)}
    result["files"] = sorted(os.listdir(mnt))
    ds = Datastore(mnt / "manifest.json")  # deep: sizes and sha256 of the small shard
    result["small_rows"] = ds.rows
    return result


@pytest.mark.slow  # about 5 s: a child process that imports torch and transformers
def test_full_disk_during_extraction_raises_and_leaves_earlier_shard_intact(small_tmpfs, tmp_path):
    code = ("import json, sys; import test_reliability as t; "
            "print('RESULT ' + json.dumps(t._disk_full_scenario(sys.argv[1], sys.argv[2])))")
    env = dict(project_env(), PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'tests'}")
    proc = subprocess.run([sys.executable, "-c", code, str(small_tmpfs), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != -signal.SIGBUS, "extraction was killed by SIGBUS writing a memory map on a full disk"
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    err = result["error"]
    assert err is not None, "a 3 MiB shard was written to a 2 MiB file system"
    assert err["is_oserror"] and err["errno"] == 28 and "No space left on device" in err["message"], err
    assert str(small_tmpfs) in err["message"]
    # no final-named (or temp) file of the failed shard; the earlier shard and its manifest still verify
    assert result["files"] == ["keys_small.npy", "manifest.json", "shard_small.json", "vals_small.npy"]
    assert result["small_rows"] == 256


@pytest.mark.slow
def test_full_disk_in_the_extract_keys_step_prints_an_error(micro_run, small_tmpfs):
    params = {"shard": 0, "shards": 1, "block_size": 32, "batch_size": 8, "device": "cpu",  # 5 MB of keys
              "dtype": "float16"}
    proc = _cli("extract-keys", "--params", json.dumps(params), "--model-json", f"{MODEL_DIR}/model.json",
                "--tokens", "results/tokens/micro-gpt2/micro/train.npy", "--keys", str(small_tmpfs / "keys_000.npy"),
                "--vals", str(small_tmpfs / "vals_000.npy"), "--meta", str(small_tmpfs / "shard_000.json"),
                cwd=micro_run)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert re.search(r"^error: extract-keys: \[Errno 28\] No space left on device \(reserving \d+ bytes\): "
                     + re.escape(f"'{small_tmpfs}/.keys_000.npy."), proc.stderr, re.M), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert os.listdir(small_tmpfs) == []
