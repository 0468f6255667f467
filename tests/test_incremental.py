"""Incremental reruns on a finished micro run: each change reruns exactly what depends on it."""

import copy
import shutil

import pytest
import yaml
from conftest import ROOT, background, copy_project, job_stats, snakemake

from workflow_scripts.artifacts import sha256_file

pytestmark = pytest.mark.slow
UPSTREAM = {"corpus", "train_tokenizer", "tokenize", "train_lm"}
# each verify_* job checks its consumer's input right before it (its marker is temp): it runs whenever that does
DATASTORE = {"extract_keys", "datastore_manifest", "verify_datastore", "merge_index", "retrieve"}
# eval_neighbours reads the caches and summarize's table (its chosen point): it follows every sweep
AGGREGATE = {"verify_retrieval", "sweep", "verify_sweeps", "summarize", "perplexity_summary", "figure_sweep",
             "eval_neighbours", "stage_times", "all"}


def planned(workdir, cfg: dict, root=ROOT) -> dict[str, int]:
    """Rule -> job count that `snakemake -n` would run with ``cfg`` (and the project at ``root``)."""
    path = workdir / "planned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return job_stats(snakemake(workdir, "-n", "--configfile", str(path), root=root).stdout)


@pytest.fixture
def cfg(micro_run):
    return yaml.safe_load((micro_run / "config.yaml").read_text())


def test_grid_change_reruns_only_the_sweep_and_after(micro_run, cfg):
    c = copy.deepcopy(cfg)
    c["sweep"].update(lambdas=[0.0, 0.1, 0.5], sigmas=[1, 3], ks=[1, 4, 32])  # same K_max = 32
    jobs = planned(micro_run, c)
    assert set(jobs) == AGGREGATE and jobs["sweep"] == 2 and jobs["figure_sweep"] == 2


def test_larger_k_max_reruns_retrieval_but_not_extraction(micro_run, cfg):
    c = copy.deepcopy(cfg)
    c["sweep"]["ks"] = [1, 8, 64]
    assert set(planned(micro_run, c)) == {"retrieve"} | AGGREGATE


def test_model_change_reruns_downstream_not_upstream(micro_run, cfg):
    c = copy.deepcopy(cfg)
    c["models"]["micro-gpt2"]["train"]["steps"] = 31
    assert set(planned(micro_run, c)) == {"train_lm"} | DATASTORE | AGGREGATE


def test_corpus_change_reruns_everything(micro_run, cfg):
    c = copy.deepcopy(cfg)
    c["corpora"]["micro"]["generate"]["n_documents"] = 401
    assert set(planned(micro_run, c)) == UPSTREAM | DATASTORE | AGGREGATE


@pytest.mark.parametrize("module, rules", [("figures", {"figure_sweep", "stage_times", "all"}),
                                           ("knnlm", AGGREGATE),
                                           ("index", {"verify_datastore", "merge_index", "retrieve"} | AGGREGATE)])
def test_code_change_reruns_only_the_rules_that_use_it(micro_run, cfg, module, rules, tmp_path):
    """The edit is made in a copy of the project (the workflow run from there), never in the checkout."""
    root = copy_project(tmp_path / "project")
    assert planned(micro_run, cfg, root) == {}  # the copy alone reruns nothing
    path = root / "workflow_scripts" / f"{module}.py"
    path.write_text(path.read_text() + "\n# an edit\n")
    assert set(planned(micro_run, cfg, root)) == rules
    assert planned(micro_run, cfg) == {}


@background("micro")
def test_new_datastore_builds_only_its_own_jobs(micro_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(micro_run, work, symlinks=True)  # copy2 keeps mtimes and .snakemake metadata
    c = yaml.safe_load((micro_run / "config.yaml").read_text())
    c["corpora"]["micro2"] = copy.deepcopy(c["corpora"]["micro"])
    c["corpora"]["micro2"]["generate"]["n_documents"] = 300
    c["datastores"]["micro2"] = {"model": "micro-gpt2", "corpus": "micro2", "split": "train", "shards": 2}
    jobs = planned(work, c)
    assert jobs == {"corpus": 1, "tokenize": 1, "extract_keys": 2, "datastore_manifest": 1, "verify_datastore": 1,
                    "merge_index": 1, "retrieve": 2, "verify_retrieval": 2, "sweep": 2, "verify_sweeps": 1,
                    "summarize": 1, "perplexity_summary": 1, "figure_sweep": 2, "eval_neighbours": 2, "stage_times": 1,
                    "all": 1}
    first = [p for d in ("datastores/micro", "retrieval/valid/micro", "retrieval/test/micro", "sweeps/valid/micro",
                         "sweeps/test/micro")
             for p in sorted((work / "results" / d).rglob("*")) if p.is_file() and "micro2" not in str(p)]
    before = {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in first}
    snakemake(work, "--configfile", str(work / "planned.yaml"))
    assert {p: (p.stat().st_mtime_ns, sha256_file(p)) for p in first} == before
    assert (work / "results/sweeps/test/micro2/perplexity.csv").exists()
    assert planned(work, c) == {}
