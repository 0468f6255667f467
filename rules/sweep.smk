# Sweep: every (λ, k, σ) of the grid by rescoring the retrieval cache; then the summary table.


# Makes the perplexity table of one (eval set, datastore) over the whole grid.
rule sweep:
    input:
        cache=rules.retrieve.output,
        cache_meta=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
        verified=rules.verify_retrieval.output[0],
    output:
        csv=report(
            "results/sweeps/{evalset}/{ds}/perplexity.csv",
            caption="../report/sweep.rst",
            category="Perplexity",
            subcategory="Sweeps",
        ),
        parquet="results/sweeps/{evalset}/{ds}/perplexity.parquet",
    log:
        "results/logs/sweep/{evalset}/{ds}.log",
    benchmark:
        "results/benchmarks/sweep/{evalset}/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        p=lambda w: as_json(
            {k: config["sweep"][k] for k in ("lambdas", "ks", "sigmas")}
            | {
                "block_size": config["extraction"]["block_size"],
                "word_count": EVAL_SETS[w.evalset]["word_count"],
            }
            | stride_param(EVAL_SETS[w.evalset])
        ),
    shell:
        "python -m workflow_scripts sweep --params {params.p:q} --cache {input.cache_meta} --manifest {input.manifest}"
        " --tokens {input.tokens} --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Checks the sweep tables as summarize reads them (readable, each csv and parquet against the sha256 the parquet
# records) before summarize starts, so that a failed check keeps the summary; temp(), so it runs whenever
# summarize does.
rule verify_sweeps:
    input:
        [
            f"results/sweeps/{e}/{d}/perplexity.{x}"
            for e, d in SWEEPS
            for x in ("parquet", "csv")
        ],
    output:
        temp("results/sweeps/verified.json"),
    log:
        "results/logs/verify_sweeps/verify_sweeps.log",
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=2000,
        runtime=30,
    shell:
        "python -m workflow_scripts verify-tables --tables {input} --out {output} 2> {log}"


# Chooses the kNN-LM's (λ, k, σ) per datastore on its selection set (valid) and applies it to every eval set: the
# table every later stage reads the chosen point from (base LM and kNN-LM per (eval set, datastore), the oracle).
rule summarize:
    input:
        sweeps=[f"results/sweeps/{e}/{d}/perplexity.parquet" for e, d in SWEEPS],
        verified=rules.verify_sweeps.output[0],
    output:
        csv="results/sweeps/summary.csv",
        parquet="results/sweeps/summary.parquet",
    log:
        "results/logs/summarize/summarize.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        p=as_json({"keys": SWEEPS, "select_on": {d: select_on(d) for d in DATASTORES}}),
    shell:
        "python -m workflow_scripts summarize --params {params.p:q} --sweeps {input.sweeps} --csv {output.csv}"
        " --parquet {output.parquet} 2> {log}"


# Makes the perplexity summary: the chosen points' table, with in-context retrieval's perplexity beside the base LM
# and the kNN-LM where it ran (incontext.datastores; no in-context columns without it).
rule perplexity_summary:
    input:
        summary=rules.summarize.output.parquet,
        incontext=(
            ["results/tables/incontext_perplexity.parquet"] if IC_DATASTORES else []
        ),
    output:
        csv=report(
            "results/tables/perplexity_summary.csv",
            caption="../report/summary.rst",
            category="Perplexity",
        ),
        parquet="results/tables/perplexity_summary.parquet",
    log:
        "results/logs/perplexity_summary/perplexity_summary.log",
    conda:
        "../envs/pipeline.yaml"
    shell:
        "python -m workflow_scripts perplexity-summary --summary {input.summary} --incontext {input.incontext}"
        " --csv {output.csv} --parquet {output.parquet} 2> {log}"
