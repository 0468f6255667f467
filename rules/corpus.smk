# Corpus: generate, or load local files or a Hugging Face dataset, into train/valid/test parquet files.


rule corpus:
    input:
        corpus_files,  # a local corpus's files; none for generate and hf
    output:
        train="results/corpus/{corpus}/train.parquet",
        valid="results/corpus/{corpus}/valid.parquet",
        test="results/corpus/{corpus}/test.parquet",
        world="results/corpus/{corpus}/world.json",
    log:
        "results/logs/corpus/{corpus}.log",
    benchmark:
        "results/benchmarks/corpus/{corpus}.tsv"
    params:
        p=lambda w: as_json(
            {"spec": config["corpora"][w.corpus], "seed": config["seed"]}
        ),
    shell:
        step("corpus")
