"""``python -m workflow_scripts <step> [--help]``: run one step of the pipeline (see ``cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
