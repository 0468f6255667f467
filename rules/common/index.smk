# Helpers of rules/index.smk: the params and inputs its rules compute from the config; what a search reads and
# depends on (retrieval, task scoring, the scaling study).


def search_params():
    """What a search depends on beyond the index: IVFPQ's nprobe and distances ('exact', recomputed from the keys,
    or 'pq', FAISS's own); None for a Flat index, whose search is exact."""
    return {k: config["index"][k] if IVF else None for k in ("nprobe", "distances")}


IVF = config["index"]["type"] != "Flat"


def index_data(wildcards):
    """The on-disk inverted lists a search reads beside index.faiss (IVFPQ), as an input; none for Flat."""
    return [f"results/datastores/{wildcards.ds}/index.ivfdata"] if IVF else []


# what a search of a datastore reads (retrieval and task scoring)
SEARCH_INPUTS = {
    "manifest": "results/datastores/{ds}/manifest.json",
    "index": "results/datastores/{ds}/index.faiss",
    "index_meta": "results/datastores/{ds}/index.json",
    "index_data": index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
}


def shard_file(wildcards, name, ext):
    """One file of a datastore shard: extracted under shards/, or copied under subset/ by subsample_datastore."""
    d = "subset" if wildcards.ds in SUBSAMPLED else "shards"
    return f"results/datastores/{wildcards.ds}/{d}/{name}_{wildcards.shard}.{ext}"


def shard_inputs(wildcards):
    """add_shard's inputs: the shard's keys and meta, or for a subsample datastore the subset/ folder they are in
    (a directory() output: Snakemake cannot name a file inside it as an input)."""
    if wildcards.ds in SUBSAMPLED:
        return [f"results/datastores/{wildcards.ds}/subset"]
    return [
        shard_file(wildcards, "keys", "npy"),
        shard_file(wildcards, "shard", "json"),
    ]


def index_params():
    """What the index itself depends on: index.distances and index.gpu_shard_above_gb only concern retrieval and
    scoring, index.retrain only when training reruns."""
    return {
        k: v
        for k, v in config["index"].items()
        if k not in ("distances", "gpu_shard_above_gb", "retrain")
    }


def train_params():
    """What the trained (empty) index depends on: not nprobe, which only the search uses."""
    return {k: v for k, v in index_params().items() if k != "nprobe"}


def index_outputs(prefix):
    """merge_index's outputs: index.faiss and index.json, and the on-disk inverted lists of an IVF index."""
    out = {"index": f"{prefix}/index.faiss", "index_meta": f"{prefix}/index.json"}
    if IVF:
        out["ivfdata"] = f"{prefix}/index.ivfdata"
    return out


def merge_inputs(wildcards):
    """IVFPQ: the trained index and every shard's part; Flat: nothing beyond the manifest."""
    if not IVF:
        return {}
    d = f"results/datastores/{wildcards.ds}/index"
    return {
        "trained": f"{d}/trained.faiss",
        "trained_meta": f"{d}/trained.json",
        "parts": expand(f"{d}/part_{{shard}}.faiss", shard=shard_ids(wildcards.ds)),
        "part_metas": expand(f"{d}/part_{{shard}}.json", shard=shard_ids(wildcards.ds)),
    }


def plan_mb(job, wildcards, input=None, n_queries=0):
    """A job's mem_mb from its datastore's manifest (workflow_scripts/memory.py); a placeholder while the manifest
    does not exist yet (Snakemake evaluates resources again right before it schedules the job).
    """
    manifest = _memory.read_manifest(f"results/datastores/{wildcards.ds}/manifest.json")
    mb, _ = _memory.estimate_mb(
        job, manifest, config["index"], config["sweep"]["k_max"], n_queries
    )
    return mb
