# Datastore: one job per shard extracts keys (input of the last block's MLP) and values (next tokens);
# the manifest records sizes, sha256 and the model identity, and every consumer checks it.


# Cuts a shard_tokens datastore's tokens into shards (range and token-slice sha256 of each): a checkpoint, as
# their number is known only once the tokens exist. extract_keys takes its shard's entry as params.
checkpoint plan_shards:
    input:
        tokens=lambda w: ds_tokens(w.ds),
    output:
        out="results/datastores/{ds}/shards/plan.json",
    log:
        "results/logs/plan_shards/{ds}.log",
    benchmark:
        "results/benchmarks/plan_shards/{ds}.tsv"
    wildcard_constraints:
        ds=names_regex(PLANNED),
    params:
        p=plan_params,
    shell:
        step("plan-shards")


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
    threads: 1
    resources:
        gpu=GPU,
    params:
        p=extraction_params,
    shell:
        step("extract-keys")


# Makes the datastore manifest from its shards.
rule datastore_manifest:
    input:
        **SHARD_FILES,
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        tokens=lambda w: ds_tokens(w.ds),
    output:
        out="results/datastores/{ds}/manifest.json",
    log:
        "results/logs/datastore_manifest/{ds}.log",
    benchmark:
        "results/benchmarks/datastore_manifest/{ds}.tsv"
    wildcard_constraints:
        ds=names_regex(EXTRACTED),  # a subsample's manifest: rule subsample_datastore
    shell:
        step("manifest")


# Checks a datastore as its consumers do (every shard's size and sha256 against the manifest) before merge_index
# starts: Snakemake removes a job's outputs when it starts it, so a failed check here keeps the previous index.
# The marker is temp(): it exists only while merge_index needs it, so the check runs whenever merge_index does.
rule verify_datastore:
    input:
        manifest="results/datastores/{ds}/manifest.json",
    output:
        out=temp("results/datastores/{ds}/verified.json"),
    log:
        "results/logs/verify_datastore/{ds}.log",
    benchmark:
        "results/benchmarks/verify_datastore/{ds}.tsv"
    shell:
        step("verify-datastore")
