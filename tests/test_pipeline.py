"""End-to-end: the micro config through Snakemake, then the artifact contracts checked against each other."""

import json
import math
import re

import faiss
import numpy as np
import polars as pl
import pytest
import yaml
from conftest import ROOT, job_stats, load_test_config, snakemake

from workflow_scripts.artifacts import sha256_file
from workflow_scripts.datastore import Datastore
from workflow_scripts.index import add_keys, load_index

pytestmark = pytest.mark.slow
DS, EVAL_SETS = "micro", ("valid", "test")


def test_manifest_matches_shards(micro_run):
    d = micro_run / "results/datastores" / DS
    m = json.loads((d / "manifest.json").read_text())
    ident = json.loads((micro_run / "results/models/micro-gpt2/model.json").read_text())
    assert len(m["shards"]) == 2
    assert m["hook_point"] == ident["hook_point"] == "transformer.h.1.mlp"
    assert (m["model_sha256"], m["tokenizer_sha256"]) == (ident["model_sha256"], ident["tokenizer_sha256"])
    assert m["dtype"] == "float16" and m["dim"] == 32
    tokens = np.load(micro_run / "results/tokens/micro-gpt2/micro/train.npy")
    assert m["rows"] == sum(s["rows"] for s in m["shards"]) == tokens.size - 1
    vals = []
    for s in m["shards"]:
        for kind in ("keys", "values"):
            f = d / s[kind]
            assert f.stat().st_size == s[f"{kind}_bytes"]
            assert sha256_file(f) == s[f"{kind}_sha256"]
        keys = np.load(d / s["keys"], allow_pickle=False)
        assert keys.dtype == np.float16 and keys.shape == (s["rows"], m["dim"])
        vals.append(np.load(d / s["values"], allow_pickle=False))
    # values are the next tokens of the training stream, shards concatenated in manifest order
    np.testing.assert_array_equal(np.concatenate(vals), tokens[1:])


@pytest.mark.parametrize("evalset", EVAL_SETS)
def test_retrieval_cache_contract(micro_run, evalset):
    c = micro_run / "results/retrieval" / evalset / DS
    meta = json.loads((c / "meta.json").read_text())
    manifest_bytes = (micro_run / "results/datastores" / DS / "manifest.json").read_text()
    assert meta["manifest_sha256"] == __import__("hashlib").sha256(
        json.dumps(json.loads(manifest_bytes), sort_keys=True).encode()).hexdigest()
    arr = {n: np.load(c / f"{n}.npy", allow_pickle=False)
           for n in ("targets", "lm_logprob", "dists", "vals", "ids", "queries")}
    N, K = meta["n_tokens"], meta["K"]
    assert K == 32 and N == 300
    assert arr["dists"].shape == arr["vals"].shape == arr["ids"].shape == (N, K)
    assert arr["dists"].dtype == np.float32 and arr["vals"].dtype == np.int32 and arr["ids"].dtype == np.int64
    assert arr["queries"].dtype == np.float16 and arr["queries"].shape == (N, 32)
    assert arr["lm_logprob"].dtype == np.float32 and (arr["lm_logprob"] <= 0).all()
    assert (np.diff(arr["dists"], axis=1) >= 0).all()
    tokens = np.load(micro_run / f"results/tokens/micro-gpt2/micro/{evalset}.npy")
    np.testing.assert_array_equal(arr["targets"], tokens[1 : N + 1])
    # neighbour ids point at keys whose distance to the query is the cached distance, and at their values
    m = json.loads(manifest_bytes)
    d = micro_run / "results/datastores" / DS
    keys = np.concatenate([np.load(d / s["keys"]) for s in m["shards"]]).astype(np.float32)
    vals = np.concatenate([np.load(d / s["values"]) for s in m["shards"]])
    q = arr["queries"].astype(np.float32)
    brute = ((keys[arr["ids"]] - q[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(arr["dists"], brute, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(arr["vals"], vals[arr["ids"]])
    # the nearest neighbour really is the nearest key (exact Flat index)
    np.testing.assert_allclose(arr["dists"][:, 0], ((keys[None] - q[:, None]) ** 2).sum(-1).min(1), rtol=1e-3,
                               atol=1e-3)


@pytest.mark.parametrize("evalset", EVAL_SETS)
def test_sweep_table(micro_run, evalset):
    stem = micro_run / "results/sweeps" / evalset / DS / "perplexity"
    df = pl.read_parquet(f"{stem}.parquet")
    assert df.columns == ["lambda", "k", "sigma", "ppl", "base_ppl", "n_tokens", "window_ppl", "base_window_ppl",
                          "word_ppl", "base_word_ppl", "n_words"]
    assert pl.read_csv(f"{stem}.csv").shape == df.shape == (3 * 3 * 2, 11)
    lp = np.load(micro_run / "results/retrieval" / evalset / DS / "lm_logprob.npy")
    assert df["base_ppl"][0] == pytest.approx(math.exp(-lp.astype(np.float64).mean()), rel=1e-12)
    # no stride: paper 1's per-window mean over the blocks of extraction.block_size (32) the queries were run in
    block = load_test_config("micro")["extraction"]["block_size"]
    nll = -lp.astype(np.float64)
    by_block = [nll[a : a + block].mean() for a in range(0, nll.size, block)]
    assert df["base_window_ppl"][0] == pytest.approx(math.exp(np.mean(by_block)), rel=1e-12)
    assert nll.size % block and df["base_window_ppl"][0] != pytest.approx(df["base_ppl"][0], rel=1e-9)
    # word level, by the eval set's default count (words: paper 1's), recorded by retrieve in the cache
    words = json.loads((micro_run / "results/retrieval" / evalset / DS / "meta.json").read_text())["words"]["words"]
    assert (df["n_words"] == words).all() and 0 < words < nll.size
    assert df["base_word_ppl"][0] == pytest.approx(math.exp(nll.sum() / words), rel=1e-12)
    at0 = df.filter(pl.col("lambda") == 0.0)
    assert (at0["ppl"] == at0["base_ppl"]).all()  # λ = 0 is exactly the base LM


def test_summary_figures_and_noop_rerun(micro_run):
    s = pl.read_csv(micro_run / "results/tables/perplexity_summary.csv")
    assert sorted(s["eval_set"]) == ["test", "valid"]
    assert (s["chosen_on"] == "valid").all()
    assert (s["oracle_ppl"] <= s["knn_ppl"] + 1e-12).all()
    sweeps = {e: pl.read_csv(micro_run / f"results/sweeps/{e}/{DS}/perplexity.csv") for e in EVAL_SETS}
    best = sweeps["valid"].sort(["ppl", "lambda", "k", "sigma"]).row(0, named=True)  # chosen on valid
    for r in s.iter_rows(named=True):
        assert (r["lambda"], r["k"], r["sigma"]) == (best["lambda"], best["k"], best["sigma"])
        sw = sweeps[r["eval_set"]]
        at = sw.filter((pl.col("lambda") == best["lambda"]) & (pl.col("k") == best["k"])
                       & (pl.col("sigma") == best["sigma"]))
        assert r["knn_ppl"] == at["ppl"][0]  # each set's kNN-LM number is its own ppl at the valid choice
        assert r["oracle_ppl"] == sw["ppl"].min() and r["base_ppl"] == sw["base_ppl"][0]
    from matplotlib.image import imread

    for e in EVAL_SETS:
        img = imread(micro_run / f"results/figures/perplexity_vs_lambda/{e}/{DS}.png")
        assert img.ndim == 3 and min(img.shape[:2]) > 200 and img[..., :3].std() > 0.05  # drawn, not blank
    assert (micro_run / "results/models/micro-gpt2/loss.csv").exists()
    dry = snakemake(micro_run, "-n", "--configfile", str(micro_run / "config.yaml"))
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_report_labels_each_sweep_figure_with_its_eval_set_and_datastore(micro_run, tmp_path):
    proc = snakemake(micro_run, "--configfile", str(micro_run / "config.yaml"), "--report", str(tmp_path / "r.html"))
    html = (tmp_path / "r.html").read_text(errors="replace")
    assert "eval set" in html, proc.stderr[-2000:]
    for e in EVAL_SETS:
        assert f"perplexity_vs_lambda/{e}/{DS}.png" in html


def _bad_config(tmp_path, mutate):
    cfg = load_test_config("micro")
    mutate(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return snakemake(tmp_path, "-n", "--configfile", str(path), check=False)


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(lamdas=[0.1]), "lamdas"),
    (lambda c: c["sweep"].update(ks="many"), "sweep.ks"),
    (lambda c: c["models"]["micro-gpt2"]["train"].update(steps=2.5), "models.micro-gpt2.train.steps"),
    (lambda c: c["sweep"].update(sigmas=[0]), "sweep.sigmas.0"),
])
def test_bad_config_fails_before_any_job(tmp_path, mutate, expected):
    proc = _bad_config(tmp_path, mutate)
    assert proc.returncode != 0
    assert expected in proc.stdout + proc.stderr
    assert not (tmp_path / "results").exists()


def test_empty_corpus_file_fails_before_any_job(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"{split}.txt").write_text("" if split == "train" else "some text\n")

    def local(c):
        c["corpora"]["micro"] = {"source": "local", "local": {
            "format": "text", "files": {s: str(tmp_path / f"{s}.txt") for s in ("train", "valid", "test")}}}

    proc = _bad_config(tmp_path, local)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "corpora.micro.local.files.train" in out and str(tmp_path / "train.txt") in out
    assert not (tmp_path / "results").exists()


def _dry_run(tmp_path, cfg):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return snakemake(tmp_path, "-n", "--configfile", str(path))


def test_names_with_double_underscores_get_a_figure_each(tmp_path):
    """Issue 18, item 5: figure paths joined eval set and datastore with '__', which names may contain. Eval sets
    a__b and a, datastores c and b__c: (a__b, c) and (a, b__c) made one path, one figure drawn under one pair
    and none for the other. Each pair has its own figure, made from its own sweep."""
    cfg = load_test_config("micro")
    ds = cfg["datastores"].pop("micro")
    cfg["datastores"] = {"c": ds, "b__c": ds}
    cfg["eval_sets"] = {"a__b": cfg["eval_sets"]["valid"], "a": cfg["eval_sets"]["test"]}
    proc = _dry_run(tmp_path, cfg)
    assert job_stats(proc.stdout)["figure_sweep"] == 4
    jobs = [block for block in proc.stdout.split("\n\n") if "rule figure_sweep:" in block]
    pairs = {tuple(v.split("=")[1] for v in re.search(r"wildcards: (.*)", b)[1].split(", ")) for b in jobs}
    assert pairs == {("a__b", "c"), ("a__b", "b__c"), ("a", "c"), ("a", "b__c")}
    for b in jobs:
        e, d = re.search(r"wildcards: evalset=(.*), ds=(.*)", b).groups()
        assert f"results/sweeps/{e}/{d}/perplexity.parquet" in b


def test_a_local_corpus_listing_one_file_for_two_splits_warns_when_the_dag_is_built(tmp_path):
    """Issue 18, item 2: a file in two splits of a local corpus is a warning (not an error) at DAG time."""
    (tmp_path / "one.txt").write_text("some text\n")
    cfg = load_test_config("micro")
    cfg["corpora"]["mine"] = {"source": "local", "local": {
        "format": "text", "files": {s: str(tmp_path / "one.txt") for s in ("train", "valid", "test")}}}
    out = _dry_run(tmp_path, cfg)
    out = out.stdout + out.stderr
    assert re.search(r"corpora\.mine\.local\.files\.train, corpora\.mine\.local\.files\.valid, "
                     r"corpora\.mine\.local\.files\.test all list " + re.escape(str(tmp_path / "one.txt")), out), \
        out[-3000:]


def test_paper_scale_preset_builds_its_dag_offline(tmp_path):
    """The WikiText-103 preset's whole DAG is built without network: 32 extraction jobs, one per shard."""
    proc = snakemake(tmp_path, "-n", "--configfile", str(ROOT / "experiments/wikitext103-gpt2.yaml"))
    jobs = job_stats(proc.stdout)
    assert jobs["extract_keys"] == 32 and jobs["model_identity"] == 1 and jobs["retrieve"] == 2
    assert "train_lm" not in jobs and "train_tokenizer" not in jobs


def test_switching_to_an_ivfpq_index_plans_only_the_index_and_after(micro_run, tmp_path):
    """Switching the finished micro run to an approximate index plans the index build and what reads it, and
    nothing before it (a dry run: the planning a real run executes)."""
    cfg = yaml.safe_load((micro_run / "config.yaml").read_text())
    cfg["index"] = {"type": "IVFPQ", "nlist": 8, "m": 8, "nbits": 4, "nprobe": 4, "train_sample": 5000}
    (tmp_path / "ivfpq.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(micro_run, "-n", "--configfile", str(tmp_path / "ivfpq.yaml"))
    jobs = job_stats(proc.stdout + proc.stderr)
    assert jobs["train_index"] == jobs["merge_index"] == 1 and jobs["add_shard"] == 2, jobs
    assert {"retrieve", "sweep", "summarize"} <= set(jobs), jobs
    assert not {"corpus", "train_tokenizer", "tokenize", "train_lm", "extract_keys", "datastore_manifest"} & set(jobs)


def test_ivfpq_index_has_exact_distances_and_equals_a_one_process_build(ivfpq_run):
    """The micro run rerun with an IVFPQ index over 3 shards (tests/configs/ivfpq.yaml): cached distances are still
    exact squared L2 to the stored keys, ascending, and the index merged from the shards' parts is the one a single
    process builds."""
    work, jobs = ivfpq_run
    nprobe = load_test_config("ivfpq")["index"]["nprobe"]
    meta = json.loads((work / "results/datastores/micro/index.json").read_text())
    assert meta["factory"] == "IVF64,PQ8x8" and not meta["exact"]
    c = work / "results/retrieval/test/micro"
    assert json.loads((c / "meta.json").read_text())["distances"] == "recomputed from keys"
    d = work / "results/datastores/micro"
    m = json.loads((d / "manifest.json").read_text())
    keys = np.concatenate([np.load(d / s["keys"]) for s in m["shards"]]).astype(np.float32)
    ids, dists = np.load(c / "ids.npy"), np.load(c / "dists.npy")
    q = np.load(c / "queries.npy").astype(np.float32)
    np.testing.assert_allclose(dists, ((keys[ids] - q[:, None, :]) ** 2).sum(-1), rtol=1e-5, atol=1e-4)
    assert (np.diff(dists, axis=1) >= 0).all()
    # the index was trained once, filled by one add_shard job per shard and merged on disk, and it is the index one
    # process builds with the same trained quantizer: same ids and distances
    assert jobs["train_index"] == jobs["merge_index"] == 1 and jobs["add_shard"] == len(m["shards"]) == 3
    assert jobs["extract_keys"] == 3  # the shard count changed: the datastore is extracted again
    assert meta["layout"] == "ondisk" and (d / "index.ivfdata").stat().st_size > 0
    merged, _ = load_index(d / "index.faiss", d / "index.json", Datastore(d / "manifest.json"), nprobe=nprobe)
    one = faiss.read_index(str(d / "index/trained.faiss"))
    for s in m["shards"]:
        add_keys(one, np.load(d / s["keys"]))
    faiss.extract_index_ivf(one).nprobe = nprobe
    for got, want in zip(merged.search(q, 32), one.search(q, 32), strict=True):
        np.testing.assert_array_equal(got, want)
    # incremental: a re-extracted shard is encoded again alone and re-merged; the trained quantizer is kept
    again = snakemake(work, "-n", "--configfile", str(work / "config.yaml"), "--forcerun",
                      "results/datastores/micro/shards/keys_001.npy")
    planned = job_stats(again.stdout + again.stderr)
    assert planned["add_shard"] == planned["merge_index"] == planned["extract_keys"] == 1, planned
    assert "train_index" not in planned
