"""The environment every job runs with: set by the Snakefile (rules/common.smk) for the jobs it starts, locally or
through Slurm, and by benchmark measure 12.

glibc's malloc maps each block above its threshold on its own (the threshold rises only as such blocks are freed,
to 32 MiB at most) and hands freed memory at the heap's top back to the system, so the steps' batches of
activations and temporaries were page-faulted and zeroed by the kernel anew: about a tenth of the default run's CPU
time was that system time (extract_keys 21.7 of 81.8 CPU s). ``GLIBC_TUNABLES`` below serves blocks of up to 32 MiB
from the heap and keeps freed memory for the next allocation; the default run's largest process grew from 2.31 to
about 2.45 GB (docs/testing.md#the-default-runs-time).

No step imports this module, so it is in no step's code closure (``cli.code_closure``): the settings change how
fast a step computes, not what (the default run's tables are byte-identical with and without them), and changing
them reruns nothing. Elsewhere than glibc the variable is ignored; a ``GLIBC_TUNABLES`` of the user's own is kept.
"""

from __future__ import annotations

from collections.abc import Mapping

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=2147483647"


def job_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` for a job: those it does not set already."""
    return {} if "GLIBC_TUNABLES" in environ else {"GLIBC_TUNABLES": GLIBC_TUNABLES}
