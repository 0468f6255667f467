import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
# CI runs the same hypothesis examples every time, so a red run can be reproduced; locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def project_env() -> dict:
    """The environment the rules run with: this interpreter first on PATH, the project on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def snakemake_cmd(workdir, *args) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", *args]


def snakemake(workdir, *args, check=True, timeout=900):
    """Run the project's Snakefile in ``workdir`` with this interpreter's environment."""
    proc = subprocess.run(snakemake_cmd(workdir, *args), env=project_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table Snakemake prints; {} when there is nothing to do."""
    if "Nothing to be done" in output:
        return {}
    table = output[output.index("Job stats:") :].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="session")
def micro_run(tmp_path_factory):
    """One finished run of tests/micro.yaml, shared by the end-to-end tests."""
    work = tmp_path_factory.mktemp("micro")
    shutil.copy(ROOT / "tests" / "micro.yaml", work / "config.yaml")
    snakemake(work, "--configfile", str(work / "config.yaml"))
    return work
