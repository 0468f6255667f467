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
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=6 * 60,  # reads and hashes the parent's shards, as datastore_manifest does
    params:
        p=lambda w: as_json(DATASTORES[w.ds]["subsample"]),
    shell:
        "python -m workflow_scripts subsample-datastore --params {params.p:q} --parent {input.parent}"
        " --model-json {input.model_json} --tokens {input.tokens} --out {output.out} 2> {log}"


# Makes the perplexity grid of one eval set on the fraction-f subset of a datastore, from its retrieval cache.
rule scaling_sweep:
    input:
        cache=rules.retrieve.output,
        cache_meta=rules.retrieve.output.meta,
        manifest="results/datastores/{ds}/manifest.json",
        tokens=lambda w: eval_tokens(w.evalset, w.ds),
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
    output:
        npz="results/scaling/{evalset}/{ds}/{fraction}/positions.npz",
        csv="results/scaling/{evalset}/{ds}/{fraction}/perplexity.csv",
        parquet="results/scaling/{evalset}/{ds}/{fraction}/perplexity.parquet",
        meta="results/scaling/{evalset}/{ds}/{fraction}/meta.json",
    log:
        "results/logs/scaling_sweep/{evalset}/{ds}/{fraction}.log",
    benchmark:
        "results/benchmarks/scaling_sweep/{evalset}/{ds}/{fraction}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=20 * 60,  # the second search: up to a retrieval's cost times the fraction
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            {
                "fraction": float(w.fraction),
                "seed": SCALING["seed"],
                "grid": {k: config["sweep"][k] for k in ("lambdas", "ks", "sigmas")},
                **search_params(),
            }
        ),
    shell:
        "python -m workflow_scripts scaling-sweep --params {params.p:q} --threads {params.threads} --cache {input.cache_meta}"
        " --manifest {input.manifest} --tokens {input.tokens} --index {input.index} --index-meta {input.index_meta} --npz {output.npz}"
        " --csv {output.csv} --parquet {output.parquet} --meta {output.meta} 2> {log}"


SCALING_RUNS = [(e, f) for e in sorted(EVAL_SETS) for f in SCALING_FRACTIONS]


# Makes the scaling tables of a datastore: perplexity per fraction at the point chosen at that size, the grid, the
# log-linear fits with CIs, and the gain by how often the target occurs in the subset.
rule scaling_summary:
    input:
        sweeps=[
            f"results/scaling/{e}/{{ds}}/{f}/perplexity.parquet"
            for e, f in SCALING_RUNS
        ],
        npz=[f"results/scaling/{e}/{{ds}}/{f}/positions.npz" for e, f in SCALING_RUNS],
        meta=[f"results/scaling/{e}/{{ds}}/{f}/meta.json" for e, f in SCALING_RUNS],
    output:
        perplexity_csv=report(
            "results/tables/scaling/{ds}/perplexity.csv",
            caption="../report/scaling_perplexity.rst",
            category="Scaling",
        ),
        perplexity_parquet="results/tables/scaling/{ds}/perplexity.parquet",
        grid_csv="results/tables/scaling/{ds}/grid.csv",
        grid_parquet="results/tables/scaling/{ds}/grid.parquet",
        fits_csv=report(
            "results/tables/scaling/{ds}/fits.csv",
            caption="../report/scaling_fits.rst",
            category="Scaling",
        ),
        fits_parquet="results/tables/scaling/{ds}/fits.parquet",
        frequency_csv="results/tables/scaling/{ds}/frequency.csv",
        frequency_parquet="results/tables/scaling/{ds}/frequency.parquet",
    log:
        "results/logs/scaling_summary/{ds}.log",
    conda:
        "../envs/pipeline.yaml"
    params:
        p=lambda w: as_json(
            {
                "keys": SCALING_RUNS,
                "datastore": w.ds,
                "select_on": select_on(w.ds),
                "seed": config["seed"],
                "n_boot": SCALING["n_boot"],
                "block_size": config["extraction"]["block_size"],
            }
        ),
        tables=input_args,
    shell:
        "python -m workflow_scripts scaling-summary --params {params.p:q} {params.tables}"
        " --perplexity-csv {output.perplexity_csv} --perplexity-parquet {output.perplexity_parquet}"
        " --grid-csv {output.grid_csv} --grid-parquet {output.grid_parquet} --fits-csv {output.fits_csv}"
        " --fits-parquet {output.fits_parquet} --frequency-csv {output.frequency_csv}"
        " --frequency-parquet {output.frequency_parquet} 2> {log}"


# Makes task Δ = kNN-LM − base LM at every fraction of a datastore, per task and category, with CIs and fits.
rule scaling_tasks:
    input:
        npz=lambda w: [
            f"results/tasks/{w.ds}/{t}/scored.npz" for t in scaling_tasks_of(w.ds)
        ],
        scored_json=lambda w: [
            f"results/tasks/{w.ds}/{t}/scored.json" for t in scaling_tasks_of(w.ds)
        ],
        task_items=lambda w: [
            f"results/task_data/{t}.parquet" for t in scaling_tasks_of(w.ds)
        ],
        manifest="results/datastores/{ds}/manifest.json",
        index="results/datastores/{ds}/index.faiss",
        index_meta="results/datastores/{ds}/index.json",
        perplexity="results/tables/scaling/{ds}/perplexity.parquet",
    output:
        delta_csv=report(
            "results/tables/scaling/{ds}/task_delta.csv",
            caption="../report/scaling_tasks.rst",
            category="Scaling",
        ),
        delta_parquet="results/tables/scaling/{ds}/task_delta.parquet",
        fits_csv="results/tables/scaling/{ds}/task_fits.csv",
        fits_parquet="results/tables/scaling/{ds}/task_fits.parquet",
    log:
        "results/logs/scaling_tasks/{ds}.log",
    benchmark:
        "results/benchmarks/scaling_tasks/{ds}.tsv"
    conda:
        "../envs/pipeline.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=20 * 60,
    params:
        threads=ARITHMETIC_THREADS,
        p=lambda w: as_json(
            {
                "datastore": w.ds,
                "model": DATASTORES[w.ds]["model"],
                "entries": {t: task_entry(t) for t in scaling_tasks_of(w.ds)},
                "point": TASK_POINTS.get(w.ds),
                "seed": config["seed"],
                "scaling_seed": SCALING["seed"],
                "n_boot": SCALING["n_boot"],
                **search_params(),
            }
        ),
        tables=input_args,
    shell:
        "python -m workflow_scripts scaling-tasks --params {params.p:q} --threads {params.threads} {params.tables}"
        " --delta-csv {output.delta_csv} --delta-parquet {output.delta_parquet} --fits-csv {output.fits_csv}"
        " --fits-parquet {output.fits_parquet} 2> {log}"


# Draws perplexity against datastore tokens (log x): the kNN-LM at each size's chosen point, the base LM, the fits.
rule figure_scaling_perplexity:
    input:
        table="results/tables/scaling/{ds}/perplexity.parquet",
        fits="results/tables/scaling/{ds}/fits.parquet",
    output:
        png=report(
            "results/figures/scaling/{ds}/perplexity.png",
            caption="../report/scaling_perplexity.rst",
            category="Scaling",
            labels={"figure": "perplexity", "datastore": "{ds}"},
        ),
        pdf="results/figures/scaling/{ds}/perplexity.pdf",
    log:
        "results/logs/figure_scaling_perplexity/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"title": f"datastore {w.ds}: perplexity against its size"}),
    shell:
        "python -m workflow_scripts figure-scaling-perplexity --params {params.p:q} --table {input.table}"
        " --fits {input.fits} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws task Δ against datastore tokens per category, with 95% CIs and the fits.
rule figure_scaling_tasks:
    input:
        table="results/tables/scaling/{ds}/task_delta.parquet",
        fits="results/tables/scaling/{ds}/task_fits.parquet",
    output:
        png=report(
            "results/figures/scaling/{ds}/tasks.png",
            caption="../report/scaling_tasks.rst",
            category="Scaling",
            labels={"figure": "task delta", "datastore": "{ds}"},
        ),
        pdf="results/figures/scaling/{ds}/tasks.pdf",
    log:
        "results/logs/figure_scaling_tasks/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"title": f"datastore {w.ds}: task Δ against its size"}),
    shell:
        "python -m workflow_scripts figure-scaling-tasks --params {params.p:q} --table {input.table}"
        " --fits {input.fits} --png {output.png} --pdf {output.pdf} 2> {log}"


# Draws the perplexity gain by how often the target occurs in the datastore, at each size.
rule figure_scaling_frequency:
    input:
        table="results/tables/scaling/{ds}/frequency.parquet",
    output:
        png=report(
            "results/figures/scaling/{ds}/frequency.png",
            caption="../report/scaling_frequency.rst",
            category="Scaling",
            labels={"figure": "gain by target frequency", "datastore": "{ds}"},
        ),
        pdf="results/figures/scaling/{ds}/frequency.pdf",
    log:
        "results/logs/figure_scaling_frequency/{ds}.log",
    conda:
        "../envs/plotting.yaml"
    params:
        p=lambda w: as_json({"title": f"datastore {w.ds}: where the gain comes from"}),
    shell:
        "python -m workflow_scripts figure-scaling-frequency --params {params.p:q} --table {input.table}"
        " --png {output.png} --pdf {output.pdf} 2> {log}"
