# Paper 2, App. E (workflow_scripts/analyses/hurdle.py): LMs trained from scratch with and without their last
# MLP, on the Macondo test sentences and on the default corpus.
# Trains two randomly initialised LMs of one seed, with and without the last MLP, one after the other in one job
# (torch and transformers start once), logging children's log-likelihood (Macondo) or the training loss (corpus) at
# fixed step intervals (paper 2, App. E).


rule hurdle:
    input:
        unpack(hurdle_data),
        tokenizer_dir=lambda w: f"results/models/{HURDLE['model']}/tokenizer",
    output:
        parquet=hurdle_variants("parquet"),
        csv=hurdle_variants("csv"),
    log:
        "results/logs/hurdle/{data}/seed{seed}.log",
    benchmark:
        "results/benchmarks/hurdle/{data}/seed{seed}.tsv"
    wildcard_constraints:
        data="macondo|corpus",
    threads: 1
    params:
        p=hurdle_params,
    shell:
        step("hurdle")


# Makes the table of the hurdle curves (Fig. 4 / Fig. 5 analogues): mean and std over seeds per step.
rule hurdle_table:
    input:
        scores=hurdle_runs,
    output:
        **table("results/tables/hurdle_{data}", "hurdle", "Paper 2", "MLP hurdle"),
    log:
        "results/logs/hurdle_table/{data}.log",
    wildcard_constraints:
        data="macondo|corpus",
    params:
        p=lambda w: as_json({"column": HURDLE_COLUMNS[w.data]}),
    shell:
        step("hurdle-table")
