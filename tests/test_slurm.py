"""The micro config through a real Slurm (`--profile slurm`), compared with the local run.

Needs a running Slurm (CI starts one with `slurm/local-cluster.sh --install`); skips with the reason otherwise,
except where KNNLM_REQUIRE_SLURM=1 (.ci/run sets it when it is root and started Slurm): there it fails instead.
"""

import os
import shutil
import subprocess

import numpy as np
import polars as pl
import pytest
from conftest import ROOT, snakemake

pytestmark = pytest.mark.slow


def _slurm_up() -> str | None:
    if not shutil.which("sbatch"):
        return "Slurm is not installed (run slurm/local-cluster.sh --install as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0 or not out.stdout.strip():
        return f"Slurm is not running (sinfo: {out.stderr.strip() or 'no nodes'}); start slurm/local-cluster.sh"
    return None


def test_slurm_run_equals_local_run(micro_run, tmp_path):
    reason = _slurm_up()
    if reason and os.environ.get("KNNLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"KNNLM_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    shutil.copy(micro_run / "config.yaml", tmp_path / "config.yaml")
    proc = snakemake(tmp_path, "--profile", str(ROOT / "slurm"), "--configfile", str(tmp_path / "config.yaml"),
                     timeout=1500)
    log = proc.stdout + proc.stderr
    submitted = [line for line in log.splitlines() if "submitted with SLURM jobid" in line]
    assert any("rule_extract_keys/micro_000" in s for s in submitted)
    assert any("rule_extract_keys/micro_001" in s for s in submitted)
    assert len(submitted) >= 10, log[-3000:]
    for rel in ("datastores/micro/manifest.json", "models/micro-gpt2/model.json"):
        assert (tmp_path / "results" / rel).read_text() == (micro_run / "results" / rel).read_text(), rel
    for e in ("valid", "test"):
        for name in ("dists", "ids", "lm_logprob"):
            a = np.load(tmp_path / f"results/retrieval/{e}/micro/{name}.npy")
            b = np.load(micro_run / f"results/retrieval/{e}/micro/{name}.npy")
            np.testing.assert_array_equal(a, b)
        sweep = f"results/sweeps/{e}/micro/perplexity.parquet"
        assert pl.read_parquet(tmp_path / sweep).equals(pl.read_parquet(micro_run / sweep))
