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
    conda:
        "../envs/pipeline.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=12 * 60,
        gpu=GPU,
    params:
        p=hurdle_params,
        test=optional_arg("test"),
        tokens=optional_arg("tokens"),
    shell:
        "python -m workflow_scripts hurdle --params {params.p:q} --threads {threads} --tokenizer-dir {input.tokenizer_dir}"
        " {params.test} {params.tokens} --csv {output.csv} --parquet {output.parquet} 2> {log}"


# Makes the hurdle curves (Fig. 4 / Fig. 5 analogues) and their table.
rule hurdle_table:
    input:
        scores=lambda w: expand(
            "results/analyses/hurdle/{data}/{variant}_seed{seed}.parquet",
            data=w.data,
            variant=HURDLE_VARIANTS,
            seed=HURDLE["seeds"],
        ),
    output:
        csv=report(
            "results/tables/hurdle_{data}.csv",
            caption="../report/hurdle.rst",
            category="Paper 2",
            subcategory="MLP hurdle",
        ),
        parquet="results/tables/hurdle_{data}.parquet",
        png=report(
            "results/figures/hurdle_{data}.png",
            caption="../report/hurdle.rst",
            category="Paper 2",
            subcategory="MLP hurdle",
        ),
        pdf="results/figures/hurdle_{data}.pdf",
    log:
        "results/logs/hurdle_table/{data}.log",
    wildcard_constraints:
        data="macondo|corpus",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json(
            {
                "column": "children_loglik" if w.data == "macondo" else "train_loss",
                "title": (
                    "Macondo test set: children's log-likelihood while training from scratch"
                    if w.data == "macondo"
                    else "Default corpus: training loss from scratch"
                ),
            }
        ),
    shell:
        "python -m workflow_scripts hurdle-table --params {params.p:q} --scores {input.scores} --csv {output.csv}"
        " --parquet {output.parquet} --png {output.png} --pdf {output.pdf} 2> {log}"
