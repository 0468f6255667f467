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
