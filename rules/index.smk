# Index: train once, fill shard by shard, merge (docs/cluster.md). IVFPQ: train_index (one job, on a seeded sample
# drawn across the shards) -> add_shard (one job per shard, memory bounded by one shard) -> merge_index (the parts'
# inverted lists joined on disk, index.ivfdata, memory-mapped by search). Flat: merge_index alone, an exact search
# over the datastore's own keys range by range (index.ShardedFlat), equal to one Flat index over all of them.


# Trains the datastore's empty IVFPQ index. With index.retrain false (the default) a datastore rewritten since
# (more shards, a re-extracted shard) keeps its trained quantizer: the manifest is ancient() here.
rule train_index:
    input:
        manifest=lambda w: (
            f"results/datastores/{w.ds}/manifest.json"
            if config["index"]["retrain"]
            else ancient(f"results/datastores/{w.ds}/manifest.json")
        ),
    output:
        index="results/datastores/{ds}/index/trained.faiss",
        index_meta="results/datastores/{ds}/index/trained.json",
    log:
        "results/logs/train_index/{ds}.log",
    benchmark:
        "results/benchmarks/train_index/{ds}.tsv"
    threads: 2
    resources:
        mem_mb=lambda w, input, threads: plan_mb("train_index", w, input),
    params:
        p=lambda w: as_json({"index": train_params(), "seed": config["seed"]}),
    shell:
        step("train-index")


# Encodes one shard's keys with the trained index (global row ids): one job per shard, in parallel.
rule add_shard:
    input:
        trained=rules.train_index.output.index,
        trained_meta=rules.train_index.output.index_meta,
        shard=shard_inputs,
    output:
        part="results/datastores/{ds}/index/part_{shard}.faiss",
        part_meta="results/datastores/{ds}/index/part_{shard}.json",
    log:
        "results/logs/add_shard/{ds}/{shard}.log",
    benchmark:
        "results/benchmarks/add_shard/{ds}/{shard}.tsv"
    threads: 2
    resources:
        mem_mb=lambda w, input, threads: plan_mb("add_shard", w, input),
    params:
        key_file=lambda w: shard_file(w, "keys", "npy"),
        meta_file=lambda w: shard_file(w, "shard", "json"),
    shell:
        step(
            "add-shard", "--keys {params.key_file:q} --shard-meta {params.meta_file:q}"
        )


# Joins the parts into index.faiss (+ index.ivfdata, IVFPQ), or writes the sharded exact index (Flat).
rule merge_index:
    input:
        unpack(merge_inputs),
        manifest="results/datastores/{ds}/manifest.json",
        verified="results/datastores/{ds}/verified.json",  # rule verify_datastore
    output:
        **index_outputs("results/datastores/{ds}"),
    log:
        "results/logs/merge_index/{ds}.log",
    benchmark:
        "results/benchmarks/merge_index/{ds}.tsv"
    resources:
        mem_mb=lambda w, input, threads: plan_mb("merge_index", w, input),
    params:
        p=lambda w: as_json({"index": index_params()}),
    shell:
        step("merge-index")
