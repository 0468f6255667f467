"""The command line and the code tracking (workflow_scripts/cli.py): steps found from the sources, arguments from
signatures, import closures followed through the package, and the three wings' import rules."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, project_env

from workflow_scripts import cli, job_environment

PACKAGE = ROOT / "workflow_scripts"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def toy(tmp_path):
    """A package shaped like ours: __main__, cli, a backbone module, a wing importing it in a function."""
    return _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "__main__.py": "from .cli import main\n",
            "cli.py": "def step(fn=None, name=None):\n    return fn\n",
            "base.py": (
                "import numpy\nfrom .cli import step\n\n@step\ndef first(params: dict):\n"
                "    '''One.\n\n    More.'''\n"
            ),
            "other.py": "from . import base\n",
            "lonely.py": "x = 1\n",
            "wing/__init__.py": "",
            "wing/a.py": (
                "from ..cli import step\n\n@step(name='second-one')\ndef second():\n"
                "    from ..other import x  # inside a function\n"
            ),
            "wing/b.py": "from .a import second\n",
        },
    )


def test_find_steps_reads_decorators_and_names(toy):
    steps = cli.find_steps(toy)
    assert steps == {"first": ("base", "first", "One."), "second-one": ("wing.a", "second", "")}


def test_closure_follows_relative_imports_in_functions_and_parents(toy):
    rel = {str(p.relative_to(toy)) for p in cli.code_closure("second-one", toy)}
    # wing.a imports ..other (inside a function), which imports base; a wing's __init__ runs on import
    assert rel == {"__init__.py", "__main__.py", "cli.py", "wing/__init__.py", "wing/a.py", "other.py", "base.py"}
    rel = {str(p.relative_to(toy)) for p in cli.code_closure("first", toy)}
    assert rel == {"__init__.py", "__main__.py", "cli.py", "base.py"}  # not other.py, not lonely.py


def test_code_hash_changes_only_with_the_closure(toy):
    before = {s: cli.code_hash(s, toy) for s in ("first", "second-one")}
    cli.code_closure.cache_clear()
    (toy / "lonely.py").write_text("x = 2\n")
    assert {s: cli.code_hash(s, toy) for s in before} == before
    (toy / "other.py").write_text("from . import base  # edited\n")
    cli._tree.cache_clear()
    after = {s: cli.code_hash(s, toy) for s in before}
    assert after["first"] == before["first"] and after["second-one"] != before["second-one"]


def test_a_step_defined_twice_is_refused(toy):
    (toy / "dup.py").write_text("from .cli import step\n\n@step\ndef first():\n    pass\n")
    with pytest.raises(RuntimeError, match="step first is defined twice"):
        cli.find_steps(toy)


def _forget() -> None:
    """Clear the in-process caches, as a new process starts."""
    for f in (cli._modules, cli._tree, cli._index, cli.find_steps, cli.step_arguments, cli.code_closure):
        f.cache_clear()


def test_the_index_kept_in_pycache_follows_every_edit_and_survives_damage(toy, monkeypatch):
    """The steps, arguments and imports are kept in __pycache__ under the package's digest: a new process reads
    the file instead of parsing, an edited module is another key (its new step is found), and a damaged file is
    parsed again rather than trusted or fatal."""
    first = (cli.find_steps(toy), cli.step_arguments("first", toy), cli.code_closure("second-one", toy))
    kept = list((toy / "__pycache__").glob("steps.*.json"))
    assert len(kept) == 1
    _forget()
    with monkeypatch.context() as m:
        m.setattr(cli, "_tree", lambda path: pytest.fail(f"parsed {path} although the index was kept"))
        assert (cli.find_steps(toy), cli.step_arguments("first", toy), cli.code_closure("second-one", toy)) == first
    (toy / "lonely.py").write_text("from .cli import step\n\n@step\ndef third(x: int = 1):\n    pass\n")
    _forget()
    assert cli.find_steps(toy)["third"] == ("lonely", "third", "")
    now = list((toy / "__pycache__").glob("steps.*.json"))
    assert len(now) == 1 and now != kept  # the old package's key is dropped
    for damaged in ('{"steps": ', "[]", '{"steps": {}, "args": {}, "imports": {}}'):  # cut short, not an index, empty
        now[0].write_text(damaged)
        _forget()
        assert cli.step_arguments("third", toy) == {"x": ("value", False)}


def test_unknown_step_has_no_closure():
    with pytest.raises(KeyError, match="no step 'nope'"):
        cli.code_closure("nope")


def test_parser_from_signature():
    def fn(params: dict, a: Path, many: list[Path], opt: Path | None = None, few: list[Path] = (), n: int = 3):
        """Doc."""

    fn = cli.step(fn)
    p = cli.parser_for(fn)
    args = vars(p.parse_args(["--params", "{}", "--a", "x", "--many", "y", "z", "--n", "5"]))
    assert args == {"params": "{}", "a": Path("x"), "many": [Path("y"), Path("z")], "opt": None, "few": (), "n": 5}
    with pytest.raises(SystemExit):
        p.parse_args(["--params", "{}", "--many", "y"])  # --a is required


def test_step_arguments_read_from_the_source_match_the_parser_of_every_step():
    """The Snakefile builds each rule's command line from `step_arguments` (read with ast, no import): for every
    step, the same arguments, kinds and required flags as the parser built from the imported function."""
    import importlib

    assert cli.step_arguments("sweep")["cache"] == ("path", True)
    assert cli.step_arguments("hurdle")["test"] == ("path", False)
    assert cli.step_arguments("task-suite")["out"] == ("paths", True)
    for name, (mod, func, _) in cli.find_steps().items():
        fn = getattr(importlib.import_module(f"workflow_scripts.{mod}" if mod else "workflow_scripts"), func)
        parsed = {}
        for a in cli.parser_for(fn)._actions:
            if a.dest != "help":
                kind = ("params" if a.dest == "params" else "paths" if a.nargs in ("+", "*")
                        else "path" if a.type is Path else "value")
                parsed[a.dest] = (kind, a.required)
        read = {a: (kind, required and a != "threads") for a, (kind, required) in cli.step_arguments(name).items()}
        assert read == parsed, name


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "workflow_scripts", *args], cwd=ROOT, env=project_env(), capture_output=True, text=True
    )


def test_every_step_has_help_and_the_list_names_them():
    out = _run("--help")
    assert out.returncode == 0
    for name in cli.find_steps():
        assert name in out.stdout
    sweep = _run("sweep", "--help")
    assert sweep.returncode == 0 and "--cache PATH" in sweep.stdout and "--csv PATH" in sweep.stdout


def test_bad_params_and_unknown_step_are_refused_by_name():
    bad = _run("summarize", "--params", "{oops", "--sweeps", "a", "--csv", "b", "--parquet", "c")
    assert bad.returncode == 2 and "--params is not valid JSON" in bad.stderr
    unknown = _run("no-such-step")
    assert unknown.returncode == 2 and "no-such-step" in unknown.stderr


def _imports(module: str) -> set[str]:
    mods = cli._modules(PACKAGE)
    import ast

    out = set()
    for node in ast.walk(cli._tree(mods[module])):
        if isinstance(node, ast.Import | ast.ImportFrom):
            out |= cli._resolve(module, node, mods)
    return out - {module}


# The three layering rules: what each part of the package may import.
MAY_IMPORT = {
    "backbone": {"backbone"},  # the backbone never imports tasks/ (paper 1) or analyses/ (paper 2)
    "tasks": {"tasks", "backbone"},  # tasks/ never imports analyses/
    "analyses": {"analyses", "backbone"},  # analyses/ never imports tasks/: it runs a model through forward.py
}


def test_wings_import_rules_and_no_cycles():
    """The three layering rules (MAY_IMPORT) hold for every import, at any depth of a module; no import cycles."""
    mods = sorted(cli._modules(PACKAGE))
    graph = {m: _imports(m) for m in mods}
    part = {m: m.split(".")[0] if m.split(".")[0] in ("tasks", "analyses") else "backbone" for m in mods}
    assert {"backbone", "tasks", "analyses"} == set(part.values())
    for m, deps in graph.items():
        for d in deps:
            assert part[d] in MAY_IMPORT[part[m]], f"{m} ({part[m]}) imports {d} ({part[d]})"
    # a wing's package __init__ is imported implicitly by its modules: leave those edges out of the cycle check
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph[m]:
            if d in ("", "tasks", "analyses"):
                continue
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in mods:
        if m not in state:
            visit(m, [])


def test_building_the_dag_imports_no_torch():
    """common.smk imports config, cli, the task registry and the task items' reader only: none of them pulls torch
    in."""
    code = (
        "import sys\n"
        "import workflow_scripts.cli, workflow_scripts.config, workflow_scripts.tasks.registry\n"
        "import workflow_scripts.tasks.items\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'faiss' not in sys.modules, 'faiss imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=project_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    smk = (ROOT / "rules" / "common.smk").read_text()
    imported = {line.split()[1] for line in smk.splitlines() if line.startswith(("from workflow_scripts", "import "))}
    assert imported <= {"json", "os", "re", "shlex", "workflow_scripts", "workflow_scripts.config",
                        "workflow_scripts.tasks"}


# The modules whose steps run a model (or train one): only these may import torch when a job starts. Every other
# step (tables, sweeps, figures, the index, verify jobs) starts in numpy/polars time, not torch's (2-3 s a job).
RUNS_A_MODEL = {"extraction", "lm", "retrieval", "tasks.scoring", "analyses.hurdle", "analyses.macondo", "analyses.mlp",
                "analyses.projection"}


def test_steps_that_run_no_model_start_without_torch():
    """A job imports its step's module only (cli.main); for every module with steps outside RUNS_A_MODEL, importing
    it imports neither torch nor transformers."""
    modules = {mod for mod, _, _ in cli.find_steps().values()}
    assert RUNS_A_MODEL <= modules, f"not step modules: {RUNS_A_MODEL - modules}"
    code = (
        "import importlib, sys\n"
        "m = importlib.import_module('workflow_scripts.' + sys.argv[1])\n"
        "print(' '.join(x for x in ('torch', 'transformers') if x in sys.modules))\n"
    )
    for mod in sorted(modules - RUNS_A_MODEL):
        out = subprocess.run([sys.executable, "-c", code, mod], cwd=ROOT, env=project_env(), capture_output=True,
                             text=True)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "", f"workflow_scripts.{mod} imports {out.stdout.strip()}"


# ----------------------------------------------------------------------------- the jobs' environment
_CHURN = """
import resource
import numpy as np
def churn():  # three 16 MiB arrays at a time, freed together: a batch's temporaries
    for _ in range(20):
        arrays = [np.ones(2 << 20) for _ in range(3)]
        del arrays
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _plain_env() -> dict:
    """The environment the tests run steps with, less any GLIBC_TUNABLES this process was given."""
    return {k: v for k, v in project_env().items() if k != "GLIBC_TUNABLES"}


def _faults(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", _CHURN], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"), reason="glibc's malloc")
def test_the_jobs_environment_reuses_freed_memory_instead_of_faulting_it_in_again():
    """With job_environment's variables, a batch's temporaries come from memory freed by the batch before; by default
    glibc gives 48 MiB freed at once back to the system and faults it in again."""
    plain = _plain_env()
    assert job_environment.job_environment(plain) == {"GLIBC_TUNABLES": job_environment.GLIBC_TUNABLES}
    default, reused = _faults(plain), _faults(plain | job_environment.job_environment(plain))
    assert reused < default / 10, (default, reused)
    assert job_environment.job_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {}  # the user's own


def test_no_step_imports_the_jobs_environment():
    """So it is in no step's code closure: changing the allocator settings reruns nothing."""
    for name in cli.find_steps():
        assert PACKAGE / "job_environment.py" not in cli.code_closure(name), name


_PARSE = """
import os, sys
from snakemake.cli import main
sys.argv = ["snakemake", *sys.argv[1:]]
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", "(unset)"))
"""


@pytest.mark.slow  # a Snakemake DAG build: over 5 s
def test_the_snakefile_gives_its_jobs_the_environment(tmp_path):
    """Parsing the Snakefile puts the variables in the environment its jobs inherit (local, and the Slurm jobs'
    Snakemake parses it too); one the user set is kept."""
    plain = _plain_env()
    args = ["--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
            str(ROOT / "tests" / "configs" / "micro.yaml"), "--cores", "1", "-n", "--quiet", "all"]
    for env, expected in ((plain, job_environment.GLIBC_TUNABLES),
                          (plain | {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "glibc.malloc.arena_max=2")):
        out = subprocess.run([sys.executable, "-c", _PARSE, *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip().splitlines()[-1] == f"GLIBC_TUNABLES={expected}"
