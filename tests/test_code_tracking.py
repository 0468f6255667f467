"""Code tracking end to end: on a finished run where every rule has a job (tests/configs/full.yaml), editing one
module of workflow_scripts/ makes `snakemake -n` plan exactly the rules whose step imports it, directly or not,
plus what is downstream of their outputs, and nothing else. Edits go to a copy of the project."""

import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import ROOT, copy_project, snakemake

from workflow_scripts import cli

MODULES = sorted(str(p.relative_to(cli.PACKAGE)) for p in cli.PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def imports_of(path) -> set:
    """The package files a module imports, found with regular expressions (an oracle independent of cli.py's
    ast walk): relative imports at any depth of the file, `from . import a, b` naming modules, and the
    __init__ of every package on the way."""
    text = path.read_text()
    out = set()
    for dots, mod, names in re.findall(r"^\s*from (\.+)([\w.]*) import (\([^)]*\)|.*)$", text, re.M):
        base = path.parent
        for _ in range(len(dots) - 1):
            base = base.parent
        target = base.joinpath(*mod.split(".")) if mod else base
        if target.with_suffix(".py").is_file():
            out.add(target.with_suffix(".py"))
        elif target.is_dir():
            out.add(target / "__init__.py")
            for name in re.findall(r"\w+", names):
                if (target / f"{name}.py").is_file():
                    out.add(target / f"{name}.py")
    for found in list(out) + [path]:
        for parent in found.relative_to(cli.PACKAGE).parents:
            out.add(cli.PACKAGE / parent / "__init__.py")
    return out


def step_module(step: str):
    """The file that defines a step: `@step` on a function of that name, or `@step(name="...")`."""
    fn = step.replace("-", "_")
    for p in sorted(cli.PACKAGE.rglob("*.py")):
        text = p.read_text()
        if re.search(rf'^@step\(name="{step}"\)$', text, re.M) or re.search(rf"^@step\ndef {fn}\(", text, re.M):
            return p
    raise LookupError(step)


def oracle_closure(step: str) -> set:
    """__main__, cli, the package __init__ and the step's module, and everything they import, transitively."""
    todo = [cli.PACKAGE / "__main__.py", cli.PACKAGE / "cli.py", cli.PACKAGE / "__init__.py", step_module(step)]
    seen = set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += imports_of(f)
    return seen


def rule_steps() -> dict[str, str]:
    """Rule -> the step its shell runs, read from the rule files (independently of rules/common.smk)."""
    out = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=(?:rule|checkpoint) \w+:)", smk.read_text()):
            name = re.match(r"(?:rule|checkpoint) (\w+):", block)
            step = re.search(r"^\s+step\(\"([\w-]+)\"", block, re.M)
            if name and step:
                out[name[1]] = step[1]
    return out


def planned(output: str) -> dict[str, set[str]]:
    """Rule -> the kinds of reason given for its jobs in a dry run's output."""
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    reason: (.*)$", output, re.M):
        kinds = {r.split(":")[0].strip() for r in re.split(r";\s*(?=[A-Z])", m[2])}
        out.setdefault(m[1], set()).update(kinds)
    return out


@pytest.fixture(scope="module")
def project(full_run, tmp_path_factory):
    work, jobs = full_run
    root = copy_project(tmp_path_factory.mktemp("project") / "p")
    dry = snakemake(work, "-n", root=root)
    assert "Nothing to be done" in dry.stdout + dry.stderr, "the copy must plan nothing before any edit"
    ran = set(planned_rules_of(work))
    return work, root, ran


def planned_rules_of(work) -> set[str]:
    """The rules that have a finished job in the run: their log folders."""
    return {p.name for p in (work / "results" / "logs").iterdir() if p.is_dir()}


@pytest.mark.slow
def test_every_rule_of_the_workflow_ran_in_the_full_run(project):
    _, _, ran = project
    steps = rule_steps()
    # not in a run of full.yaml: results_doc writes docs/ (not part of `all`); model_identity needs a local or hub
    # model (tests/test_sources.py runs it); train_lm_chunk a model trained in chunks (tests/test_chunks.py);
    # train_index and add_shard an IVFPQ index (their functions run in tests/test_index_shards.py, the rules in
    # the ivfpq_run fixture's local run of tests/configs/ivfpq.yaml and in test_slurm.py's run of it through
    # Slurm), retrieve_chunk retrieval.chunks > 1 (its function in test_integrity.py), score_task_chunk
    # tasks.chunks > 1 (its function in test_tasks.py), the checkpoint plan_shards a datastore with shard_tokens
    # (tests/test_grow.py runs it); test_rule_commands.py parses every command of theirs.
    # Their steps' modules are all in the closures of rules that did run (merge_index, retrieve, score_task), so
    # every module is still checked below.
    missing = set(steps) - ran - {"results_doc", "model_identity", "train_lm_chunk", "train_index", "add_shard",
                                  "retrieve_chunk", "score_task_chunk", "plan_shards"}
    assert not missing, f"rules without a job in the full run: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_editing_a_module_reruns_exactly_the_rules_whose_step_imports_it(project, module):
    work, root, ran = project
    steps = rule_steps()
    expected = {r for r, s in steps.items() if r in ran and cli.PACKAGE / module in oracle_closure(s)}
    path = root / "workflow_scripts" / module
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n# an edit\n")
        # the dry run and the summary only read the run: side by side, one a core (each is one busy process)
        with ThreadPoolExecutor(2) as pool:
            dry, summ = (pool.submit(snakemake, work, a, root=root) for a in ("-n", "--summary"))
            out, summary = dry.result(), summ.result().stdout
    finally:
        path.write_bytes(original)
    # each output's own status, whatever is upstream of it: "params changed" where the rule's code hash moved
    code_changed = {
        f[2] for f in (line.split("\t") for line in summary.splitlines()[1:]) if len(f) > 4 and "params changed" in f[4]
    }
    # a verify_* rule's output is a temp() marker, removed once the job it checks has run: --summary has no output
    # of it to report, and the dry run plans it whenever it plans that job ("Missing output files")
    verify = {r for r in steps if r.startswith("verify_")}
    assert code_changed - verify == expected - verify, \
        f"{module}: code changed for {sorted(code_changed)}, expected {sorted(expected)}"
    text = out.stdout + out.stderr
    plan = planned(text) if "Nothing to be done" not in text else {}
    plan.pop("all", None)
    assert expected <= set(plan), f"{module}: not planned although its step imports it: {expected - set(plan)}"
    for rule in expected & verify:  # planned: its marker is gone ("Missing output files"), its params moved too
        assert plan[rule] <= {"Params have changed since last execution", "Missing output files",
                              "Input files updated by another job"}, f"{module}: {rule} planned for {plan[rule]}"
    downstream_only = {r: k for r, k in plan.items() if r not in expected}
    for rule, kinds in downstream_only.items():
        allowed = {"Input files updated by another job"} | ({"Missing output files"} if rule in verify else set())
        assert kinds and kinds <= allowed, f"{module}: {rule} planned for {kinds}"


@pytest.mark.parametrize("step", sorted(cli.find_steps()))
def test_the_oracle_agrees_with_cli(step):
    """The closure cli.py hashes equals the one found by the independent regex reading."""
    assert oracle_closure(step) == set(cli.code_closure(step))


@pytest.mark.slow
def test_the_copy_is_left_as_it_was(project):
    _, root, _ = project
    for module in MODULES:
        assert (root / "workflow_scripts" / module).read_bytes() == (cli.PACKAGE / module).read_bytes()
    shutil.rmtree(root / "workflow_scripts" / "__pycache__", ignore_errors=True)
