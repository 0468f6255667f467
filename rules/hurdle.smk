# Paper 2, App. E (workflow_scripts/analyses/hurdle.py): LMs trained from scratch with and without their last
# MLP, on the Macondo test sentences and on the default corpus.
# Trains one randomly initialised LM, with or without its last MLP, logging children's log-likelihood
# (Macondo) or the training loss (corpus) at fixed step intervals (paper 2, App. E).


rule hurdle:
    input:
        unpack(hurdle_data),
        tokenizer_dir=lambda w: f"results/models/{HURDLE['model']}/tokenizer",
    output:
        parquet="results/analyses/hurdle/{data}/{variant}_seed{seed}.parquet",
        csv="results/analyses/hurdle/{data}/{variant}_seed{seed}.csv",
    log:
        "results/logs/hurdle/{data}/{variant}_seed{seed}.log",
    benchmark:
        "results/benchmarks/hurdle/{data}/{variant}_seed{seed}.tsv"
    wildcard_constraints:
        data="macondo|corpus",
        variant="full|no_last_mlp",
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
