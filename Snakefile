# knnlm-limits: the limits of kNN-augmented language models, from corpus to tables, figures and report.
# Read README.md for the commands and DESIGN.md (in shared/) for the architecture and artifact contracts.
from snakemake.utils import min_version

min_version("8.20")


configfile: "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/corpus.smk"
include: "rules/lm.smk"
include: "rules/datastore.smk"
include: "rules/index.smk"
include: "rules/retrieval.smk"
include: "rules/sweep.smk"
include: "rules/figures.smk"
include: "rules/tasks.smk"
include: "rules/analyses.smk"


rule all:
    default_target: True
    input:
        all_outputs(),
