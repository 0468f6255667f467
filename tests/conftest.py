import functools
import inspect
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
# The configs the end-to-end tests run, one file each (its header says which tests use it and how to run it by hand).
CONFIGS = ROOT / "tests" / "configs"
# CI runs the same hypothesis examples every time, so a red run can be reproduced; locally they vary.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def project_env(root: Path = ROOT) -> dict:
    """The environment the rules run with: this interpreter first on PATH, the project on PYTHONPATH."""
    return dict(os.environ, PYTHONPATH=str(root), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")


def snakemake_cmd(workdir, *args, root: Path = ROOT) -> list[str]:
    return [sys.executable, "-m", "snakemake", "--snakefile", str(root / "Snakefile"), "--directory", str(workdir),
            "--cores", "2", *args]


def snakemake(workdir, *args, check=True, timeout=900, root: Path = ROOT):
    """Run the project's Snakefile in ``workdir`` with this interpreter's environment (``root``: a copy of the
    project to run instead, for tests that edit its code). It starts in ``root``: `python -m` puts its start
    directory first on sys.path, ahead of PYTHONPATH, so the Snakefile imports ``root``'s package. A run started
    by a background build (see _RUNS) is stopped with its Snakemake when the session ends first."""
    proc = subprocess.Popen(snakemake_cmd(workdir, *args, root=root), env=project_env(root), cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _LIVE.add(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException:
        _stop(proc)
        raise
    finally:
        _LIVE.discard(proc)
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


_LIVE: set[subprocess.Popen] = set()  # Snakemake processes running now (stopped at the session's end)


def _stop(proc: subprocess.Popen) -> None:
    """Interrupt a Snakemake run (it removes its incomplete outputs and cancels Slurm jobs); kill it after 60 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# what running the workflow needs: the Snakefile and what it includes, the package, the workflow profile
PROJECT_FILES = ("Snakefile", "rules", "workflow_scripts", "profiles", "report", "envs")


def copy_project(dest: Path) -> Path:
    """A copy of the project's workflow and code, to edit without touching the checkout."""
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def config_path(name: str) -> Path:
    """tests/configs/<name>.yaml."""
    return CONFIGS / f"{name}.yaml"


def load_test_config(name: str) -> dict:
    """tests/configs/<name>.yaml as a dict, as written (no schema defaults filled in)."""
    return yaml.safe_load(config_path(name).read_text())


def rerun_with(workdir, name: str):
    """Install tests/configs/<name>.yaml as ``workdir``'s config.yaml and run it there; (proc, rule -> job count)."""
    shutil.copy(config_path(name), workdir / "config.yaml")
    proc = snakemake(workdir, "--configfile", str(workdir / "config.yaml"))
    return proc, job_stats(proc.stderr if "Job stats:" in proc.stderr else proc.stdout)


def job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from the "Job stats" table Snakemake prints; {} when there is nothing to do."""
    if "Nothing to be done" in output:
        return {}
    table = output[output.index("Job stats:") :].split("\n\n")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)$", table, re.M) if m[1] != "total"}


# ------------------------------------------------------------------------------------------ the Slurm rerun
# test_slurm.py reruns a copy of the micro run with `--configfile tests/configs/ivfpq.yaml` through Slurm
# (`--profile slurm`). That run mostly waits: the Slurm executor checks its jobs' status 5, 20, 45, 80 s after a
# submission, and the 13 Slurm jobs run in 7 dependency levels. So micro_run starts it in the background as soon as
# the micro run exists, and the other end-to-end tests use the cores meanwhile; test_slurm.py collects it
# (slurm_rerun).
_SLURM_RERUN: dict = {}


def slurm_up() -> str | None:
    """None when a Slurm answers here; otherwise why not."""
    if not shutil.which("sbatch"):
        return "Slurm is not installed (run slurm/local-cluster.sh --install as root)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0 or not out.stdout.strip():
        return f"Slurm is not running (sinfo: {out.stderr.strip() or 'no nodes'}); start slurm/local-cluster.sh"
    return None


def _start_slurm_rerun(micro_run: Path, work: Path) -> tuple[Path, subprocess.Popen, Path]:
    """Run as a user runs it: config.yaml as shipped in the working directory (its sections differ from the test
    config's: merged into it, config.yaml's analyses fail its k_max) and the test config given with
    `--configfile`, which each Slurm job must see alone. Successful jobs' Slurm logs are kept for test_slurm.py."""
    shutil.copytree(micro_run, work, symlinks=True)
    shutil.copy(ROOT / "config.yaml", work / "config.yaml")
    log = work.parent / "snakemake.out"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(snakemake_cmd(work, "--configfile", str(config_path("ivfpq")), "--profile",
                                              str(ROOT / "slurm"), "--slurm-keep-successful-logs"),
                                env=project_env(), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return work, proc, log


def _stop_slurm_rerun() -> None:
    """At the session's end: a Slurm rerun nobody collected is interrupted (Snakemake cancels its Slurm jobs)."""
    run = _SLURM_RERUN.pop("run", None)
    if run:
        _stop(run[1])


def slurm_rerun(micro_run: Path, tmp_path: Path, timeout: float = 1500) -> tuple[Path, int, str]:
    """The Slurm rerun: the one micro_run started, else one started now; waits for it. (work dir, exit code,
    Snakemake's output)."""
    work, proc, log = _SLURM_RERUN.pop("run", None) or _start_slurm_rerun(micro_run, tmp_path / "slurm")
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _SLURM_RERUN["run"] = (work, proc, log)
        _stop_slurm_rerun()
        raise AssertionError(f"the Slurm rerun took over {timeout} s:\n{log.read_text()[-4000:]}") from None
    return work, proc.returncode, log.read_text()


# ------------------------------------------------------------------------------------------ the end-to-end runs
# The session's end-to-end runs form a tree: micro -> ivfpq, paper, analyses -> full. Built one after the other
# when a test first asks for each, the suite kept one core busy most of the time (most end-to-end jobs are
# single-threaded). So the session builds each run in a background thread as soon as the run it is built from
# exists (micro at the session's start, beside the unit tests), two at a time, and a fixture waits for its run;
# the tests are ordered so that those reading the earliest runs come first (pytest_collection_modifyitems).
# Each run is built from a copy of its parent, rerun with tests/configs/<name>.yaml: only the stages that file adds
# run. Read a run, never write to it; a test that changes one works on its own copy.
_PARENT = {"micro": None, "ivfpq": "micro", "paper": "micro", "analyses": "micro", "full": "analyses"}
_CONFIG = {"paper": "paper_tasks"}  # tests/configs/<name>.yaml, where it is not the run's name
_RUNS: dict[str, Future] = {}
_BUILDING = threading.Semaphore(2)  # runs built at once


def _build(name: str, factory, session) -> tuple[Path, dict]:
    """Build run ``name`` (after its parent): (work dir, rule -> job count of its own rerun)."""
    parent = _RUNS[_PARENT[name]].result()[0] if _PARENT[name] else None
    with _BUILDING:
        work = factory.mktemp(name) / "run"
        if parent is None:
            work.mkdir()
        else:
            shutil.copytree(parent, work, symlinks=True)
        if name == "paper":  # paper_data/ from the micro corpus's test documents
            import polars as pl

            docs = pl.read_parquet(work / "results" / "corpus" / "micro" / "test.parquet")["text"].to_list()
            sents = [s.strip() + " ." for d in docs for s in d.split(" . ") if len(s.split()) > 4]
            write_paper_data(work / "paper_data", sents[:36])
        _, jobs = rerun_with(work, _CONFIG.get(name, name))
    if name == "micro" and any(Path(str(i.path)).name == "test_slurm.py" for i in session.items) \
            and slurm_up() is None:
        _SLURM_RERUN["run"] = _start_slurm_rerun(work, factory.mktemp("slurm") / "run")
    return work, jobs


def _run(name: str, request) -> tuple[Path, dict]:
    """Run ``name``, waiting for its build (started here and now if the session did not foresee it)."""
    if name not in _RUNS:
        if _PARENT[name]:
            _run(_PARENT[name], request)
        _RUNS[name] = _POOL.submit(_build, name, request.getfixturevalue("tmp_path_factory"), request.session)
    return _RUNS[name].result()


# ------------------------------------------------------------------------------------------ background tests
# A few tests each copy a finished run and rerun Snakemake on it for a minute or two (a grown corpus, a new
# datastore, killed runs). Run in turn on the main thread they made the suite wait; marked @background(run), such a
# test's body runs in a background thread as soon as its run is built (one such body at a time, beside the two run
# builds), and the test itself, ordered last, waits for it and reports its outcome: its assertions, unchanged.
_BACKGROUND: dict[str, tuple[str, object]] = {}  # test function name -> (run, body)
_TESTS: dict[str, Future] = {}
_TESTING = threading.Semaphore(1)


def background(run: str):
    """Mark a test that takes ``<run>_run`` and ``tmp_path`` to run in the background (see above)."""

    def mark(body):
        _BACKGROUND[body.__name__] = (run, body)

        @functools.wraps(body)
        def test(request, **_):  # the session's _background_runs started the body of every collected one
            return _TESTS[body.__name__].result()

        test.__signature__ = inspect.Signature([inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                                                inspect.Parameter(f"{run}_run", inspect.Parameter.KEYWORD_ONLY)])
        return pytest.mark.background(pytest.mark.slow(test))

    return mark


def _test(name: str, factory) -> None:
    run, body = _BACKGROUND[name]
    work = _RUNS[run].result()[0]
    with _TESTING:
        body(work, factory.mktemp(name[:40]))


_POOL = ThreadPoolExecutor(max_workers=len(_PARENT) + 4, thread_name_prefix="run")


@pytest.fixture(scope="session", autouse=True)
def _background_runs(request, tmp_path_factory):
    """Start building every run the session's tests read (their fixtures' closure), parents first; at the end,
    stop what is still running (an interrupted or failed session) and the Slurm rerun nobody collected."""
    needed = {n for n in _PARENT if any(f"{n}_run" in i.fixturenames for i in request.session.items)}
    for name in list(needed):
        while name := _PARENT[name]:
            needed.add(name)
    for name in filter(needed.__contains__, _PARENT):  # parents come before their children in _PARENT
        _RUNS[name] = _POOL.submit(_build, name, tmp_path_factory, request.session)
    for item in request.session.items:  # a background test's signature names its run: built above
        if item.get_closest_marker("background"):
            _TESTS[item.originalname] = _POOL.submit(_test, item.originalname, tmp_path_factory)
    yield
    for proc in list(_LIVE):
        _stop(proc)
    _POOL.shutdown(wait=True, cancel_futures=True)
    _stop_slurm_rerun()


@pytest.fixture(scope="session")
def micro_run(request):
    """One finished run of tests/configs/micro.yaml, shared by the end-to-end tests. When the session runs
    tests/test_slurm.py and Slurm answers, the Slurm rerun that test checks starts from it, in the background (see
    slurm_rerun)."""
    return _run("micro", request)[0]


@pytest.fixture(scope="session")
def ivfpq_run(request):
    """The micro run rerun with tests/configs/ivfpq.yaml: 3 shards and an IVFPQ index, so the datastore
    (extract_keys a shard), the sharded index build (train_index, add_shard a shard, merge_index) and retrieval
    onward run again. test_pipeline.py checks it; test_slurm.py compares the same rerun through Slurm with it.
    (work dir, rule -> job count)."""
    return _run("ivfpq", request)


@pytest.fixture(scope="session")
def paper_run(request):
    """The micro run with paper_data/ written into it from the micro corpus's test documents, rerun with
    tests/configs/paper_tasks.yaml: paper 1's memory tasks on a start-token twin of the micro model (and cr on
    the micro model). (work dir, rule -> job count)."""
    return _run("paper", request)


@pytest.fixture(scope="session")
def analyses_run(request):
    """The micro run rerun with tests/configs/analyses.yaml: the paper-2 analyses at toy size."""
    return _run("analyses", request)


@pytest.fixture(scope="session")
def full_run(request):
    """The analyses run rerun with tests/configs/full.yaml: the task stages (tests/configs/tasks.yaml's section)
    and the scaling study added, so every rule of the workflow has a finished job. (work dir, rule -> job count
    of that rerun)."""
    return _run("full", request)


@pytest.fixture(scope="session")
def task_run(full_run):
    """The task stages of tests/configs/tasks.yaml (the synthetic suite on the micro datastore) run on top of a
    finished backbone: full_run, whose rerun ran them (with the scaling study) on a copy of the analyses run. The
    suite runs them once, not a second time on another copy of the micro run. Read it, never write to it."""
    return full_run


_RANK = {"micro_run": 1, "ivfpq_run": 2, "paper_run": 2, "analyses_run": 3, "full_run": 4, "slurm_rerun": 5}


def pytest_collection_modifyitems(config, items):
    """Keep `pytest -m "not slow"` a fast lane: a test that needs the micro run (directly or through a fixture
    built on it) must be marked slow, or the first such test would start the whole end-to-end run. Then order the
    modules by the latest run any of their tests reads (none, micro, ivfpq or paper, analyses, full; test_slurm.py
    last), keeping each module whole (its module fixtures are set up once) and pytest's order otherwise, so the
    tests reading a run come when it is likely built."""
    unmarked = [i.nodeid for i in items if "micro_run" in i.fixturenames and i.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests that use micro_run must be marked @pytest.mark.slow: " + ", ".join(unmarked))
    rank: dict[str, int] = {}
    for i in items:
        uses = [r for f, r in _RANK.items() if f in i.fixturenames or (f == "slurm_rerun" and "test_slurm" in i.nodeid)]
        rank[str(i.path)] = max([rank.get(str(i.path), 0), *uses])
    # background tests wait for their bodies: last but the Slurm rerun's, their modules' other tests in place
    items.sort(key=lambda i: 4.5 if i.get_closest_marker("background") else rank[str(i.path)])


# ------------------------------------------------------------------------------------------ paper 1's data layout
# Label files in the layout of paper 1's data/ folder (kNN-Prompt's): one class a line, words joined by ", ",
# classes of different lengths (the paper trims them to the shortest). Words are the micro corpus's.
PAPER_LABELS = {
    "label_names_sentidict.txt": ["painter, poet, sculptor, novelist, composer", "chemist, physicist, engineer"],
    "sst2/label.txt": ["born, died, lived", "works, founded, based, city"],
    "rotten_tomatoes/label.txt": ["company, university", "city, river, town"],
    "agn/label_names_kb.txt": ["painter, poet", "chemist, surgeon, architect", "born, works", "city, company"],
}


def write_paper_data(root: Path, texts: list[str]) -> Path:
    """A folder in the layout of paper 1's data/ (GSYfate/knnlm-limits): each memory task's file in that task's
    own columns and label codings, rows made from ``texts`` (at least 12), labels in a fixed rotation."""
    root.mkdir(parents=True, exist_ok=True)
    for name, lines in PAPER_LABELS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("\n".join(lines) + "\n")

    def rows(task, make):
        (root / task).parent.mkdir(parents=True, exist_ok=True)
        with open(root / task, "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps(make(i, t)) + "\n")

    rows("sst2/test.jsonl", lambda i, t: {"label": str(1 + i % 5), "text": t})  # SST-5 labels; 3 is dropped
    rows("rotten_tomatoes/test.jsonl", lambda i, t: {"task": "rotten_tomatoes", "input": t,
                                                     "output": ["negative", "positive"][i % 2],
                                                     "options": ["negative", "positive"]})
    rows("mr/test.jsonl", lambda i, t: {"label": str(i % 2), "text": t})
    rows("cr/test.jsonl", lambda i, t: {"label": str((i // 2) % 2), "text": t})
    rows("hyp/test.jsonl", lambda i, t: {"": str(i), "text": f"  {t} \n", "id": 1000 + i, "label": str(i % 2)})
    rows("agn/test.jsonl", lambda i, t: {"Class Index": str(1 + i % 4), "Title": t.split(" ")[0],
                                         "Description": t})
    rows("rte/val.jsonl", lambda i, t: {"premise": t, "hypothesis": t.split(" (")[0] + " works .",
                                        "label": ["entailment", "not_entailment"][i % 2], "idx": i})
    rows("cb/dev.jsonl", lambda i, t: {"premise": t, "hypothesis": t.split(" ")[0] + " is a painter",
                                       "label": ["entailment", "contradiction", "neutral"][i % 3], "idx": i})
    (root / "yahoo").mkdir(exist_ok=True)
    (root / "yahoo" / "label.json").write_text(json.dumps({
        "Society & Culture": ["society", "culture"], "Science & Mathematics": ["science", "mathematics"],
        "Health": ["health", "medicine"], "Education & Reference": ["education", "reference"],
        "Computers & Internet": ["computers", "internet"], "Sports": ["sports", "athletics"],
        "Business & Finance": ["business", "finance"], "Entertainment & Music": ["entertainment", "music"],
        "Family & Relationships": ["family", "relationships"], "Politics & Government": ["politics", "government"],
    }))
    return root


# ------------------------------------------------------------------------------------------ small caches by hand
def p_knn_by_hand(d_row, v_row, w, k, sigma):
    """p_knn(w) over the first k neighbours, written out: Σ 1[v_i = w] e^(−d_i/σ) / Σ e^(−d_i/σ) (value −1:
    a missing neighbour, no weight)."""
    ws = [math.exp(-float(d_row[i]) / sigma) for i in range(k) if v_row[i] >= 0]
    hit = [math.exp(-float(d_row[i]) / sigma) for i in range(k) if v_row[i] == w]
    return sum(hit) / sum(ws)


def cache_arrays(rng, n, K, vocab, dim=4):
    """The arrays of a retrieval cache (retrieval_cache.CACHE_FILES) with random contents, distances ascending."""
    return {
        "targets": rng.integers(0, vocab, n).astype(np.int32),
        "lm_logprob": np.log(rng.uniform(0.01, 0.9, n)).astype(np.float32),
        "dists": np.sort(rng.uniform(0, 4, (n, K)), 1).astype(np.float32),
        "vals": rng.integers(0, vocab, (n, K)).astype(np.int32),
        "ids": rng.integers(0, 1000, (n, K)).astype(np.int64),
        "queries": rng.normal(size=(n, dim)).astype(np.float16),
    }


def write_cache(d: Path, arrays: dict, manifest=None, tokens=None) -> None:
    """``arrays`` as a retrieval cache in ``d`` (its meta.json names ``manifest``'s hash and the sha256 of the eval
    set's ``tokens`` when given)."""
    from workflow_scripts.artifacts import save_npy, sha256_file, write_json
    from workflow_scripts.datastore import manifest_hash

    d.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        save_npy(d / f"{name}.npy", a)
    digests = {f"{name}.npy": sha256_file(d / f"{name}.npy") for name in arrays}  # as retrieve records them
    write_json(d / "meta.json", {"n_tokens": len(arrays["targets"]), "K": arrays["dists"].shape[1],
                                 "manifest_sha256": manifest_hash(manifest) if manifest else "none",
                                 "sha256": digests, **({"tokens_sha256": sha256_file(tokens)} if tokens else {})})


class SpacedTok:
    """A stand-in tokenizer for decoding: token i decodes to " w<i>"; no end-of-sequence id, so
    ``lm.word_count`` counts one word a token plus one line."""

    eos_token_id = None

    def decode(self, ids):
        return "".join(f" w{int(i)}" for i in ids)
