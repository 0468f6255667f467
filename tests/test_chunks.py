"""Training in chunks (models.<m>.train.chunk_steps): the same weights as one job, the expected chain of jobs,
per-chunk runtime from the config; and the conda envs pin what pyproject.toml pins, whose package data holds the
files the code reads."""

import json
import re

import numpy as np
import polars as pl
import pytest
import yaml
from conftest import ROOT, job_stats, load_test_config, snakemake

from workflow_scripts.__main__ import main
from workflow_scripts.artifacts import ArtifactError, save_npy
from workflow_scripts.config import training_chunks
from workflow_scripts.lm import train_from_scratch, train_tokenizer

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # Python 3.10: the same parser, from the test extra
    import tomli as tomllib

CFG = {"corpus": "c", "vocab_size": 300, "batch_size": 4, "block_size": 16, "n_embd": 16, "n_layer": 2, "n_head": 2,
       "dropout": 0.1, "lr": 3e-3, "weight_decay": 0.1, "steps": 9, "warmup_fraction": 0.2, "log_every": 2}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("chunks")
    words = ["alpha", "beta", "gamma", "delta", "born", "in", "city", "works", "for", "the"]
    rng = np.random.default_rng(0)
    pl.DataFrame({"text": [" ".join(rng.choice(words, 30)) for _ in range(50)]}).write_parquet(d / "train.parquet")
    train_tokenizer(d / "train.parquet", 300, d / "tok")
    save_npy(d / "train.npy", rng.integers(0, 256, 3000).astype(np.int32))
    save_npy(d / "valid.npy", rng.integers(0, 256, 300).astype(np.int32))
    return d


def _cli(data, out, cfg, *extra, stop=None):
    p = {"train": cfg, "seed": 5, **({"stop": stop} if stop is not None else {})}
    assert main(["train-lm", "--params", json.dumps(p), "--threads", "1", "--train", str(data / "train.npy"),
                 "--valid", str(data / "valid.npy"), "--tokenizer-dir", str(data / "tok"), *extra]) == 0


def test_training_chunks():
    assert training_chunks(9, None) == [(0, 9)] == training_chunks(9, 9) == training_chunks(9, 20)
    assert training_chunks(9, 3) == [(0, 3), (3, 6), (6, 9)]
    assert training_chunks(10, 4) == [(0, 4), (4, 8), (8, 10)]


def test_three_chunks_give_the_weights_and_loss_log_of_one_job(data, tmp_path):
    """With dropout on, so the torch RNG state must travel too; through the CLI the rules run."""
    one, chunked = tmp_path / "one", tmp_path / "chunked"
    _cli(data, one, CFG, "--hf", str(one / "hf"), "--model-json", str(one / "model.json"),
         "--loss-csv", str(one / "loss.csv"), "--loss-parquet", str(one / "loss.parquet"))
    prev = []
    for i, (_, stop) in enumerate(training_chunks(CFG["steps"], 3)[:-1], start=1):
        ckpt = chunked / f"chunk_{i:03d}.pt"
        _cli(data, chunked, CFG, *prev, "--checkpoint", str(ckpt), stop=stop)
        assert ckpt.exists() and not (chunked / "hf").exists() and not (chunked / "model.json").exists()
        prev = ["--resume", str(ckpt)]
    _cli(data, chunked, CFG, *prev, "--hf", str(chunked / "hf"), "--model-json", str(chunked / "model.json"),
         "--loss-csv", str(chunked / "loss.csv"), "--loss-parquet", str(chunked / "loss.parquet"))

    a, b = (json.loads((d / "model.json").read_text()) for d in (one, chunked))
    assert a["model_sha256"] == b["model_sha256"]
    assert (one / "hf/model.safetensors").read_bytes() == (chunked / "hf/model.safetensors").read_bytes()
    la, lb = (pl.read_csv(d / "loss.csv").drop("seconds") for d in (one, chunked))
    assert la.equals(lb) and la["step"].to_list() == [0, 2, 4, 6, 8, 9]


def test_a_checkpoint_from_another_config_is_refused(data, tmp_path):
    train_from_scratch(data / "train.npy", data / "valid.npy", data / "tok", CFG, 5, None, None, None, stop=3,
                       checkpoint=tmp_path / "c.pt")
    # the chunking itself may change between chunks; what is computed may not
    train_from_scratch(data / "train.npy", data / "valid.npy", data / "tok", {**CFG, "chunk_steps": 3, "runtime": 5},
                       5, None, None, None, resume=tmp_path / "c.pt", stop=6, checkpoint=tmp_path / "c2.pt")
    with pytest.raises(ArtifactError, match="another training config or seed"):
        train_from_scratch(data / "train.npy", data / "valid.npy", data / "tok", {**CFG, "lr": 1e-3}, 5, None, None,
                           None, resume=tmp_path / "c.pt", stop=6, checkpoint=tmp_path / "c3.pt")
    with pytest.raises(ArtifactError, match="not a training checkpoint"):
        (tmp_path / "bad.pt").write_bytes(b"truncated")
        train_from_scratch(data / "train.npy", data / "valid.npy", data / "tok", CFG, 5, None, None, None,
                           resume=tmp_path / "bad.pt", stop=6, checkpoint=tmp_path / "c4.pt")


def test_dag_has_one_train_lm_chunk_job_per_chunk_but_the_last(tmp_path):
    """30 steps in chunks of 7: chunks 1-4 are train_lm_chunk jobs, each asking for train.runtime minutes; the
    fifth is train_lm. The training params the jobs carry leave the chunking out, so the default run's train_lm
    params are those of before chunking existed."""
    cfg = load_test_config("micro")
    cfg["models"]["micro-gpt2"]["train"].update(chunk_steps=7, runtime=90)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml"), "--",
                    "results/models/micro-gpt2/model.json").stdout
    assert job_stats(out) == {"corpus": 1, "train_tokenizer": 1, "tokenize": 2, "train_lm_chunk": 4, "train_lm": 1}
    train_jobs = re.findall(r"rule (train_lm\w*):\n(?:    .*\n)*?    resources: [^\n]*runtime=(\d+)", out)
    assert sorted(train_jobs) == [("train_lm", "90")] + [("train_lm_chunk", "90")] * 4
    stops = sorted(int(s) for s in re.findall(r'"stop": (\d+)', out))
    assert stops == [7, 14, 21, 28]
    last = [line for line in out.splitlines() if "workflow_scripts train-lm" in line and " --hf " in line]
    assert len(last) == 1 and " --resume results/models/micro-gpt2/chunks/chunk_004.pt " in last[0]
    assert "chunk_steps" not in out and '"runtime"' not in out


def _ranges(specs):
    return {re.split(r"[<>=]", s, maxsplit=1)[0]: s for s in specs}


def test_conda_envs_pin_the_ranges_of_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    deps = _ranges(project["dependencies"] + extras["cpu"] + extras["gpu"])  # FAISS: one build per env
    for env in ("pipeline", "pipeline-gpu", "plotting"):
        spec = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())["dependencies"]
        listed = [s for s in spec if isinstance(s, str) and not s.startswith(("python", "pip"))]
        listed += [s for s in spec if isinstance(s, dict) for s in s["pip"]]
        for name, s in _ranges(listed).items():
            assert deps.get(name) == s, f"envs/{env}.yaml: {s} but pyproject.toml: {deps.get(name)}"
    pipeline = yaml.safe_load((ROOT / "envs" / "pipeline.yaml").read_text())["dependencies"]
    names = set(_ranges([s for s in pipeline if isinstance(s, str)] + pipeline[-1]["pip"]))
    assert set(deps) - names == {"snakemake", "snakemake-executor-plugin-slurm", "faiss-gpu"}  # the runner; one FAISS


def test_package_data_holds_the_files_the_code_reads():
    """A non-editable install ships only pyproject's package-data: the task registry, the Macondo name lists and
    paper 2's numbers at their places in the tasks/ and analyses/ wings, and the config schema."""
    from workflow_scripts import config
    from workflow_scripts.analyses import compare, macondo_data
    from workflow_scripts.tasks import registry

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {f for pkg, globs in data.items() for g in globs for f in (ROOT / pkg.replace(".", "/")).glob(g)}
    needed = {registry.REGISTRY_PATH, compare.PAPER, config.SCHEMA_PATH}
    needed |= {macondo_data.DATA_DIR / f"{name}.txt" for name in macondo_data.LISTS}
    assert all(f.is_file() for f in needed)
    assert needed <= shipped, sorted(str(f.relative_to(ROOT)) for f in needed - shipped)
    assert registry.REGISTRY_PATH == ROOT / "workflow_scripts/tasks/registry.yaml"
    assert macondo_data.DATA_DIR == ROOT / "workflow_scripts/analyses/macondo_names"
