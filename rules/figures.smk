# Figures: PNG + PDF from cached tables, registered in the report. `snakemake figures` redraws them all.


# Makes the perplexity-vs-λ figure of one (eval set, datastore).
rule figure_sweep:
    input:
        sweep="results/sweeps/{evalset}/{ds}/perplexity.parquet",
    output:
        png=report(
            "results/figures/perplexity_vs_lambda/{evalset}__{ds}.png",
            caption="../report/perplexity_vs_lambda.rst",
            category="Perplexity",
            subcategory="Figures",
        ),
        pdf="results/figures/perplexity_vs_lambda/{evalset}__{ds}.pdf",
    log:
        "results/logs/figure_sweep/{evalset}__{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("figures"),
        p=lambda w: as_json({"title": f"{w.evalset} set, datastore {w.ds}"}),
    shell:
        "python -m workflow_scripts figure-sweep --params {params.p:q} --sweep {input.sweep} --png {output.png} --pdf {output.pdf} 2> {log}"


# Redraws every figure from the cached tables.
rule figures:
    input:
        [p for p in all_outputs() if p.startswith("results/figures/")],


# Makes the per-stage time and memory table from every job's benchmark file (run last).
rule stage_times:
    input:
        summary="results/tables/perplexity_summary.csv",
        figures=[
            f"results/figures/perplexity_vs_lambda/{e}__{d}.png" for e, d in SWEEPS
        ],
        tasks=task_outputs(),
        analyses=analyses_outputs(),
    output:
        csv=report(
            "results/tables/stage_times.csv",
            caption="../report/stage_times.rst",
            category="Pipeline",
        ),
        parquet="results/tables/stage_times.parquet",
    log:
        "results/logs/stage_times/stage_times.log",
    conda:
        "../envs/plotting.yaml"
    params:
        code=code("stages"),
    shell:
        "python -m workflow_scripts stage-times --outdir results/benchmarks --out-stem results/tables/stage_times 2> {log}"
