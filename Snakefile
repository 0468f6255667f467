# knnlm-limits: the limits of kNN-augmented language models, from corpus to tables, figures and report.
# README.md has the commands and the map from rule files to modules; docs/ the rest.
from snakemake.utils import min_version

min_version("8.20")


# config.yaml is the config only when no `--configfile` is given: a user's config file replaces it, in the main
# process and in every cluster job alike. (A Slurm job's Snakemake gets the user's files as `--configfiles` but reads
# no profile, so profiles/default's `replace-workflow-config` would not reach it: a `configfile:` directive run there
# would merge config.yaml's sections into the user's config.)
if not workflow.overwrite_configfiles:

    configfile: "config.yaml"


report: "report/workflow.rst"


# the backbone: corpus -> tokens -> LM -> datastore -> index -> retrieval -> sweep -> tables and figures
include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/lm.smk"
include: "rules/datastore.smk"
include: "rules/index.smk"
include: "rules/retrieval.smk"
include: "rules/sweep.smk"
include: "rules/figures.smk"
# paper 1's evaluation (workflow_scripts/tasks/)
include: "rules/tasks.smk"
# what the datastore returned: neighbours of eval positions and task items (workflow_scripts/neighbours.py)
include: "rules/neighbours.smk"
# the datastore-size scaling study (workflow_scripts/scaling.py, tasks/scaling.py)
include: "rules/scaling.smk"
# in-context retrieval beside the kNN-LM (workflow_scripts/incontext.py, tasks/incontext.py)
include: "rules/incontext.smk"
# paper 2's analyses (workflow_scripts/analyses/)
include: "rules/macondo.smk"
include: "rules/projection.smk"
include: "rules/mlp.smk"
include: "rules/hurdle.smk"
include: "rules/compare.smk"
# what a run produces: all, figures, stage_times; wildcard constraints, local rules
include: "rules/summary.smk"
# docs/results.md from the tables
include: "rules/docs.smk"


wire_steps(workflow.rules)
profile_resources(workflow.rules)


onstart:
    refuse_missing_cuda()


rule all:
    default_target: True
    input:
        all_outputs(),
