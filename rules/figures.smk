# Figures: PNG + PDF from cached tables, registered in the report. `snakemake figures` redraws them all.


# Makes the perplexity-vs-λ figure of one (eval set, datastore).
rule figure_sweep:
    input:
        sweep="results/sweeps/{evalset}/{ds}/perplexity.parquet",
    output:
        png=report(
            "results/figures/perplexity_vs_lambda/{evalset}/{ds}.png",
            caption="../report/perplexity_vs_lambda.rst",
            category="Perplexity",
            subcategory="Figures",
            labels={"eval set": "{evalset}", "datastore": "{ds}"},
        ),
        pdf="results/figures/perplexity_vs_lambda/{evalset}/{ds}.pdf",
    log:
        "results/logs/figure_sweep/{evalset}/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"title": f"{w.evalset} set, datastore {w.ds}"}),
    shell:
        "python -m workflow_scripts figure-sweep --params {params.p:q} --sweep {input.sweep} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws the figure of Δ = kNN-LM − base LM per task, grouped by category, with bootstrap intervals.
rule figure_tasks:
    input:
        table="results/tables/task_delta/{ds}.parquet",
    output:
        png=report(
            "results/figures/task_delta/{ds}.png",
            caption="../report/task_delta.rst",
            category="Tasks (paper 1)",
        ),
        pdf="results/figures/task_delta/{ds}.pdf",
    log:
        "results/logs/figure_tasks/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json(
            {"title": f"datastore {w.ds} (model {DATASTORES[w.ds]['model']})"}
        ),
    shell:
        "python -m workflow_scripts figure-tasks --params {params.p:q} --table {input.table} --png {output.png}"
        " --pdf {output.pdf} 2> {log}"


# Draws the Figure 1 analogue (paper 2, Macondo): log-likelihood by number of children, perfect log(1/n).
rule figure_macondo:
    input:
        table="results/tables/macondo.parquet",
    output:
        png=report(
            "results/figures/macondo.png",
            caption="../report/macondo.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        pdf="results/figures/macondo.pdf",
    log:
        "results/logs/figure_macondo/macondo.log",
    conda:
        "../envs/plotting.yaml"
    shell:
        "python -m workflow_scripts figure-macondo --table {input.table} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws the Figure 1 analogue (paper 2, Macondo): log-likelihood over fine-tuning steps, perfect log(1/n).
rule figure_macondo_curve:
    input:
        table="results/tables/macondo_curve.parquet",
    output:
        png=report(
            "results/figures/macondo_curve.png",
            caption="../report/macondo_curve.rst",
            category="Paper 2",
            subcategory="Macondo",
        ),
        pdf="results/figures/macondo_curve.pdf",
    log:
        "results/logs/figure_macondo_curve/macondo_curve.log",
    conda:
        "../envs/plotting.yaml"
    shell:
        "python -m workflow_scripts figure-macondo-curve --table {input.table} --png {output.png} --pdf {output.pdf}"
        " 2> {log}"


# Draws the hurdle curves (paper 2, Fig. 4 / Fig. 5 analogues) from their table.
rule figure_hurdle:
    input:
        table="results/tables/hurdle_{data}.parquet",
    output:
        png=report(
            "results/figures/hurdle_{data}.png",
            caption="../report/hurdle.rst",
            category="Paper 2",
            subcategory="MLP hurdle",
        ),
        pdf="results/figures/hurdle_{data}.pdf",
    log:
        "results/logs/figure_hurdle/{data}.log",
    wildcard_constraints:
        data="macondo|corpus",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json(
            {"column": HURDLE_COLUMNS[w.data], "title": HURDLE_TITLES[w.data]}
        ),
    shell:
        "python -m workflow_scripts figure-hurdle --params {params.p:q} --table {input.table} --png {output.png}"
        " --pdf {output.pdf} 2> {log}"


# Draws the projection figure (paper 2, Eq. 2) from its table.
rule figure_projection:
    input:
        table="results/tables/projection.parquet",
    output:
        png=report(
            "results/figures/projection.png",
            caption="../report/paper2_figures.rst",
            category="Paper 2",
            subcategory="Figures",
        ),
        pdf="results/figures/projection.pdf",
    log:
        "results/logs/figure_projection/projection.log",
    conda:
        "../envs/plotting.yaml"
    shell:
        "python -m workflow_scripts figure-projection --table {input.table} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws the MLP-LM figure (paper 2, §5) from its table.
rule figure_mlp:
    input:
        table="results/tables/mlp_lm.parquet",
    output:
        png=report(
            "results/figures/mlp_lm.png",
            caption="../report/paper2_figures.rst",
            category="Paper 2",
            subcategory="Figures",
        ),
        pdf="results/figures/mlp_lm.pdf",
    log:
        "results/logs/figure_mlp/mlp_lm.log",
    conda:
        "../envs/plotting.yaml"
    shell:
        "python -m workflow_scripts figure-mlp --table {input.table} --png {output.png} --pdf {output.pdf} 2> {log}"
