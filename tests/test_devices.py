"""GPU paths are used when present and fall back to CPU otherwise (workflow_scripts/devices.py): torch device
and dtype, the refusal of cuda where there is none, the log line, FAISS on GPUs (which cloner options, sharded or
replicated, training through the clustering index) with the GPU API mocked, since no GPU runs these tests."""

import json
import logging
import re
import subprocess
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
import transformers as tf
import yaml
from conftest import ROOT, job_stats, load_test_config, project_env, snakemake, snakemake_cmd
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from workflow_scripts import cli, devices, extraction, index, lm, retrieval
from workflow_scripts.artifacts import sha256_file, write_json


def _no_cuda(monkeypatch, cuda_version=None):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)


def test_auto_device_is_cpu_without_cuda_and_cuda_with_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lm.pick_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert lm.pick_device("auto").type == "cuda"
    assert lm.pick_device("cuda").type == "cuda"
    assert lm.pick_device("cpu").type == "cpu"


def test_cuda_without_a_gpu_is_refused_naming_the_key_and_why(monkeypatch):
    _no_cuda(monkeypatch)
    assert devices.cuda_refusal("auto") is None and devices.cuda_refusal("cpu") is None
    with pytest.raises(devices.DeviceError, match=r"^extraction\.device: cuda, but torch .* is a CPU build on "):
        lm.pick_device("cuda")
    _no_cuda(monkeypatch, cuda_version="12.6")  # a CUDA build on a node whose GPUs are hidden
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    msg = devices.cuda_refusal("cuda")
    assert "(CUDA 12.6) sees no GPU (CUDA_VISIBLE_DEVICES='')" in msg
    assert "set extraction.device to auto" in msg and "./install.sh --gpu" in msg


def test_float16_only_on_a_gpu():
    assert devices.model_dtype("auto", "float16") == devices.model_dtype("cuda", "float16") == "float16"
    assert devices.model_dtype("cpu", "float16") == "float32"
    assert devices.torch_dtype(torch.device("cuda"), "float16") == "float16"
    assert devices.torch_dtype(torch.device("cpu"), "float16") == "float32"


def _tiny_model(tmp_path):
    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"a": 0}, "a")), eos_token="a")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    lm.write_identity({"source": "local", "path": str(tmp_path / "m")}, tmp_path / "model.json", device="cpu")
    return tmp_path / "model.json"


def test_float16_request_falls_back_to_float32_on_cpu_and_logs_the_devices(tmp_path, monkeypatch, caplog):
    _no_cuda(monkeypatch)
    model_json = _tiny_model(tmp_path)
    with caplog.at_level(logging.INFO, logger="workflow_scripts.devices"):
        loaded, _, _ = lm.load_checked(model_json, device="auto", dtype="float16")
    assert next(loaded.parameters()).dtype == torch.float32 and next(loaded.parameters()).device.type == "cpu"
    lines = [r.getMessage() for r in caplog.records if r.name == "workflow_scripts.devices"]
    assert lines == [f"devices: torch {torch.__version__} on cpu, float32; FAISS {faiss.__version__}, CPU build"]


def test_extraction_and_retrieval_load_the_model_in_the_same_dtype(monkeypatch, tmp_path):
    """Keys and queries come from the same precision: float16 wherever a GPU may run the model."""
    seen = []

    class Stop(Exception):
        pass

    def load_checked(path, device, dtype, block_size=None):
        seen.append((device, dtype))
        raise Stop

    monkeypatch.setattr(lm, "load_checked", load_checked)
    cases = {("auto", "float16"): "float16", ("cuda", "float16"): "float16", ("cpu", "float16"): "float32",
             ("cuda", "float32"): "float32", ("cpu", "float32"): "float32", ("auto", "float32"): "float32"}
    for device, dtype in cases:  # extraction.device and extraction.dtype, as the rules pass them
        params = {"device": device, "dtype": dtype, "block_size": 8, "shard": 0, "shards": 1, "batch_size": 2}
        with pytest.raises(Stop):
            extraction.extract_keys(params, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path)
        with pytest.raises(Stop):
            retrieval.open_retriever(tmp_path, tmp_path, tmp_path, tmp_path, {**params, "k_max": 1})
    assert seen == [(d, want) for (d, _), want in cases.items() for _ in "xy"]


# --------------------------------------------------------------------------------------------- FAISS
class FakeGpus:
    """The GPU half of the FAISS API, as faiss-gpu has it, over faiss-cpu: ``index_cpu_to_all_gpus`` records its
    options and returns the CPU index (or raises ``refuse``)."""

    def __init__(self, monkeypatch, n: int, refuse: str | None = None):
        self.calls, self.n, self.refuse = [], n, refuse
        monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: self.n, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions",
                            lambda: SimpleNamespace(shard=False, useFloat16=False), raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.clone, raising=False)

    def clone(self, idx, co=None, ngpu=-1):
        if self.refuse:
            raise RuntimeError(self.refuse)
        self.calls.append((idx, co))
        return idx


def _flat(n=10, d=4):
    flat = faiss.IndexFlatL2(d)
    flat.add(np.random.default_rng(0).normal(size=(n, d)).astype(np.float32))
    return flat


def _ivfpq(d, m, nbits, n=300):
    x = np.random.default_rng(1).normal(size=(n, d)).astype(np.float32)
    idx = faiss.index_factory(d, f"IVF4,PQ{m}x{nbits}")
    idx.train(x)
    idx.add(x)
    return idx


def test_the_faiss_build_is_told_apart_and_logged(monkeypatch):
    assert devices.faiss_gpus() == 0  # the tests run on faiss-cpu, which has get_num_gpus but no GPU resources
    assert devices.describe() == f"devices: torch: no model; FAISS {faiss.__version__}, CPU build"
    FakeGpus(monkeypatch, 2)
    assert devices.faiss_gpus() == 2
    assert devices.describe().endswith(f"FAISS {faiss.__version__}, GPU build, 2 GPUs visible")
    FakeGpus(monkeypatch, 0)
    assert devices.describe().endswith("GPU build, 0 GPUs")


def test_index_bytes_counts_codes_and_ids():
    assert devices.index_bytes(_flat(10, 4)) == 10 * 4 * 4  # float32 vectors
    ivf = _ivfpq(16, 4, 4)
    assert ivf.ntotal == 300 and devices.index_bytes(ivf) == 300 * (4 * 4 // 8 + 8)  # m*nbits bits of code, 64-bit id


def test_search_index_replicates_small_indexes_and_shards_large_ones(monkeypatch):
    gpus = FakeGpus(monkeypatch, 2)
    flat = _flat()  # 160 bytes
    assert devices.search_index(flat, "auto", shard_above_gb=4) is flat
    assert devices.search_index(flat, "cuda", shard_above_gb=160 / 1e9) is flat  # not above: replicated
    devices.search_index(flat, "cuda", shard_above_gb=159 / 1e9)
    devices.search_index(flat, "cuda", shard_above_gb=0)
    assert [i is flat for i, _ in gpus.calls] == [True] * 4
    assert [(co.shard, co.useFloat16) for _, co in gpus.calls] == [(False, False)] * 2 + [(True, False)] * 2
    gpus.n, gpus.calls[:] = 1, []
    devices.search_index(flat, "auto", shard_above_gb=0)
    assert [co.shard for _, co in gpus.calls] == [False]  # one GPU: the whole index on it


def test_ivfpq_gets_float16_lookup_tables_only_when_float32_ones_do_not_fit():
    # 8 KiB and 64 KiB of float32 lookup tables per query (untrained: the options depend on the shape only)
    small, large = faiss.index_factory(32, "IVF4,PQ8x8"), faiss.index_factory(128, "IVF4,PQ64x8")
    for idx, fp16 in ((small, False), (large, True), (_flat(), False)):
        mp = pytest.MonkeyPatch()
        FakeGpus(mp, 2)
        assert devices.cloner_options(idx, shard=True).useFloat16 is fp16
        mp.undo()


def test_cpu_is_used_when_no_gpu_answers_or_the_config_says_cpu(monkeypatch, caplog):
    flat = _flat()
    _no_cuda(monkeypatch)
    with caplog.at_level(logging.WARNING):
        assert devices.search_index(flat, "auto", 4) is flat  # faiss-cpu on a CPU machine: quietly the CPU
    assert caplog.records == []
    gpus = FakeGpus(monkeypatch, 2)
    assert devices.search_index(flat, "cpu", shard_above_gb=0) is flat and gpus.calls == []
    gpus.n = 0  # a GPU build that sees no GPU
    assert devices.search_index(flat, "auto", 4) is flat and gpus.calls == []


def test_a_gpu_job_on_a_cpu_only_faiss_says_so(monkeypatch, caplog):
    flat = _flat()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the model runs on a GPU
    with pytest.raises(devices.DeviceError, match=r"extraction\.device: cuda, but FAISS .*, CPU build: .*"
                       r"would search on the CPU.*--gpu.*set extraction\.device: auto"):
        devices.search_index(flat, "cuda", 4)
    with caplog.at_level(logging.WARNING):
        assert devices.search_index(flat, "auto", 4) is flat
    assert len(caplog.records) == 1 and "!!!" in caplog.text and "CPU build" in caplog.text
    assert "searching on the CPU (extraction.device: auto)" in caplog.text


def test_an_index_the_gpus_refuse_is_searched_on_the_cpu_with_a_warning(monkeypatch, caplog):
    FakeGpus(monkeypatch, 2, refuse="Bits per code must be 8")
    flat = _flat()
    with caplog.at_level(logging.WARNING):
        assert devices.search_index(flat, "cuda", 4) is flat
    assert "Bits per code must be 8" in caplog.text and "searching on the CPU" in caplog.text


def test_more_neighbours_than_a_gpu_search_returns_are_searched_on_the_cpu(monkeypatch, caplog):
    gpus = FakeGpus(monkeypatch, 1)
    flat = _flat()
    assert devices.search_index(flat, "cuda", 4, k=devices.GPU_MAX_K) is flat and len(gpus.calls) == 1
    with caplog.at_level(logging.WARNING):
        assert devices.search_index(flat, "cuda", 4, k=devices.GPU_MAX_K + 1) is flat
    assert len(gpus.calls) == 1 and f"k_max = {devices.GPU_MAX_K + 1} exceeds" in caplog.text


def test_training_uses_the_gpus_through_the_clustering_index_and_gives_the_cpu_result(monkeypatch):
    x = np.random.default_rng(2).normal(size=(700, 8)).astype(np.float32)

    def trained(with_gpus: bool):
        idx = faiss.index_factory(8, "IVF4,PQ2x4")
        ivf = faiss.extract_index_ivf(idx)
        ivf.cp.seed = 3
        mp = pytest.MonkeyPatch()
        gpus = FakeGpus(mp, 2 if with_gpus else 0)
        with devices.training_on_gpus(idx) as on_gpus:
            during = ivf.clustering_index
            idx.train(x)
        mp.undo()
        assert ivf.clustering_index is None
        return idx, on_gpus, during, gpus.calls

    gpu_idx, on, during, calls = trained(True)
    cpu_idx, off, none, no_calls = trained(False)
    assert on and not off and none is None and no_calls == []
    assert len(calls) == 1 and isinstance(calls[0][0], faiss.IndexFlatL2) and calls[0][0].d == 8
    assert during is not None
    # the fake GPU flat index is a CPU one: training through it gives exactly the CPU path's quantizer and codes
    centroids = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 4) for i in (gpu_idx, cpu_idx)]
    np.testing.assert_array_equal(*centroids)
    pq = [faiss.vector_to_array(i.pq.centroids) for i in (gpu_idx, cpu_idx)]
    np.testing.assert_array_equal(*pq)
    with devices.training_on_gpus(faiss.IndexFlatL2(8)) as flat_on:  # nothing to train
        assert not flat_on


def test_open_retriever_hands_the_index_to_search_index_with_the_config(monkeypatch):
    got = {}
    monkeypatch.setattr(lm, "load_checked", lambda *a, **k: ("model", "tok", {"dim": 4}))

    class DS:
        rows = 100

        def __init__(self, path):
            pass

        def check_model(self, ident, path):
            pass

    monkeypatch.setattr(retrieval, "Datastore", DS)
    monkeypatch.setattr(retrieval, "load_index", lambda *a: ("cpu index", {"exact": True}))
    monkeypatch.setattr(devices, "search_index",
                        lambda idx, dev, gb, k: got.update(idx=idx, dev=dev, gb=gb, k=k) or "gpu")
    cfg = {"device": "cuda", "dtype": "float16", "k_max": 8, "gpu_shard_above_gb": 0.5}
    out = retrieval.open_retriever("m", "d", "i", "j", cfg)
    assert out[4] == "gpu" and got == {"idx": "cpu index", "dev": "cuda", "gb": 0.5, "k": 8}


def test_load_index_returns_the_cpu_index(tmp_path, monkeypatch):
    """load_index checks and returns the CPU index; moving it to GPUs is open_retriever's (search_index)."""
    FakeGpus(monkeypatch, 2)

    class DS:  # what load_index reads of a Datastore
        rows, dim, hash, path = 10, 4, "h", tmp_path / "manifest.json"

    faiss.write_index(_flat(), str(tmp_path / "i.faiss"))
    write_json(tmp_path / "i.json", {"index_sha256": sha256_file(tmp_path / "i.faiss"), "manifest_sha256": "h"})
    got, _ = index.load_index(tmp_path / "i.faiss", tmp_path / "i.json", DS())
    assert isinstance(got, faiss.IndexFlatL2) and got.ntotal == 10


# --------------------------------------------------------------------------------------------- the workflow
def _cuda_config(tmp_path, name="tasks"):
    cfg = load_test_config(name)
    cfg["extraction"]["device"] = "cuda"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "config.yaml"


class Resources(dict):
    __getattr__ = dict.get


def _jobs(dry_run_output: str) -> list[SimpleNamespace]:
    """Each job of a `snakemake -n` printout as the Slurm plugin reads it: name, threads, resources."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", dry_run_output):
        m = re.match(r"rule (\w+):\n", block)
        res = re.search(r"^    resources: (.*)$", block, re.M)
        if not m or not res:
            continue
        kv = dict(pair.split("=", 1) for pair in res[1].split(", "))
        threads = re.search(r"^    threads: (\d+)$", block, re.M)
        jobs.append(SimpleNamespace(name=m[1], threads=int(threads[1]) if threads else 1, resources=Resources(
            {k: int(v) if v.isdigit() else v for k, v in kv.items()})))
    return jobs


def test_gpu_rules_ask_slurm_for_a_gpu_and_land_on_a_gpu_partition(tmp_path):
    """extraction.device: cuda on a CPU machine: the dry run is not refused (no job runs); exactly the rules that
    run the model with extraction.device ask for `gpu: 1`, which the Slurm plugin turns into `--gpus=1`, and the
    worked GPU profile's partitions send them to the GPU partition and every other job to the CPU one."""
    from snakemake_executor_plugin_slurm.partitions import get_best_partition, read_partition_file
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(_cuda_config(tmp_path))).stdout
    jobs = _jobs(out)
    assert len(jobs) == sum(job_stats(out).values())  # every job read
    gpu = sorted({j.name for j in jobs if j.resources.get("gpu")})
    assert gpu == ["extract_keys", "retrieve", "score_task"]
    profile = yaml.safe_load((ROOT / "slurm/gpu/config.yaml").read_text())
    assert profile["executor"] == "slurm" and (ROOT / "slurm/gpu" / profile["slurm-partition-config"]).is_file()
    partitions = read_partition_file(ROOT / "slurm/gpu" / profile["slurm-partition-config"])
    quiet = SimpleNamespace(info=lambda *a: None, debug=lambda *a: None, warning=lambda *a: None)
    for job in jobs:
        on_gpu = job.name in gpu
        assert set_gres_string(job) == (" --gpus=1" if on_gpu else ""), job.name
        assert get_best_partition(partitions, job, quiet) == ("gpu" if on_gpu else "cpu"), job.name
    job = next(j for j in jobs if j.name == "retrieve")  # a GPU model named for the GPU rules, as the profile shows
    job.resources["gpu_model"] = "h100"
    assert set_gres_string(job) == " --gpus=h100:1" and get_best_partition(partitions, job, quiet) == "gpu"


@pytest.mark.slow
def test_cuda_without_a_gpu_is_refused_before_any_local_job_but_not_on_a_cluster_submit_host(tmp_path):
    """Run locally, extraction.device: cuda on this CPU machine stops before the first job, naming the key. With
    the Slurm executor the submitting host is not asked (its jobs refuse on their node if it has no GPU): here a
    fake sbatch fails the first submission, which shows that the run got past the check."""
    local = tmp_path / "local"
    local.mkdir()
    proc = snakemake(local, "--configfile", str(_cuda_config(local, "micro")), check=False)
    assert proc.returncode != 0
    assert "extraction.device: cuda, but torch" in proc.stderr + proc.stdout
    assert not (local / "results").exists()  # no job ran
    fake = tmp_path / "bin"
    fake.mkdir()
    for tool, body in {"sbatch": "echo fake sbatch >&2; exit 1", "sacct": "exit 1", "squeue": "exit 0",
                       "sinfo": "echo 'main*'"}.items():
        (fake / tool).write_text(f"#!/bin/bash\n{body}\n")
        (fake / tool).chmod(0o755)
    cluster = tmp_path / "cluster"
    cluster.mkdir()
    env = dict(project_env(), PATH=f"{fake}:{project_env()['PATH']}")
    proc = subprocess.run(snakemake_cmd(cluster, "--profile", str(ROOT / "slurm"), "--configfile",
                                        str(_cuda_config(cluster, "micro"))),
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "sbatch failed. The error message was 'fake sbatch'" in log, log[-3000:]
    assert "extraction.device: cuda, but" not in log


@pytest.mark.parametrize("size", [0, 20])
def test_an_empty_or_truncated_safetensors_file_is_one_line_naming_it(tmp_path, capsys, size):
    """Issue 30 item 11: a zero-byte (or cut) model.safetensors in a local model directory ended model_identity in a
    safetensors traceback (its error is no ValueError); now the step's one error line names the file."""
    _tiny_model(tmp_path)
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:size])
    params = json.dumps({"spec": {"source": "local", "path": str(tmp_path / "m")}})
    capsys.readouterr()  # the fixture's progress bars
    rc = cli.main(["model-identity", "--params", params, "--model-json", str(tmp_path / "again.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == [f"error: model-identity: {weights}: not a safetensors file ({size} bytes: empty or "
                               "truncated); copy the model's weights again"]
