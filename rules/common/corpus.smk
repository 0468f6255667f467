# Helpers of rules/corpus.smk: the params and inputs its rules compute from the config.


def corpus_files(wildcards):
    """A local corpus's files, as inputs: documents appended to one (or a file added) rebuild the corpus."""
    spec = config["corpora"][wildcards.corpus]
    if spec["source"] != "local":
        return []
    files = spec["local"]["files"]
    out = [
        [f] if isinstance(f, str) else f
        for f in (files[s] for s in ("train", "valid", "test"))
    ]
    return list(dict.fromkeys(f for fs in out for f in fs))
