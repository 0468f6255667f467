# The datastore-size scaling study (docs/scaling.md): perplexity over the λ/k/σ grid and task Δ on the fraction-f
# subsets of a datastore (rows with u(row) < f), from its one retrieval cache and its task caches; positions short of
# subset neighbours are searched again in the subset. One job per (eval set, datastore, fraction), so adding a
# fraction runs only that fraction's jobs and the study's tables and figures.


# Makes a datastore from the fraction-f rows of another, copying its shards' rows (datastores.<d>.subsample).
rule subsample_datastore:
    input:
        parent=lambda w: f"results/datastores/{DATASTORES[w.ds]['subsample']['of']}/manifest.json",
        model_json=lambda w: model_json(DATASTORES[w.ds]["model"]),
        tokens=lambda w: ds_tokens(w.ds),
    output:
        out="results/datastores/{ds}/manifest.json",
        rows="results/datastores/{ds}/rows.npy",
        shards=directory("results/datastores/{ds}/subset"),
    log:
        "results/logs/subsample_datastore/{ds}.log",
    benchmark:
        "results/benchmarks/subsample_datastore/{ds}.tsv"
    wildcard_constraints:
        ds=names_regex(SUBSAMPLED),
    params:
        p=lambda w: as_json(DATASTORES[w.ds]["subsample"]),
    shell:
        step("subsample-datastore")


# Makes the perplexity grid of one eval set on the fraction-f subset of a datastore, from its retrieval cache.
rule scaling_sweep:
    input:
        cache_files=rules.retrieve.output,
        cache=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
    output:
        **table(f"{SCALING_DIR}/perplexity"),
        npz=f"{SCALING_DIR}/positions.npz",
        meta=f"{SCALING_DIR}/meta.json",
    log:
        "results/logs/scaling_sweep/{evalset}/{ds}/{fraction}.log",
    benchmark:
        "results/benchmarks/scaling_sweep/{evalset}/{ds}/{fraction}.tsv"
    threads: SEARCH_THREADS
    params:
        p=scaling_sweep_params,
    shell:
        step("scaling-sweep")


# Makes the scaling tables of a datastore: perplexity per fraction at the point chosen at that size, the grid, the
# log-linear fits with CIs, and the gain by how often the target occurs in the subset.
rule scaling_summary:
    input:
        sweeps=scaling_files("perplexity.parquet"),
        npz=scaling_files("positions.npz"),
        meta=scaling_files("meta.json"),
    output:
        **table(
            f"{SCALING_OUT}/perplexity",
            "scaling_perplexity",
            "Scaling",
            name="perplexity",
        ),
        **table(f"{SCALING_OUT}/grid", name="grid"),
        **table(f"{SCALING_OUT}/fits", "scaling_fits", "Scaling", name="fits"),
        **table(f"{SCALING_OUT}/frequency", name="frequency"),
    log:
        "results/logs/scaling_summary/{ds}.log",
    params:
        p=scaling_summary_params,
    shell:
        step("scaling-summary")


# Makes task Δ = kNN-LM − base LM at every fraction of a datastore, per task and category, with CIs and fits.
rule scaling_tasks:
    input:
        npz=scaling_task_files(f"{TASK}/scored.npz"),
        scored_json=scaling_task_files(f"{TASK}/scored.json"),
        task_items=scaling_task_files("results/task_data/{task}.parquet"),
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        perplexity=f"{SCALING_OUT}/perplexity.parquet",
    output:
        **table(f"{SCALING_OUT}/task_delta", "scaling_tasks", "Scaling", name="delta"),
        **table(f"{SCALING_OUT}/task_fits", name="fits"),
    log:
        "results/logs/scaling_tasks/{ds}.log",
    benchmark:
        "results/benchmarks/scaling_tasks/{ds}.tsv"
    threads: SEARCH_THREADS
    params:
        p=scaling_tasks_params,
    shell:
        step("scaling-tasks")


# Draws perplexity against datastore tokens (log x): the kNN-LM at each size's chosen point, the base LM, the fits.
rule figure_scaling_perplexity:
    input:
        table=f"{SCALING_OUT}/perplexity.parquet",
        fits=f"{SCALING_OUT}/fits.parquet",
    output:
        **scaling_figure("perplexity", "scaling_perplexity", "perplexity"),
    log:
        "results/logs/figure_scaling_perplexity/{ds}.log",
    params:
        p=lambda w: title(f"datastore {w.ds}: perplexity against its size"),
    shell:
        step("figure-scaling-perplexity")


# Draws task Δ against datastore tokens per category, with 95% CIs and the fits.
rule figure_scaling_tasks:
    input:
        table=f"{SCALING_OUT}/task_delta.parquet",
        fits=f"{SCALING_OUT}/task_fits.parquet",
    output:
        **scaling_figure("tasks", "scaling_tasks", "task delta"),
    log:
        "results/logs/figure_scaling_tasks/{ds}.log",
    params:
        p=lambda w: title(f"datastore {w.ds}: task Δ against its size"),
    shell:
        step("figure-scaling-tasks")


# Draws the perplexity gain by how often the target occurs in the datastore, at each size.
rule figure_scaling_frequency:
    input:
        table=f"{SCALING_OUT}/frequency.parquet",
    output:
        **scaling_figure("frequency", "scaling_frequency", "gain by target frequency"),
    log:
        "results/logs/figure_scaling_frequency/{ds}.log",
    params:
        p=lambda w: title(f"datastore {w.ds}: where the gain comes from"),
    shell:
        step("figure-scaling-frequency")
