# docs/results.md (workflow_scripts/results_doc.py): the result tables the docs quote, written from the run's
# tables. Not part of `all` (it writes a tracked file): `snakemake --cores 1 results_doc` after a run.


# Writes docs/results.md from the tables of this run.
rule results_doc:
    input:
        unpack(results_doc_inputs),
    output:
        out="docs/results.md",
    log:
        "results/logs/results_doc/results_doc.log",
    params:
        p=lambda w: as_json({"config": ", ".join(configfile_names())}),
    shell:
        step("results-doc")
