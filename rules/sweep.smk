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


# Makes the perplexity summary: base LM and kNN-LM per (eval set, datastore), (λ, k, σ) chosen on valid.
rule summarize:
    input:
        sweeps=[f"results/sweeps/{e}/{d}/perplexity.parquet" for e, d in SWEEPS],
        verified=rules.verify_sweeps.output.out,
    output:
        **table("results/tables/perplexity_summary", "summary", "Perplexity"),
    log:
        "results/logs/summarize/summarize.log",
    params:
        p=as_json({"keys": SWEEPS, "select_on": {d: select_on(d) for d in DATASTORES}}),
    shell:
        step("summarize")
