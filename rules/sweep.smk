# Sweep: every (λ, k, σ) of the grid by rescoring the retrieval cache; then the summary table.


# Makes the perplexity table of one (eval set, datastore) over the whole grid.
rule sweep:
    input:
        cache_files=rules.retrieve.output,
        cache=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
        verified=rules.verify_retrieval.output.out,
    output:
        **table(
            "results/sweeps/{evalset}/{ds}/perplexity", "sweep", "Perplexity", "Sweeps"
        ),
    log:
        "results/logs/sweep/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/sweep/{evalset}/{ds}.tsv"
    params:
        p=sweep_params,
    shell:
        step("sweep")


# Checks the sweep tables as summarize reads them (readable, each csv and parquet against the sha256 the parquet
# records) before summarize starts, so that a failed check keeps the summary; temp(), so it runs whenever
# summarize does.
rule verify_sweeps:
    input:
        tables=[
            f"results/sweeps/{e}/{d}/perplexity.{x}"
            for e, d in SWEEPS
            for x in ("parquet", "csv")
        ],
    output:
        out=temp("results/sweeps/verified.json"),
    log:
        "results/logs/verify_sweeps/verify_sweeps.log",
    shell:
        step("verify-tables")


# Chooses the kNN-LM's (λ, k, σ) per datastore on its selection set (valid) and applies it to every eval set: the
# table every later stage reads the chosen point from (base LM and kNN-LM per (eval set, datastore), the oracle).
rule summarize:
    input:
        sweeps=[f"results/sweeps/{e}/{d}/perplexity.parquet" for e, d in SWEEPS],
        verified=rules.verify_sweeps.output.out,
    output:
        csv="results/sweeps/summary.csv",
        parquet="results/sweeps/summary.parquet",
    log:
        "results/logs/summarize/summarize.log",
    params:
        p=as_json({"keys": SWEEPS, "select_on": {d: select_on(d) for d in DATASTORES}}),
    shell:
        step("summarize")


# Makes the perplexity summary: the chosen points' table, with in-context retrieval's perplexity beside the base LM
# and the kNN-LM where it ran (incontext.datastores; no in-context columns without it).
rule perplexity_summary:
    input:
        summary=rules.summarize.output.parquet,
        incontext=(
            ["results/tables/incontext_perplexity.parquet"] if IC_DATASTORES else []
        ),
    output:
        **table("results/tables/perplexity_summary", "summary", "Perplexity"),
    log:
        "results/logs/perplexity_summary/perplexity_summary.log",
    shell:
        step("perplexity-summary")
