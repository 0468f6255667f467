"""Paper 2's analyses: Macondo, the Eq. 2 projection, the MLP replacement, the MLP hurdle, the comparison."""
