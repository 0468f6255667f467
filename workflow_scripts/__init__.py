"""knnlm-limits: the importable logic behind the Snakemake workflow.

Each stage is a function in its own module plus a small CLI registered in ``__main__`` so that every step
runs without Snakemake: ``python -m workflow_scripts <step> --help``.
"""
