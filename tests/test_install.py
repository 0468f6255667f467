"""install.sh picks the machine's path and never installs both FAISS builds: its --dry-run, in a copy of the
script, with a fake nvidia-smi (listing a GPU, failing, or absent) and a fake .venv that reports what is
installed; and the pyproject extras it installs hold exactly one FAISS build each. Nothing is installed."""

import os
import re
import shutil
import stat
import subprocess

import pytest
import tomllib
import yaml
from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
FAISS = {"faiss-cpu", "faiss-gpu"}


def _script(path, body: str):
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def box(tmp_path):
    """A copy of install.sh and a PATH holding only the tools it uses (and, per test, a fake nvidia-smi)."""
    shutil.copy(ROOT / "install.sh", tmp_path / "install.sh")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("dirname", "grep", "sed", "cut", "env"):
        os.symlink(shutil.which(name), tools / name)
    return tmp_path


def dry_run(box, *flags, nvidia_smi: str | None = None, venv: dict | None = None) -> tuple[str, list[str]]:
    """(the choice line, the commands) of `install.sh --dry-run`. ``nvidia_smi``: the fake's body (None: absent).
    ``venv``: a fake .venv/bin/python answering install.sh's checks: {"torch": "cpu"|"cuda"|None, "pkgs": [...]}."""
    if nvidia_smi is not None:
        _script(box / "bin" / "nvidia-smi", nvidia_smi)
    if venv is not None:
        (box / ".venv" / "bin").mkdir(parents=True)
        torch, pkgs = venv.get("torch"), " ".join(venv.get("pkgs", []))
        _script(box / ".venv" / "bin" / "python", f"""
if [ "$1" = -c ]; then
  case "$2" in
    *torch.version.cuda*) [ "{torch}" = cuda ] ;;
    *"import torch"*) [ "{torch}" != None ] ;;
    *) exit 3 ;;
  esac
  exit $?
fi
if [ "$1 $2 $3 $4" = "-m pip show -q" ]; then
  for p in {pkgs}; do [ "$p" = "$5" ] && exit 0; done
  exit 1
fi
exit 4
""")
    out = subprocess.run(["/bin/bash", str(box / "install.sh"), "--dry-run", *flags], env={"PATH": str(box / "bin")},
                         cwd=box, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    return lines[0], [line[2:] for line in lines[1:]]


LISTS_A_GPU = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"'
FAILS = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2; exit 9'
PIP = ".venv/bin/python -m pip"


def test_a_machine_whose_nvidia_smi_lists_a_gpu_gets_the_gpu_path(box):
    choice, cmds = dry_run(box, nvidia_smi=LISTS_A_GPU)
    assert choice == "install.sh: the gpu path (nvidia-smi lists a GPU)"
    assert cmds == [
        "python3 -m venv .venv",
        f"{PIP} install -q --upgrade pip",
        f"{PIP} install -q torch==2.13.0",
        f"env PYTHONWARNINGS=ignore {PIP} install -q -e .[gpu,dev]",
    ]


@pytest.mark.parametrize("nvidia_smi, why", [(FAILS, "nvidia-smi lists no GPU"), (None, "no nvidia-smi on PATH"),
                                             ("echo 'No devices were found'", "nvidia-smi lists no GPU")])
def test_a_machine_without_an_answering_gpu_gets_the_cpu_path_as_before(box, nvidia_smi, why):
    choice, cmds = dry_run(box, nvidia_smi=nvidia_smi)
    assert choice == f"install.sh: the cpu path ({why})"
    assert cmds == [
        "python3 -m venv .venv",
        f"{PIP} install -q --upgrade pip",
        f"{PIP} install -q torch==2.13.0",
        f"env PYTHONWARNINGS=ignore {PIP} install -q -e .[test]",
    ]


def test_flags_force_the_path(box):
    assert dry_run(box, "--cpu", nvidia_smi=LISTS_A_GPU)[1][-1].endswith("-e .[test]")
    choice, cmds = dry_run(box, "--gpu")
    assert choice == "install.sh: the gpu path (asked for with --gpu)" and cmds[-1].endswith("-e .[gpu,dev]")
    bad = subprocess.run(["/bin/bash", str(box / "install.sh"), "--cuda"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option '--cuda'" in bad.stderr


def test_switching_paths_uninstalls_the_other_faiss_and_a_cpu_torch(box):
    _, cmds = dry_run(box, "--gpu", venv={"torch": "cpu", "pkgs": ["torch", "faiss-cpu"]})
    assert cmds[2:] == [
        f"{PIP} uninstall -q -y torch",  # a CPU build of torch gives way to a CUDA one
        f"{PIP} install -q torch==2.13.0",
        f"{PIP} uninstall -q -y faiss-cpu",
        f"env PYTHONWARNINGS=ignore {PIP} install -q -e .[gpu,dev]",
    ]


def test_what_is_there_already_is_kept(box):
    _, cmds = dry_run(box, "--gpu", venv={"torch": "cuda", "pkgs": ["torch", "faiss-gpu"]})
    assert cmds[2:] == [f"env PYTHONWARNINGS=ignore {PIP} install -q -e .[gpu,dev]"]  # a CUDA torch is kept
    shutil.rmtree(box / ".venv")
    _, cmds = dry_run(box, venv={"torch": "cuda", "pkgs": ["torch", "faiss-gpu"]})  # the CPU path on a GPU venv
    assert cmds[2:] == [f"{PIP} uninstall -q -y faiss-gpu", f"env PYTHONWARNINGS=ignore {PIP} install -q -e .[test]"]


def _expand(extras: str) -> set[str]:
    """The requirement names that `pip install .[extras]` adds, self-references followed."""
    out = set()
    for extra in extras.split(","):
        for req in PYPROJECT["project"]["optional-dependencies"][extra]:
            m = re.fullmatch(r"knnlm-limits\[(.+)\]", req)
            out |= _expand(m[1]) if m else {re.split(r"[<>=;\[ ]", req, maxsplit=1)[0]}
    return out


def test_each_install_holds_exactly_one_faiss_build():
    deps = {re.split(r"[<>=;\[ ]", r, maxsplit=1)[0] for r in PYPROJECT["project"]["dependencies"]}
    assert not deps & FAISS  # a dependency would come back beside the other build on every install
    script = (ROOT / "install.sh").read_text()
    used = set(re.findall(r"^\s*extras=(\S+)$", script, re.M))
    assert used == {"test", "gpu,dev"}
    assert _expand("test") & FAISS == {"faiss-cpu"} and "pytest" in _expand("test")
    assert _expand("gpu,dev") & FAISS == {"faiss-gpu"} and _expand("gpu,dev") - FAISS == _expand("test") - FAISS


def test_the_gpu_conda_env_is_the_pipeline_env_with_faiss_gpu():
    cpu, gpu = (yaml.safe_load((ROOT / "envs" / f"{e}.yaml").read_text())["dependencies"]
                for e in ("pipeline", "pipeline-gpu"))
    swap = {f"faiss-cpu{PYPROJECT['project']['optional-dependencies']['cpu'][0][len('faiss-cpu'):]}":
            PYPROJECT["project"]["optional-dependencies"]["gpu"][0]}
    assert [swap.get(d, d) if isinstance(d, str) else d for d in cpu] == gpu


def test_the_conda_envs_pin_what_pyproject_pins():
    """The pipeline env's pip section is pyproject's dependencies, the same ranges, less Snakemake and its plugin
    (they run the workflow, not its steps); its FAISS is the `cpu` extra's. A dependency added to pyproject alone
    would be missing from every job that runs with --sdm conda."""
    env = yaml.safe_load((ROOT / "envs" / "pipeline.yaml").read_text())["dependencies"]
    pip = next(d["pip"] for d in env if isinstance(d, dict))
    steps = [r for r in PYPROJECT["project"]["dependencies"] if not r.startswith("snakemake")]
    assert sorted(pip) == sorted(steps)
    assert PYPROJECT["project"]["optional-dependencies"]["cpu"][0] in env
    plotting = yaml.safe_load((ROOT / "envs" / "plotting.yaml").read_text())["dependencies"]
    ranges = {re.split(r"[<>=]", r, maxsplit=1)[0]: r for r in steps}
    assert all(ranges[re.split(r"[<>=]", d, maxsplit=1)[0]] == d for d in plotting if not d.startswith("python"))
