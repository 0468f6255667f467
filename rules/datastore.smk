# Datastore: one job per shard extracts keys (input of the last block's MLP) and values (next tokens);
# the manifest records sizes, sha256 and the model identity, and every consumer checks it.


# Cuts a shard_tokens datastore's tokens into shards (range and token-slice sha256 of each): a checkpoint, as
# their number is known only once the tokens exist. extract_keys takes its shard's entry as params.
checkpoint plan_shards:
    input:
        tokens=lambda w: ds_tokens(w.ds),
    output:
        plan="results/datastores/{ds}/shards/plan.json",
    log:
        "results/logs/plan_shards/{ds}.log",
    benchmark:
        "results/benchmarks/plan_shards/{ds}.tsv"
    wildcard_constraints:
        ds=names_regex(PLANNED),
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=60,  # hashes the tokens once: paper 1's 2.4 GB in seconds
    params:
        p=plan_params,
    shell:
        "python -m workflow_scripts plan-shards --params {params.p:q} --tokens {input.tokens} --out {output.plan}"
        " 2> {log}"


# Makes one key/value shard of a datastore, streamed to disk. A shard_tokens datastore's tokens and plan are
# ancient(): its shards rerun on their params (range, token-slice sha256), so a grown stream reruns only the
# old last shard and the new ones.
rule extract_keys:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        tokens=extract_tokens,
        plan=plan_input,
    output:
        key_shards="results/datastores/{ds}/shards/keys_{shard}.npy",
        vals="results/datastores/{ds}/shards/vals_{shard}.npy",
        meta="results/datastores/{ds}/shards/shard_{shard}.json",
    log:
        "results/logs/extract_keys/{ds}/{shard}.log",
    benchmark:
        "results/benchmarks/extract_keys/{ds}/{shard}.tsv"
    wildcard_constraints:
        ds=names_regex(EXTRACTED),  # a subsample's rows are copied (rules/scaling.smk)
    conda:
        GPU_ENV
    threads: 1
    resources:
        mem_mb=8000,
        runtime=12 * 60,  # paper 1: about 20 min per shard of 9.5M tokens (docs/cluster.md)
        gpu=GPU,
    params:
        p=extraction_params,
    shell:
        "python -m workflow_scripts extract-keys --params {params.p:q} --threads {threads} --model-json {input.model_json}"
        " --tokens {input.tokens} --keys {output.key_shards} --vals {output.vals} --meta {output.meta} 2> {log}"


# Makes the datastore manifest from its shards.
rule datastore_manifest:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        tokens=lambda w: ds_tokens(w.ds),
        key_shards=lambda w: expand(
            "results/datastores/{ds}/shards/keys_{shard}.npy",
            ds=w.ds,
            shard=shard_ids(w.ds),
        ),
        vals=lambda w: expand(
            "results/datastores/{ds}/shards/vals_{shard}.npy",
            ds=w.ds,
            shard=shard_ids(w.ds),
        ),
        meta=lambda w: expand(
            "results/datastores/{ds}/shards/shard_{shard}.json",
            ds=w.ds,
            shard=shard_ids(w.ds),
        ),
    output:
        "results/datastores/{ds}/manifest.json",
    log:
        "results/logs/datastore_manifest/{ds}.log",
    benchmark:
        "results/benchmarks/datastore_manifest/{ds}.tsv"
    wildcard_constraints:
        ds=names_regex(EXTRACTED),  # a subsample's manifest: rule subsample_datastore
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=6 * 60,  # re-hashes every shard: about 2 h for paper 1's 5 TB (docs/cluster.md)
    shell:
        "python -m workflow_scripts manifest --model-json {input.model_json} --tokens {input.tokens} --keys {input.key_shards}"
        " --vals {input.vals} --meta {input.meta} --out {output} 2> {log}"


# Checks a datastore as its consumers do (every shard's size and sha256 against the manifest) before merge_index
# starts: Snakemake removes a job's outputs when it starts it, so a failed check here keeps the previous index.
# The marker is temp(): it exists only while merge_index needs it, so the check runs whenever merge_index does.
rule verify_datastore:
    input:
        manifest="results/datastores/{ds}/manifest.json",
    output:
        temp("results/datastores/{ds}/verified.json"),
    log:
        "results/logs/verify_datastore/{ds}.log",
    benchmark:
        "results/benchmarks/verify_datastore/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=6 * 60,  # re-hashes every shard, as datastore_manifest does (docs/cluster.md)
    shell:
        "python -m workflow_scripts verify-datastore --manifest {input.manifest} --out {output} 2> {log}"
