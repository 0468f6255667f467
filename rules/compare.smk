# Paper 2 side by side (workflow_scripts/analyses/compare.py): every number of ours beside the paper's.


# Makes the side-by-side table: every number of ours beside the paper's, with the setup of each.
rule paper2_comparison:
    input:
        **paper2_inputs(),
    output:
        **table("results/tables/paper2_comparison", "paper2_comparison", "Paper 2"),
    log:
        "results/logs/paper2_comparison/paper2_comparison.log",
    params:
        p=lambda w: as_json({"analyses": ANALYSES}),  # a function: the config has braces
    shell:
        step("paper2-comparison")
