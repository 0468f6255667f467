"""Issue 30 (items 1, 3, 4, 5, 9): every artifact is tied to what it was made from, and a reader refuses one made
from something else by name: a retrieval cache read as another eval set, an eval set that is the datastore's own
text under another corpus name, a task cache of another task, datastore or items, or without its npz digest, and
a sweep table edited, truncated or out of step with its csv twin. Small hand-built artifacts only."""

import json
import re
import shlex
import shutil

import numpy as np
import polars as pl
import pytest
from conftest import cache_arrays, config_path, snakemake, write_cache

from workflow_scripts import sweep
from workflow_scripts.artifacts import (
    ArtifactError,
    read_json,
    read_table,
    save_npy,
    sha256_file,
    write_json,
    write_table,
)
from workflow_scripts.datastore import manifest_hash
from workflow_scripts.retrieval import check_not_datastore_text
from workflow_scripts.retrieval_cache import load_cache, verify_retrieval_step
from workflow_scripts.tasks import evaluate

N, K, VOCAB = 12, 4, 30


def _manifest(path, tokens_sha256="t" * 64):
    write_json(path, {"rows": 10, "dim": 4, "shards": [], "tokens_sha256": tokens_sha256})
    return path


def _eval_sets(tmp_path):
    """Two eval sets' tokens (valid, test) and each one's retrieval cache, recorded as retrieve records them."""
    rng = np.random.default_rng(0)
    tokens, caches = {}, {}
    manifest = _manifest(tmp_path / "manifest.json")
    for name in ("valid", "test"):
        tokens[name] = tmp_path / "tokens" / f"{name}.npy"
        save_npy(tokens[name], rng.integers(0, VOCAB, N + 1).astype(np.int32))
        caches[name] = tmp_path / "retrieval" / name
        write_cache(caches[name], cache_arrays(rng, N, K, VOCAB), manifest, tokens[name])
    return tokens, caches, manifest


# ------------------------------------------------------------------------------------- item 1: eval set
def test_a_retrieval_cache_read_as_another_eval_set_is_refused(tmp_path):
    """results/retrieval/valid and .../test swapped: the cache's tokens_sha256 names the other set's tokens, so the
    sweep's check (verify_retrieval), the sweep, the MLP evaluation and the scaling study refuse it by name."""
    tokens, caches, manifest = _eval_sets(tmp_path)
    assert load_cache(caches["valid"], manifest, tokens_npy=tokens["valid"])["meta"]["n_tokens"] == N
    with pytest.raises(ArtifactError, match=r"valid/meta\.json: built from tokens .* not from .*test\.npy") as e:
        load_cache(caches["valid"], manifest, tokens_npy=tokens["test"])
    assert "the cache of another eval set" in str(e.value) and "--forcerun" in str(e.value)
    with pytest.raises(ArtifactError, match="not from .*test.npy"):
        verify_retrieval_step(caches["valid"] / "meta.json", manifest, tokens["test"], tmp_path / "ok.json")
    verify_retrieval_step(caches["test"] / "meta.json", manifest, tokens["test"], tmp_path / "ok.json")
    assert read_json(tmp_path / "ok.json")["tokens"] == str(tokens["test"])


def test_a_cache_scoring_more_tokens_than_its_eval_set_has_is_refused(tmp_path):
    """The count too: a cache whose record says it scored more positions than the tokens hold is refused."""
    tokens, caches, manifest = _eval_sets(tmp_path)
    save_npy(tokens["test"], np.zeros(N - 3, np.int32))
    meta = read_json(caches["test"] / "meta.json")
    write_json(caches["test"] / "meta.json", {**meta, "tokens_sha256": sha256_file(tokens["test"])})
    with pytest.raises(ArtifactError, match=f"{N} scored.*{N - 3} tokens"):
        load_cache(caches["test"], manifest, tokens_npy=tokens["test"])


# ------------------------------------------------------------------------------------- item 3: run time
def test_an_eval_set_whose_tokens_are_the_datastores_is_refused_at_retrieval_unless_allowed(tmp_path):
    """Whatever the corpora are called, eval tokens with the sha256 the datastore's manifest records are its own
    text; retrieval refuses them, unless the eval set allows the overlap."""
    tokens = tmp_path / "tokens.npy"
    save_npy(tokens, np.arange(50, dtype=np.int32))
    digest = sha256_file(tokens)
    leak = _manifest(tmp_path / "leak.json", digest)
    with pytest.raises(ValueError, match=rf"tokens\.npy is the text the datastore .*leak\.json was built from .*"
                                         rf"{digest[:12]}.*allow_datastore_overlap: true"):
        check_not_datastore_text(tokens, digest, read_json(leak), leak, {})
    check_not_datastore_text(tokens, digest, read_json(leak), leak, {"allow_datastore_overlap": True})
    other = _manifest(tmp_path / "other.json")
    check_not_datastore_text(tokens, digest, read_json(other), other, {})


# ------------------------------------------------------------------------------------- item 4: task caches
def _task_cache(d, task, items, manifest, npz_sha=True):
    """A task cache of ``task`` as score_task records it (items' and npz's sha256, the manifest's hash)."""
    d.mkdir(parents=True, exist_ok=True)
    np.savez(d / "scored.npz", t_lm=np.log(np.full(4, 0.5, np.float32)))
    meta = {"task": task, "n_items": 2, "manifest_sha256": manifest_hash(manifest),
            "items_sha256": sha256_file(items), **({"npz_sha256": sha256_file(d / "scored.npz")} if npz_sha else {})}
    write_json(d / "scored.json", {"meta": meta, "items": []})
    return d / "scored.npz", d / "scored.json"


def _items(path, gold):
    pl.DataFrame({"item": [json.dumps({"options": [[0], [1]], "gold": g}) for g in gold]}).write_parquet(path)
    return path


def test_a_task_cache_of_another_task_datastore_or_items_is_refused(tmp_path):
    """Two tasks' scored.{npz,json} swapped, a cache of another datastore, or items changed since: refused by the
    check verify_task_cache and task_sweep run, naming the record and what it belongs to."""
    items_a, items_b = _items(tmp_path / "a.parquet", [0, 1]), _items(tmp_path / "b.parquet", [1, 1])
    manifest, other = _manifest(tmp_path / "m.json"), _manifest(tmp_path / "o.json", "o" * 64)
    npz_a, json_a = _task_cache(tmp_path / "a", "a", items_a, manifest)
    npz_b, json_b = _task_cache(tmp_path / "b", "b", items_b, manifest)
    evaluate.verify_task_cache({"task": "a"}, npz_a, json_a, items_a, manifest, tmp_path / "ok.json")
    with pytest.raises(ArtifactError, match=r"b/scored\.json: the cache of task 'b', read as task 'a'"):
        evaluate.verify_task_cache({"task": "a"}, npz_b, json_b, items_a, manifest, tmp_path / "ok.json")
    with pytest.raises(ArtifactError, match=r"b/scored\.json: scored other items than .*a\.parquet"):
        evaluate.check_task_cache(npz_b, json_b, items_a, None, manifest)
    with pytest.raises(ArtifactError, match=r"a/scored\.json: built from another datastore .* than .*o\.json"):
        evaluate.verify_task_cache({"task": "a"}, npz_a, json_a, items_a, other, tmp_path / "ok.json")


def test_a_task_cache_without_its_npz_digest_is_refused(tmp_path):
    """The npz digest deleted from the record and the npz altered: refused (a missing digest is no pass)."""
    items = _items(tmp_path / "a.parquet", [0, 1])
    manifest = _manifest(tmp_path / "m.json")
    npz, record = _task_cache(tmp_path / "a", "a", items, manifest, npz_sha=False)
    np.savez(npz, t_lm=np.zeros(4, np.float32))
    with pytest.raises(ArtifactError, match=r"a/scored\.json: no npz_sha256 record of .*scored\.npz"):
        evaluate.check_task_cache(npz, record, items)
    with pytest.raises(ArtifactError, match="no npz_sha256"):
        evaluate.verify_task_cache({"task": "a"}, npz, record, items, manifest, tmp_path / "ok.json")


# ------------------------------------------------------------------------------------- items 5 and 9: tables
def _sweep_tables(tmp_path):
    """Two sweep tables (valid, test) and their summary, as the sweep and summarize write them."""
    paths = {}
    for e, shift in (("valid", 0.0), ("test", 1.0)):
        rows = [{"lambda": lam, "k": k, "sigma": 1.0, "ppl": 14.0 - 2 * lam + k / 10 + shift, "base_ppl": 15.0 + shift,
                 "n_tokens": 100} for lam in (0.1, 0.3) for k in (1, 4)]
        paths[e, "d"] = tmp_path / e / "perplexity.parquet"
        paths[e, "d"].parent.mkdir()
        write_table(pl.DataFrame(rows), paths[e, "d"].with_suffix(".csv"), paths[e, "d"])
    sweep.summarize_sweeps(paths, "valid", tmp_path / "s.csv", tmp_path / "s.parquet")
    return paths


def test_an_edited_sweep_table_is_refused_on_read(tmp_path):
    """An edited ppl in a sweep parquet (its metadata kept, or written afresh without it) no longer moves the summary:
    the parquet's recorded csv sha256 disagrees; an edited csv disagrees with its parquet twin."""
    paths = _sweep_tables(tmp_path)
    test = paths["test", "d"]
    df = pl.read_parquet(test).with_columns(pl.col("ppl") * 2)
    df.write_parquet(test, metadata=pl.read_parquet_metadata(test))  # the digest kept, the numbers changed
    with pytest.raises(ArtifactError, match=r"test/perplexity\.parquet: its contents differ from the sha256"):
        sweep.summarize_sweeps(paths, "valid", tmp_path / "s2.csv", tmp_path / "s2.parquet")
    df.write_parquet(test)
    with pytest.raises(ArtifactError, match=r"test/perplexity\.parquet: no csv_sha256 in its metadata"):
        read_table(test)
    csv = tmp_path / "s.csv"
    csv.write_text(csv.read_text().replace("valid", "test", 1))
    with pytest.raises(ArtifactError, match=r"s\.csv: its contents differ from the sha256 recorded in .*s\.parquet"):
        sweep.chosen_point(csv, "d")


def test_a_truncated_sweep_table_is_refused_by_name_before_the_summary(tmp_path):
    """A truncated sweep parquet: verify-tables (the job before summarize) names the file, no polars traceback."""
    paths = _sweep_tables(tmp_path)
    tables = [p for key in paths for p in (paths[key], paths[key].with_suffix(".csv"))]
    sweep.verify_tables(tables, tmp_path / "ok.json")
    assert read_json(tmp_path / "ok.json")["tables"] == {str(t): 4 for t in tables}
    test = paths["test", "d"]
    test.write_bytes(test.read_bytes()[: test.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"test/perplexity\.parquet: unreadable, truncated or missing .*--forcerun"):
        sweep.verify_tables(tables, tmp_path / "ok.json")


# ------------------------------------------------------------------------------------- the rules' wiring (dry runs)
def _commands(proc, step: str) -> list[dict]:
    """Each planned `python -m workflow_scripts <step>` command of a dry run (-p) as flag -> its values."""
    out = []
    for line in proc.stdout.splitlines():
        cmd = line[line.find("python -m workflow_scripts "):].split(" 2> ")[0] if "python -m" in line else ""
        words = shlex.split(cmd)
        if words[3:4] == [step]:
            flags: dict = {}
            for w in words[4:]:
                if w.startswith("--"):
                    key = flags.setdefault(w[2:], [])
                else:
                    key.append(w)
            out.append(flags)
    return out


def test_every_reader_of_a_cache_is_given_what_it_checks_and_the_summary_waits_for_its_tables_check(tmp_path):
    """Items 1, 4, 9 in the rules: each job that reads a retrieval cache gets its own eval set's tokens, each task
    cache check and task sweep its task and datastore manifest, and summarize runs after verify_sweeps, which
    checks every sweep table (tests/configs/full.yaml: tasks, analyses and the scaling study)."""
    proc = snakemake(tmp_path, "-n", "-p", "--configfile", str(config_path("full")))
    cache_of = re.compile(r"results/retrieval/(\w+)/(\w+)/meta\.json")
    for step in ("verify-retrieval", "sweep", "scaling-sweep", "projection"):
        assert _commands(proc, step), step
        for c in _commands(proc, step):
            evalset, _ = cache_of.fullmatch(c["cache"][0]).groups()
            assert c["tokens"] == [f"results/tokens/micro-gpt2/micro/{evalset}.npy"], (step, c)
    (mlp,) = _commands(proc, "mlp-eval")
    assert [cache_of.fullmatch(c).group(1) for c in mlp["caches"]] == [t.split("/")[-1][:-4] for t in mlp["tokens"]]
    checks = _commands(proc, "verify-task-cache") + _commands(proc, "task-sweep")
    assert checks
    for c in checks:
        ds, task = re.fullmatch(r"results/tasks/(\w+)/(\w+)/scored\.npz", c["npz"][0]).groups()
        assert c["manifest"] == [f"results/datastores/{ds}/manifest.json"], c
        assert json.loads(c["params"][0])["task"] == task, c
    (tables,) = _commands(proc, "verify-tables")
    assert sorted(tables["tables"]) == sorted(f"results/sweeps/{e}/{d}/perplexity.{x}" for e in ("test", "valid")
                                              for d in ("micro", "micro_tenth") for x in ("csv", "parquet"))
    order = proc.stdout.index("verify-tables --tables"), proc.stdout.index("workflow_scripts summarize ")
    assert order[0] < order[1]


# ------------------------------------------------------------------------------------- item 13: shards gone
@pytest.mark.slow  # several Snakemake DAG builds: over 5 s
def test_shard_files_a_manifest_lists_but_the_disk_lacks_are_named_when_the_dag_is_built(tmp_path):
    """An interrupted `--forcerun extract_keys` leaves a manifest whose shards are gone, and a plain rerun has
    nothing to do (Snakemake rebuilds a missing file only for an out-of-date consumer): every DAG build names the
    missing files and the command that rebuilds them."""
    ds = tmp_path / "results/datastores/micro"
    (ds / "shards").mkdir(parents=True)
    shards = [{"keys": f"shards/keys_{i:03d}.npy", "values": f"shards/vals_{i:03d}.npy", "rows": 5} for i in range(2)]
    write_json(ds / "manifest.json", {"shards": shards, "rows": 10, "dim": 16})  # what planning reads of it
    for name in ("keys_000.npy", "vals_000.npy", "vals_001.npy"):
        (ds / "shards" / name).touch()
    proc = snakemake(tmp_path, "-n", "--configfile", str(config_path("micro")))
    out = proc.stdout + proc.stderr
    assert ("datastores.micro: 1 shard files that results/datastores/micro/manifest.json lists are missing "
            "(results/datastores/micro/shards/keys_001.npy)") in out, out[-3000:]
    assert "snakemake --forcerun results/datastores/micro/shards/keys_001.npy" in out
    (ds / "shards" / "keys_001.npy").touch()
    proc = snakemake(tmp_path, "-n", "--configfile", str(config_path("micro")))
    assert "shard files" not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------- on a finished micro run
def _copy(micro_run, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(micro_run, work, symlinks=True)
    return work


def _rerun_fails_keeping(work, message: str, kept: list[str], *args: str) -> None:
    """Rerun ``work`` with ``args``: it fails saying ``message``, and the files ``kept`` are as they were."""
    before = {f: sha256_file(work / f) for f in kept}
    # only the forced jobs and what is newer than its outputs: a code edit since the micro run was built (the
    # code trigger) would rebuild the damaged files first instead of checking them
    proc = snakemake(work, "--configfile", str(work / "config.yaml"), "--rerun-triggers", "mtime", *args,
                     check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and message in out, out[-3000:]
    assert {f: sha256_file(work / f) for f in kept} == before


@pytest.mark.slow
def test_swapped_valid_and_test_caches_stop_the_sweep_and_keep_its_tables(micro_run, tmp_path):
    """Item 1 as the issue probed it: results/retrieval/valid and .../test swapped, the sweep rerun. Before: exit 0
    and the summary's valid and test rows swapped (the point chosen on test). Now verify_retrieval refuses."""
    work = _copy(micro_run, tmp_path)
    r = work / "results/retrieval"
    (r / "valid").rename(r / "swap")
    (r / "test").rename(r / "valid")
    (r / "swap").rename(r / "test")
    _rerun_fails_keeping(work, "results/retrieval/test/micro/meta.json: built from tokens with sha256",
                         ["results/tables/perplexity_summary.csv", "results/sweeps/test/micro/perplexity.parquet"],
                         "--forcerun", "sweep")


@pytest.mark.slow
def test_a_truncated_sweep_table_stops_the_summary_before_it_is_removed(micro_run, tmp_path):
    """Item 9 as the issue probed it: a truncated sweep parquet. Before: a polars traceback, and Snakemake had removed
    perplexity_summary.* first. Now verify_sweeps names the file and summarize never starts."""
    work = _copy(micro_run, tmp_path)
    table = work / "results/sweeps/test/micro/perplexity.parquet"
    table.write_bytes(table.read_bytes()[:100])
    _rerun_fails_keeping(work, "results/sweeps/test/micro/perplexity.parquet: unreadable, truncated",
                         ["results/tables/perplexity_summary.csv", "results/tables/perplexity_summary.parquet",
                          "results/sweeps/summary.csv", "results/sweeps/summary.parquet"],
                         "--forcerun", "summarize")
