"""knnlm-limits: the importable logic behind the Snakemake workflow.

Three wings: the backbone (this package's modules: corpus to perplexity tables), ``tasks`` (paper 1's
evaluation) and ``analyses`` (paper 2). The backbone imports neither wing; ``tasks`` does not import
``analyses``. Every step runs without Snakemake: ``python -m workflow_scripts <step> --help``.
"""
