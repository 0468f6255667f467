"""The micro run rerun with an IVFPQ index over 3 shards (tests/configs/ivfpq.yaml) through a real Slurm
(`--profile slurm`), as a user runs it: config.yaml as shipped, the test config given with `--configfile`. Every
Slurm job sees exactly that config (a job's Snakemake reads no profile, so config.yaml's sections used to be merged
into the user's, and the first job failed validation); each shard's extraction and each add_shard is a Slurm job of
its own, a datastore's manifest and its check one group job (slurm/config.yaml's `groups`); and the index, the
retrieval caches and the sweeps equal those of the same rerun made locally (the session fixture `ivfpq_run` in
tests/conftest.py, which tests/test_pipeline.py checks too).

Both reruns start from a copy of the finished micro run, so only the datastore, index, retrieval and sweep stages
run (20 jobs, 13 of them Slurm jobs, not the whole pipeline). The Slurm rerun mostly waits on Slurm's status
checks, so the `micro_run` fixture starts it in the background as soon as the micro run exists (when the session
includes this test and Slurm answers) and this test collects it. Needs a running Slurm (CI starts one with
`slurm/local-cluster.sh --install`); skips with the reason otherwise, except where KNNLM_REQUIRE_SLURM=1 (.ci/run
sets it when it is root and started Slurm): there it fails instead.
"""

import os

import numpy as np
import polars as pl
import pytest
from conftest import slurm_rerun, slurm_up

pytestmark = pytest.mark.slow


def test_slurm_run_equals_local_run(micro_run, tmp_path, request):
    reason = slurm_up()
    if reason and os.environ.get("KNNLM_REQUIRE_SLURM") == "1":
        pytest.fail(f"KNNLM_REQUIRE_SLURM=1 but {reason}")
    if reason:
        pytest.skip(reason)
    local = request.getfixturevalue("ivfpq_run")[0]  # after the check: no local rerun for a test that skips
    cluster, rc, log = slurm_rerun(micro_run, tmp_path)  # started in the background by micro_run (conftest.py)
    assert rc == 0, f"the Slurm rerun failed:\n{log[-6000:]}"
    submitted = [line for line in log.splitlines() if "submitted with SLURM jobid" in line]
    for shard in ("000", "001", "002"):
        assert any(f"rule_extract_keys/micro_{shard}" in s for s in submitted), log[-3000:]
        assert any(f"rule_add_shard/micro_{shard}" in s for s in submitted), log[-3000:]
    assert any("rule_train_index/micro" in s for s in submitted) and any("rule_merge_index/micro" in s
                                                                         for s in submitted)
    # the manifest and its check: one group job, neither rule a job of its own
    assert sum("slurm_logs/group_datastore" in s for s in submitted) == 1, log[-3000:]
    assert not any(f"rule_{r}/" in s for s in submitted for r in ("datastore_manifest", "verify_datastore"))
    # each job's Snakemake read the user's config alone: none loaded config.yaml (it says so when it merges it)
    job_logs = {p: p.read_text() for p in (cluster / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert len(job_logs) == len(submitted), sorted(map(str, job_logs))
    merged = {str(p): t for p, t in job_logs.items() if "Config file config.yaml is" in t}
    assert not merged, merged
    ds = "results/datastores/micro"
    for rel in ("manifest.json", "index.faiss", "index.ivfdata", "index/trained.faiss", "index/part_001.faiss"):
        assert (cluster / ds / rel).read_bytes() == (local / ds / rel).read_bytes(), rel
    for e in ("valid", "test"):
        for name in ("dists", "ids", "lm_logprob"):
            a = np.load(cluster / f"results/retrieval/{e}/micro/{name}.npy")
            b = np.load(local / f"results/retrieval/{e}/micro/{name}.npy")
            np.testing.assert_array_equal(a, b)
        sweep = f"results/sweeps/{e}/micro/perplexity.parquet"
        assert pl.read_parquet(cluster / sweep).equals(pl.read_parquet(local / sweep))
    summary = "results/tables/perplexity_summary.csv"
    assert (cluster / summary).read_text() == (local / summary).read_text()
