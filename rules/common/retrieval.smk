# Helpers of rules/retrieval.smk: the params and inputs its rules compute from the config.


RETRIEVAL_CHUNKS = config["retrieval"]["chunks"]


def eval_queries(evalset, ds):
    """Scored positions of an eval set, for memory planning: read off its token file's header when it exists, else
    max_tokens, else a placeholder of 1M."""
    cap = EVAL_SETS[evalset].get("max_tokens")
    try:
        n = _memory.npy_rows(eval_tokens(evalset, ds)) - 1
    except (OSError, ValueError, SyntaxError, KeyError):
        return cap or 1_000_000
    return min(n, cap) if cap else n


def retrieval_params(wildcards, chunk=None):
    ex = config["extraction"]
    return as_json(
        ({"chunk": chunk} if chunk else {})
        | {
            "k_max": config["sweep"]["k_max"],
            "max_tokens": EVAL_SETS[wildcards.evalset].get("max_tokens"),
            "block_size": ex["block_size"],
            **stride_param(EVAL_SETS[wildcards.evalset]),
            **{
                f"datastore_{k}": v
                for k, v in stride_param(DATASTORES[wildcards.ds]).items()
            },
            "batch_size": ex["batch_size"],
            "device": ex["device"],
            "dtype": ex["dtype"],
            **search_params(),
            "gpu_shard_above_gb": config["index"]["gpu_shard_above_gb"],
        }
        | (
            {"allow_datastore_overlap": True}
            if EVAL_SETS[wildcards.evalset]["allow_datastore_overlap"]
            else {}
        )
    )


def retrieval_mb(wildcards, input, threads):
    """A retrieval job's mem_mb, planned from its datastore and its queries (plan_mb); evaluated again once its
    inputs exist (it reads `input`)."""
    return plan_mb("retrieve", wildcards, n_queries=chunk_queries(wildcards))


def chunk_queries(wildcards):
    """Queries of one retrieval job: its chunk's, cut as the step cuts it (memory.chunk_bounds), so that the plan
    asked for is the plan the job checks; 0 for the job that joins chunks (it copies them part by part).
    """
    n = eval_queries(wildcards.evalset, wildcards.ds)
    if "chunk" not in wildcards.keys():
        return n if RETRIEVAL_CHUNKS == 1 else 0
    cfg = json.loads(retrieval_params(wildcards))
    a, b = _memory.chunk_bounds(n, RETRIEVAL_CHUNKS, _memory.chunk_unit(cfg))[
        int(wildcards.chunk)
    ]
    return b - a


CACHE = ["targets", "lm_logprob", "dists", "vals", "ids", "queries"]


RETRIEVAL = "results/retrieval/{evalset}/{ds}"


RETRIEVAL_OUTPUTS = {n: f"{RETRIEVAL}/{n}.npy" for n in CACHE} | {
    "meta": f"{RETRIEVAL}/meta.json"
}


# what every retrieval job reads: the model, the datastore and its index, the eval set's tokens
RETRIEVAL_INPUTS = {
    "model_json": lambda w: model_json(DATASTORES[w.ds]["model"]),
    **SEARCH_INPUTS,
    "tokens": lambda w: eval_tokens(w.evalset, w.ds),
}
