# Retrieval: once per (eval set, datastore), K_max = max(k grid) neighbours per scored token, cached.


# Makes one chunk of an eval set's retrieval cache (retrieval.chunks > 1): a temporary partial cache.
rule retrieve_chunk:
    input:
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        index_data=index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
    output:
        **{
            name: temp(
                f"results/retrieval/{{evalset}}/{{ds}}/chunks/{{chunk}}/{name}.npy"
            )
            for name in CACHE
        },
        meta=temp("results/retrieval/{evalset}/{ds}/chunks/{chunk}/meta.json"),
    log:
        "results/logs/retrieve_chunk/{evalset}/{ds}/{chunk}.log",
    benchmark:
        "results/benchmarks/retrieve_chunk/{evalset}/{ds}/{chunk}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=lambda w, input, threads: plan_mb(
            "retrieve", w, n_queries=chunk_queries(w)
        ),
        runtime=20 * 60,  # paper 1: about 15 h per eval set of 1M tokens in one job (docs/cluster.md)
        gpu=GPU,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: retrieval_params(w, chunk=[int(w.chunk), RETRIEVAL_CHUNKS]),
    shell:
        "python -m workflow_scripts retrieve-chunk --params {params.p:q} --threads {params.threads}"
        " --model-json {input.model_json} --manifest {input.manifest} --index {input.index}"
        " --index-meta {input.index_meta} --tokens {input.tokens} --meta {output.meta} 2> {log}"


# Makes the retrieval cache of an eval set against a datastore: in one job, or (retrieval.chunks > 1) by joining
# its chunks, a cheap job.
rule retrieve:
    input:
        unpack(retrieval_chunk_inputs),
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        index_data=index_data,  # IVFPQ: the on-disk inverted lists beside index.faiss
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
    output:
        **{name: f"results/retrieval/{{evalset}}/{{ds}}/{name}.npy" for name in CACHE},
        meta="results/retrieval/{evalset}/{ds}/meta.json",
    log:
        "results/logs/retrieve/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/retrieve/{evalset}/{ds}.tsv"
    conda:
        GPU_ENV
    threads: 2
    resources:
        mem_mb=lambda w, input, threads: plan_mb(
            "retrieve", w, n_queries=chunk_queries(w)
        ),
        runtime=20 * 60,  # paper 1: about 15 h per eval set of 1M tokens (docs/cluster.md)
        gpu=lambda w: GPU if RETRIEVAL_CHUNKS == 1 else 0,
    params:
        threads=ARITHMETIC_THREADS,
        p=retrieval_params,
        chunks=optional_arg("chunks"),
    shell:
        "python -m workflow_scripts retrieve --params {params.p:q} --threads {params.threads} --model-json {input.model_json}"
        " --manifest {input.manifest} --index {input.index} --index-meta {input.index_meta}"
        " --tokens {input.tokens} --meta {output.meta} {params.chunks} 2> {log}"


# Checks a retrieval cache as the sweep does (each file's sha256, shapes, distances, its datastore and its eval
# set's tokens) before the sweep starts, so that a failed check keeps the sweep's previous tables; temp(), so it
# runs whenever the sweep does.
rule verify_retrieval:
    input:
        cache=rules.retrieve.output,
        cache_meta=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
    output:
        temp("results/retrieval/{evalset}/{ds}/verified.json"),
    log:
        "results/logs/verify_retrieval/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/verify_retrieval/{evalset}/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m workflow_scripts verify-retrieval --cache {input.cache_meta} --manifest {input.manifest}"
        " --tokens {input.tokens} --out {output} 2> {log}"
