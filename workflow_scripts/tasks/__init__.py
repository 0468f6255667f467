"""Paper 1's evaluation: the task registry, the offline suite, scoring and the per-task stages."""
