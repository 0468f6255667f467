# Retrieval: once per (eval set, datastore), K_max = max(k grid) neighbours per scored token, cached.


# Makes one chunk of an eval set's retrieval cache (retrieval.chunks > 1): a temporary partial cache.
rule retrieve_chunk:
    input:
        **RETRIEVAL_INPUTS,
    output:
        **chunk_outputs(RETRIEVAL_OUTPUTS, RETRIEVAL),
    log:
        "results/logs/retrieve_chunk/{evalset}/{ds}/{chunk}.log",
    benchmark:
        "results/benchmarks/retrieve_chunk/{evalset}/{ds}/{chunk}.tsv"
    threads: SEARCH_THREADS
    resources:
        mem_mb=retrieval_mb,
        gpu=GPU,
    params:
        p=lambda w: retrieval_params(w, chunk=[int(w.chunk), RETRIEVAL_CHUNKS]),
    shell:
        step("retrieve-chunk")


# Makes the retrieval cache of an eval set against a datastore: in one job, or (retrieval.chunks > 1) by joining
# its chunks, a cheap job.
rule retrieve:
    input:
        unpack(
            chunk_inputs(
                RETRIEVAL_CHUNKS, RETRIEVAL, "meta.json", [f"{n}.npy" for n in CACHE]
            )
        ),
        **RETRIEVAL_INPUTS,
    output:
        **RETRIEVAL_OUTPUTS,
    log:
        "results/logs/retrieve/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/retrieve/{evalset}/{ds}.tsv"
    threads: SEARCH_THREADS
    resources:
        mem_mb=retrieval_mb,
        gpu=lambda w: GPU if RETRIEVAL_CHUNKS == 1 else 0,
    params:
        p=retrieval_params,
    shell:
        step("retrieve")


# Checks a retrieval cache as the sweep does (each file's sha256, shapes, distances, its datastore and its eval
# set's tokens) before the sweep starts, so that a failed check keeps the sweep's previous tables; temp(), so it
# runs whenever the sweep does.
rule verify_retrieval:
    input:
        cache_files=rules.retrieve.output,
        cache=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
    output:
        out=temp("results/retrieval/{evalset}/{ds}/verified.json"),
    log:
        "results/logs/verify_retrieval/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/verify_retrieval/{evalset}/{ds}.tsv"
    shell:
        step("verify-retrieval")
