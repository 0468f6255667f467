# Paper 2 side by side (workflow_scripts/analyses/compare.py): every number of ours beside the paper's.


# Makes the side-by-side table: every number of ours beside the paper's, with the setup of each.
rule paper2_comparison:
    input:
        **paper2_inputs(),
    output:
        csv=report(
            "results/tables/paper2_comparison.csv",
            caption="../report/paper2_comparison.rst",
            category="Paper 2",
        ),
        parquet="results/tables/paper2_comparison.parquet",
    log:
        "results/logs/paper2_comparison/paper2_comparison.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"analyses": ANALYSES}),  # a function: the config has braces
        tables=input_args,
    shell:
        "python -m workflow_scripts paper2-comparison --params {params.p:q} {params.tables} --csv {output.csv}"
        " --parquet {output.parquet} 2> {log}"
