# What the datastore returned (workflow_scripts/neighbours.py, tasks/neighbours.py): eval positions and task items
# with their nearest neighbours, each neighbour mapped back to its position in the datastore corpus.


# Makes the table of the eval positions where the kNN-LM gains and loses most, with their neighbours.
rule eval_neighbours:
    input:
        cache=lambda w: [
            f"results/retrieval/{e}/{w.ds}/meta.json" for e in sorted(EVAL_SETS)
        ],
        eval_tokens=lambda w: [eval_tokens(e, w.ds) for e in sorted(EVAL_SETS)],
        manifest="results/datastores/{ds}/manifest.json",
        ds_tokens=lambda w: ds_tokens(w.ds),
        parents=neighbour_parents,
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        summary="results/sweeps/summary.csv",
    output:
        csv=report(
            "results/tables/eval_neighbours/{ds}.csv",
            caption="../report/eval_neighbours.rst",
            category="Perplexity",
        ),
        parquet="results/tables/eval_neighbours/{ds}.parquet",
    log:
        "results/logs/eval_neighbours/{ds}.log",
    benchmark:
        "results/benchmarks/eval_neighbours/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        p=lambda w: neighbour_params(w, eval_sets=sorted(EVAL_SETS)),
        args=lambda w, input, output: step_args(input, output),
    shell:
        "python -m workflow_scripts eval-neighbours --params {params.p:q} {params.args} 2> {log}"


# Makes the table of the task items task_examples picks (kNN-LM right, base LM wrong) and the reverse, with their
# neighbours, and the table of how often the neighbours' values are the gold token, by its datastore frequency.
rule task_neighbours:
    input:
        **{
            name: (
                lambda w, name=name, f=f: [
                    f.format(ds=w.ds, task=t) for t in neighbour_tasks(w.ds)
                ]
            )
            for name, f in {
                "npz": "results/tasks/{ds}/{task}/scored.npz",
                "scored_json": "results/tasks/{ds}/{task}/scored.json",
                "task_items": "results/task_data/{task}.parquet",
                "summary": "results/tasks/{ds}/{task}/summary.json",
                "predictions": "results/tasks/{ds}/{task}/predictions.parquet",
            }.items()
        },
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: ds_tokens(w.ds),
        parents=neighbour_parents,
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
    output:
        csv=report(
            "results/tables/task_neighbours/{ds}.csv",
            caption="../report/task_neighbours.rst",
            category="Tasks (paper 1)",
        ),
        parquet="results/tables/task_neighbours/{ds}.parquet",
        gold_csv="results/tables/neighbour_gold/{ds}.csv",
        gold_parquet="results/tables/neighbour_gold/{ds}.parquet",
    log:
        "results/logs/task_neighbours/{ds}.log",
    benchmark:
        "results/benchmarks/task_neighbours/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        p=lambda w: neighbour_params(w, seed=config["seed"]),
        args=lambda w, input, output: step_args(input, output),
    shell:
        "python -m workflow_scripts task-neighbours --params {params.p:q} {params.args} 2> {log}"


# Draws how often the neighbours' values are the gold token against its frequency in the datastore, memory vs
# reasoning tasks (paper 1's failure analysis).
rule figure_neighbour_gold:
    input:
        table="results/tables/neighbour_gold/{ds}.parquet",
    output:
        png=report(
            "results/figures/neighbour_gold/{ds}.png",
            caption="../report/neighbour_gold.rst",
            category="Tasks (paper 1)",
        ),
        pdf="results/figures/neighbour_gold/{ds}.pdf",
    log:
        "results/logs/figure_neighbour_gold/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json(
            {"title": f"datastore {w.ds} (model {DATASTORES[w.ds]['model']})"}
        ),
    shell:
        "python -m workflow_scripts figure-neighbour-gold --params {params.p:q} --table {input.table}"
        " --png {output.png} --pdf {output.pdf} 2> {log}"
