# Figures: PNG + PDF from cached tables, registered in the report. `snakemake figures` redraws them all.


# Makes the perplexity-vs-λ figure of one (eval set, datastore).
rule figure_sweep:
    input:
        sweep="results/sweeps/{evalset}/{ds}/perplexity.parquet",
    output:
        **figure(
            SWEEP_FIGURE, "perplexity_vs_lambda", "Perplexity", "Figures", SWEEP_LABELS
        ),
    log:
        "results/logs/figure_sweep/{evalset}/{ds}.log",
    params:
        p=lambda w: as_json({"title": f"{w.evalset} set, datastore {w.ds}"}),
    shell:
        step("figure-sweep")


# Draws the figure of Δ = kNN-LM − base LM per task, grouped by category, with bootstrap intervals.
rule figure_tasks:
    input:
        table="results/tables/task_delta/{ds}.parquet",
    output:
        **figure("task_delta/{ds}", "task_delta", "Tasks (paper 1)"),
    log:
        "results/logs/figure_tasks/{ds}.log",
    params:
        p=lambda w: title(f"datastore {w.ds} (model {DATASTORES[w.ds]['model']})"),
    shell:
        step("figure-tasks")


# Draws the Figure 1 analogue (paper 2, Macondo): log-likelihood by number of children, perfect log(1/n).
rule figure_macondo:
    input:
        table="results/tables/macondo.parquet",
    output:
        **figure("macondo", "macondo", "Paper 2", "Macondo"),
    log:
        "results/logs/figure_macondo/macondo.log",
    shell:
        step("figure-macondo")


# Draws the Figure 1 analogue (paper 2, Macondo): log-likelihood over fine-tuning steps, perfect log(1/n).
rule figure_macondo_curve:
    input:
        table="results/tables/macondo_curve.parquet",
    output:
        **figure("macondo_curve", "macondo_curve", "Paper 2", "Macondo"),
    log:
        "results/logs/figure_macondo_curve/macondo_curve.log",
    shell:
        step("figure-macondo-curve")


# Draws the hurdle curves (paper 2, Fig. 4 / Fig. 5 analogues) from their table.
rule figure_hurdle:
    input:
        table="results/tables/hurdle_{data}.parquet",
    output:
        **figure("hurdle_{data}", "hurdle", "Paper 2", "MLP hurdle"),
    log:
        "results/logs/figure_hurdle/{data}.log",
    wildcard_constraints:
        data="macondo|corpus",
    params:
        p=lambda w: as_json(
            {"column": HURDLE_COLUMNS[w.data], "title": HURDLE_TITLES[w.data]}
        ),
    shell:
        step("figure-hurdle")


# Draws the projection figure (paper 2, Eq. 2) from its table.
rule figure_projection:
    input:
        table="results/tables/projection.parquet",
    output:
        **figure("projection", "paper2_figures", "Paper 2", "Figures"),
    log:
        "results/logs/figure_projection/projection.log",
    shell:
        step("figure-projection")


# Draws the MLP-LM figure (paper 2, §5) from its table.
rule figure_mlp:
    input:
        table="results/tables/mlp_lm.parquet",
    output:
        **figure("mlp_lm", "paper2_figures", "Paper 2", "Figures"),
    log:
        "results/logs/figure_mlp/mlp_lm.log",
    shell:
        step("figure-mlp")
