"""The rules and the steps agree: a dry run of a DAG with every rule prints each job's shell command, and each
command parses with its step's own parser (workflow_scripts/cli.py), so every flag a rule passes is an argument
of the step and no required argument is missing. Nothing runs; a few seconds."""

import contextlib
import copy
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, job_stats, load_test_config, project_env, snakemake, write_paper_data

from workflow_scripts import cli
from workflow_scripts.tasks import registry

STEP_RULE = re.compile(r"^(?:rule|checkpoint) (\w+):\n(?:(?:    .*)?\n)*?    shell:\n\s+step\(", re.M)


def _rules_running_steps() -> set[str]:
    """The rules whose shell runs a step (`shell: step("<step>")`, rules/common/steps.smk), read from rules/*.smk."""
    return {m[1] for f in sorted((ROOT / "rules").glob("*.smk")) for m in STEP_RULE.finditer(f.read_text())}


def _everything_config(tmp_path) -> dict:
    """tests/configs/analyses.yaml plus the synthetic task suite, a local generate task (scored with the
    perplexity summary), a hub model (model_identity, tokenize with its model.json) with a datastore and a hub
    task on it, the micro model trained in chunks, an IVFPQ index (train_index, add_shard, merge_index),
    retrieval and task scoring in 2 chunks, a datastore subsampled from micro's rows, one cut by shard_tokens (the
    checkpoint plan_shards), the scaling study and in-context retrieval: every rule of the workflow gets a job."""
    cfg = load_test_config("analyses")
    local = tmp_path / "mine.jsonl"
    local.write_text((ROOT / "tests/fixtures/tasks/gsm8k.jsonl").read_text())
    mine = copy.deepcopy(registry.registry()["gsm8k"])
    mine["source"] = {"type": "local", "path": str(local)}
    cfg["tasks"] = {
        "evaluate": {"micro": [*registry.synthetic_tasks(), "mine"], "hub": ["sst2"]},
        "synthetic": {"corpus": "micro", "n_items": 40},
        "custom": {"mine": mine},
        "paper_data": str(write_paper_data(tmp_path / "paper_data", ["one two three four five ."] * 12)),
    }
    cfg["models"]["hubby"] = {"source": "hub", "path": "gpt2"}
    cfg["datastores"]["hub"] = {"model": "hubby", "corpus": "micro", "split": "train", "shards": 1}
    cfg["models"]["micro-gpt2"]["train"]["chunk_steps"] = 10
    cfg["index"] = {"type": "IVFPQ", "nlist": 4, "m": 4, "nbits": 4, "train_sample": 500}  # train_index, add_shard
    cfg["retrieval"] = {"chunks": 2}  # retrieve_chunk, and retrieve joining the chunks
    cfg["tasks"]["chunks"] = 2  # score_task_chunk, and score_task joining the chunks
    cfg["datastores"]["micro_half"] = {"subsample": {"of": "micro", "fraction": 0.5}}
    cfg["datastores"]["grown"] = {"model": "micro-gpt2", "corpus": "micro", "shard_tokens": 64}  # plan_shards
    cfg["scaling"] = {"datastores": ["micro"]}
    cfg["incontext"] = {"datastores": ["micro"], "passage_tokens": 8, "query_tokens": 8}  # passages, incontext_*
    return cfg


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rule_commands")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_everything_config(tmp_path)))
    proc = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml"), "--", "all",
                     "results_doc")
    return proc.stdout


def _commands(output: str) -> list[list[str]]:
    """Each printed `python -m workflow_scripts <step> ...` command as argv, without its `2> log`."""
    out = []
    for line in output.splitlines():
        i = line.find("python -m workflow_scripts ")
        if i >= 0:
            argv = shlex.split(line[i:])
            out.append(argv[: argv.index("2>")] if "2>" in argv else argv)
    return out


def test_the_dry_run_has_a_job_of_every_rule_that_runs_a_step(dry_run):
    rules = _rules_running_steps()
    assert {"corpus", "train_lm", "train_lm_chunk", "model_identity", "sweep", "score_task", "macondo_eval",
            "hurdle", "figure_projection", "figure_mlp", "paper2_comparison"} <= rules
    assert rules - set(job_stats(dry_run)) == set()


def test_every_rule_command_parses_with_its_step(dry_run):
    steps = cli.find_steps()
    commands = _commands(dry_run)
    assert len(commands) == sum(n for r, n in job_stats(dry_run).items() if r in _rules_running_steps())
    problems, seen = [], set()
    for argv in commands:
        assert argv[:3] == ["python", "-m", "workflow_scripts"], argv
        name = argv[3]
        if name not in steps:
            problems.append(f"{name}: no such step")
            continue
        mod, func, _ = steps[name]
        fn = getattr(importlib.import_module(f"workflow_scripts.{mod}" if mod else "workflow_scripts"), func)
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                args = vars(cli.parser_for(fn).parse_args(argv[4:]))
        except SystemExit:
            problems.append(f"{name}: {err.getvalue().strip().splitlines()[-1]}\n    {shlex.join(argv)}")
            continue
        if "params" in args:
            assert isinstance(json.loads(args["params"]), dict), argv
        seen.add(name)
    assert problems == []
    assert {"train-lm", "tokenize", "load-task", "score-task", "task-suite", "results-doc"} <= seen


def _params_by_step(tmp_path, cfg: dict) -> dict[str, list[dict]]:
    """Dry-run ``cfg`` and return each step's --params, one dict per job."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(tmp_path / "config.yaml")).stdout
    by_step: dict[str, list[dict]] = {}
    for argv in _commands(out):
        if "--params" in argv:
            by_step.setdefault(argv[3], []).append(json.loads(argv[argv.index("--params") + 1]))
    return by_step


@pytest.mark.slow  # several Snakemake DAG builds: over 5 s
def test_points_selection_sets_and_pq_distances_reach_the_rules_params(tmp_path):
    """What Snakemake's params rerun trigger compares: index.distances is a param of retrieval and task scoring
    (so changing it reruns them) but not of the index; a pinned point is a param of the task sweep (and of
    the decoding of generate tasks); each datastore's selection set is a param of the summary."""
    base = load_test_config("tasks")
    base["index"] = {"type": "IVFPQ", "nlist": 4, "m": 4, "nbits": 4, "train_sample": 500}
    local = tmp_path / "mine.jsonl"  # a generate task: decoded at the pinned point
    local.write_text((ROOT / "tests/fixtures/tasks/gsm8k.jsonl").read_text())
    mine = {**registry.registry()["gsm8k"], "source": {"type": "local", "path": str(local)}}
    base["tasks"]["custom"] = {"mine": mine}
    base["tasks"]["evaluate"]["micro"].append("mine")
    exact = _params_by_step(tmp_path / "exact", base)
    cfg = copy.deepcopy(base)
    cfg["index"]["distances"] = "pq"
    cfg["eval_sets"]["valid2"] = {"corpus": "micro", "split": "valid", "max_tokens": 100}
    cfg["datastores"]["micro"]["select_on"] = "valid2"
    cfg["tasks"]["points"] = {"micro": {"lambda": 0.3, "k": 32, "sigma": 7}}  # σ off the grid
    pq = _params_by_step(tmp_path / "pq", cfg)
    for name in ("extract-keys", "retrieve", "score-task"):  # the model's device and dtype: the same everywhere
        assert {(p["device"], p["dtype"]) for p in exact[name]} == {("cpu", "float16")}, name
    assert {p["gpu_shard_above_gb"] for p in exact["retrieve"] + exact["score-task"]} == {4}
    index_keys = {*exact["merge-index"][0]["index"], *exact["train-index"][0]["index"]}
    assert not {"gpu_shard_above_gb", "retrain"} & index_keys
    assert {p["distances"] for p in exact["retrieve"]} == {"exact"}
    assert {p["distances"] for p in pq["retrieve"]} == {"pq"} and len(pq["retrieve"]) == 3
    assert {p["distances"] for p in pq["score-task"]} == {"pq"} and len(pq["score-task"]) == 5
    assert pq["merge-index"] == exact["merge-index"] and "distances" not in pq["merge-index"][0]["index"]
    assert pq["train-index"] == exact["train-index"] and "nprobe" not in pq["train-index"][0]["index"]
    assert [p["point"] for p in pq["task-sweep"]] == [[0.3, 32, 7]] * 5
    assert [p.get("point") for p in pq["score-task"] if p["task"] == "mine"] == [[0.3, 32, 7]]
    assert all("point" not in p for p in exact["task-sweep"])
    assert pq["summarize"][0]["select_on"] == {"micro": "valid2"}
    assert exact["summarize"][0]["select_on"] == {"micro": "valid"}


# a name a shell would run (`$(...)`), split (a space) or choke on (a quote): in every path a user can choose
HOSTILE = "q$(touch PWNED) it's"


@pytest.mark.slow  # several Snakemake DAG builds: over 5 s
def test_hostile_paths_reach_the_steps_verbatim_and_run_nothing(tmp_path_factory):
    """Issue 30 item 7. Every path a user chooses (the working directory, the config file, a local corpus's files,
    a local model, a custom task's file, tasks.paper_data, Macondo's name files) named with `$(touch PWNED)`, a
    space and a quote: the dry run's commands, split as a shell splits them, give each step exactly those paths
    (argparse parses them), and real jobs reading such files (corpus, load_task) run. Nothing creates PWNED."""
    work = tmp_path_factory.mktemp("hostile") / HOSTILE
    work.mkdir()
    cfg = _everything_config(work)  # its custom task file and paper_data folder lie under `work`
    text = work / f"train {HOSTILE}.txt"
    text.write_text("".join(f"line {i} of a local corpus with some words in it .\n" for i in range(60)))
    cfg["corpora"]["mine"] = {"source": "local", "local": {"format": "text", "files": {
        "train": str(text), "valid": str(text), "test": str(text)}}}
    cfg["models"]["loc"] = {"source": "local", "path": str(work / f"model {HOSTILE}")}
    cfg["datastores"]["loc"] = {"model": "loc", "corpus": "mine", "split": "train", "shards": 1}
    names = work / f"names {HOSTILE}.txt"
    names.write_text("\n".join(f"Name{i}" for i in range(40)) + "\n")
    cfg["analyses"]["macondo"]["generate"]["given_names"] = str(names)
    configfile = work / f"my config {HOSTILE}.yaml"
    configfile.write_text(yaml.safe_dump(cfg))
    out = snakemake(work, "-n", "-p", "--configfile", str(configfile), "--", "all", "results_doc").stdout
    commands = _commands(out)
    assert commands
    steps, parsed = cli.find_steps(), []
    for argv in commands:
        mod, func, _ = steps[argv[3]]
        fn = getattr(importlib.import_module(f"workflow_scripts.{mod}" if mod else "workflow_scripts"), func)
        parsed.append((argv[3], vars(cli.parser_for(fn).parse_args(argv[4:]))))
    def leaves(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in leaves(v)]
        if isinstance(x, list | tuple):
            return [s for v in x for s in leaves(v)]
        return [str(x)]

    seen = {s for _, args in parsed for s in leaves({k: v for k, v in args.items() if k != "params"})}
    seen |= {s for _, args in parsed if "params" in args for s in leaves(json.loads(args["params"]))}
    hostile = {s for s in seen if "PWNED" in s}
    want = {str(text), str(names), str(work / f"model {HOSTILE}"), str(work / "mine.jsonl"),
            os.path.relpath(configfile, work)}
    assert want <= hostile, want - hostile
    assert any(s.startswith(str(work / "paper_data") + "/") for s in hostile)  # paper 1's task files
    assert all(s in want or s.startswith(str(work / "paper_data") + "/") for s in hostile), hostile - want
    # real jobs that read the hostile files: the local corpus, the custom task's items
    snakemake(work, "--configfile", str(configfile), "--", "results/corpus/mine/train.parquet",
              "results/task_data/mine.parquet")
    assert (work / "results/corpus/mine/train.parquet").is_file()
    assert (work / "results/task_data/mine.parquet").is_file()
    assert not list(tmp_path_factory.getbasetemp().rglob("PWNED")) and not (ROOT / "PWNED").exists()


def _threads_by_step(output: str) -> dict[str, set[str]]:
    return {argv[3]: {a for c in _commands(output) if c[3] == argv[3] for a in [c[c.index("--threads") + 1]]}
            for argv in _commands(output) if "--threads" in argv}


ONE_THREAD_STEPS = {"extract-keys", "merge-index", "hurdle", "projection", "macondo-finetune", "macondo-memory",
                    "macondo-eval", "incontext-perplexity", "incontext-task", "retrieve", "retrieve-chunk",
                    "score-task", "score-task-chunk", "scaling-sweep", "scaling-tasks"}


@pytest.mark.slow  # several Snakemake DAG builds: over 5 s
def test_arithmetic_threads_come_from_the_config_not_from_cores(dry_run, tmp_path):
    """Issue 30 item 12: Snakemake lowers a rule's `threads:` to --cores, and training's numbers differed by ~1e-7
    between --cores 1 and 2. Every step's --threads is the config's arithmetic_threads (rules asking for one
    thread: 1), whatever --cores is: 2 (the default) at --cores 2, 3 at --cores 1."""
    at_two = _threads_by_step(dry_run)  # --cores 2, arithmetic_threads by default
    assert {"train-lm", "train-index", "retrieve", "score-task", "projection", "train-mlp", "mlp-eval",
            "scaling-sweep", "scaling-tasks"} <= set(at_two)
    assert at_two == {s: {"1"} if s in ONE_THREAD_STEPS else {"2"} for s in at_two}
    cfg = _everything_config(tmp_path) | {"arithmetic_threads": 3,
                                         "rule_threads": {"train_lm": 5, "train_lm_chunk": 5, "scaling_sweep": 4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "-n", "-p", "--cores", "1", "--configfile", str(tmp_path / "config.yaml"),
                     "--set-threads", "retrieve=4", "score_task=4", "train_lm=5", "train_lm_chunk=5", "--", "all",
                     "results_doc")
    got = _threads_by_step(proc.stdout)
    raised = {"retrieve", "score-task"}  # searches ask for one thread (SEARCH_THREADS) unless --set-threads raises it
    per_rule = {"train-lm": {"5"}, "scaling-sweep": {"4"}}  # rule_threads (train_lm and train_lm_chunk run train-lm)
    assert got == {s: per_rule.get(s, {"1"} if s in ONE_THREAD_STEPS - raised else {"3"}) for s in got}, (
        "a rule asking for more than one thread passes `--threads {params.threads}`, the param "
        "threads=ARITHMETIC_THREADS (wire_steps, rules/common/steps.smk), not `{threads}`, which --cores lowers")
    assert set(got) == set(at_two)
    # a rule computing on more threads than it asks the scheduler for is named, with the flag that gives them
    said = proc.stdout + proc.stderr
    assert "scaling_sweep computes on 4 threads" in said and "--set-threads scaling_sweep=4" in said
    assert "train_lm computes" not in said  # given its 5 by --set-threads
    cfg["rule_threads"] = {"retrieve": 2, "retrieval": 2}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    bad = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "config.yaml"), check=False)
    assert bad.returncode != 0 and "config key rule_threads: 'retrieval' is not one of" in bad.stdout + bad.stderr


_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings()) as api:
    wf = api.workflow(resource_settings=ResourceSettings(cores=2), snakefile=Path("Snakefile").resolve(),
                      config_settings=ConfigSettings(configfiles=[Path(sys.argv[1])]), workdir=Path(sys.argv[2]))
    print(json.dumps({r.name: {"conda": r.conda_env, "resources": sorted(r.resources.keys()),
                               "params": list(r.params.keys()), "shell": r.shellcmd} for r in wf._workflow.rules}))
"""


def _workflow_rules(tmp_path, cfg: dict) -> dict[str, dict]:
    """Each rule as the Snakefile builds it for ``cfg`` (parsed with Snakemake's API, no DAG): its conda env, the
    names of its resources and params, its shell command."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-c", _RULES, str(tmp_path / "config.yaml"), str(tmp_path)], cwd=ROOT,
                         env=project_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rule_threads_names_exactly_the_rules_whose_step_takes_threads(tmp_path):
    """The schema's list of the names rule_threads accepts is the rules that pass --threads to their step (each
    has the param threads), so that no such rule is refused and no other name is taken."""
    schema = yaml.safe_load((ROOT / "workflow_scripts/config.schema.yaml").read_text())
    names = set(schema["properties"]["rule_threads"]["propertyNames"]["enum"])
    rules = _workflow_rules(tmp_path, _everything_config(tmp_path))
    assert names == {r for r, v in rules.items() if "threads" in v["params"] and "--threads" in v["shell"]}


def test_every_rule_runs_its_step_in_the_env_the_step_needs(tmp_path):
    """wire_steps (rules/common/steps.smk) chooses each rule's conda env; no rule names one by hand (retrieve_chunk once
    asked for a GPU in the CPU env). With extraction.device cuda, the rules that may ask for a GPU (a `gpu`
    resource: extract_keys, retrieve_chunk, retrieve, score_task_chunk, score_task and the two in-context
    scorings) run in pipeline-gpu.yaml, the steps that draw or only read tables in plotting.yaml, every other one in
    pipeline.yaml; every rule running a step gets its code hash and its files (params code and args)."""
    cfg = _everything_config(tmp_path)
    cfg["extraction"] = {**cfg.get("extraction", {}), "device": "cuda"}
    rules = {n: r for n, r in _workflow_rules(tmp_path, cfg).items() if r["shell"]}
    gpu = {n for n, r in rules.items() if "gpu" in r["resources"]}
    assert gpu == {"extract_keys", "retrieve_chunk", "retrieve", "score_task_chunk", "score_task",
                   "incontext_perplexity", "incontext_task"}
    plotting = {n for n, r in rules.items() if r["conda"] == "../envs/plotting.yaml"}
    assert plotting == {n for n in rules if n.startswith("figure_")} | {"paper2_comparison", "results_doc",
                                                                       "stage_times"}
    assert {n: r["conda"] for n, r in rules.items() if n not in plotting} == {
        n: "../envs/pipeline-gpu.yaml" if n in gpu else "../envs/pipeline.yaml" for n in rules if n not in plotting}
    assert all({"code", "args"} <= set(r["params"]) for r in rules.values())
    assert set(rules) == _rules_running_steps()
    named = [f"{smk.name}: {m[0]}" for smk in sorted((ROOT / "rules").glob("*.smk"))
             for m in re.finditer(r"^    conda:", smk.read_text(), re.M)]
    assert named == [], "a rule names its conda env by hand"


def _resources_by_rule(output: str) -> dict[str, set[str]]:
    return {m[1]: set(m[2].split(", ")) for m in re.finditer(r"^rule (\w+):\n(?:    .*\n)*?    resources: (.*)$",
                                                               output, re.M)}


@pytest.mark.slow  # a Snakemake DAG build: over 5 s
def test_fixed_resources_come_from_the_profile_and_a_set_resources_changes_only_what_it_names(tmp_path):
    """The rules' fixed mem_mb and runtime live in profiles/default/config.yaml (set-resources), none in a rule
    file; a --set-resources on the command line replaces the profile's whole list in Snakemake, and
    profile_resources (rules/common/steps.smk) sets the rest again: the named rule gets the new value beside its other
    profile resource, every other rule keeps its own."""
    fixed = [f"{smk.name}: {m[0].strip()}" for smk in sorted((ROOT / "rules").glob("*.smk"))
             for m in re.finditer(r"^\s+(?:mem_mb|runtime)=[\d *]+,", smk.read_text(), re.M)]
    assert fixed == [], "a fixed resource in a rule file (it belongs in profiles/default/config.yaml)"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(load_test_config("micro")))
    out = snakemake(tmp_path, "-n", "--configfile", str(tmp_path / "config.yaml"), "--set-resources",
                    "corpus:runtime=7").stdout
    got = _resources_by_rule(out)
    assert {"runtime=7", "mem_mb=4000"} <= got["corpus"]
    assert {"runtime=120", "mem_mb=2000"} <= got["tokenize"]
    assert {"runtime=720", "mem_mb=8000"} <= got["extract_keys"]
