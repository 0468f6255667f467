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
    conda:
        "../envs/pipeline.yaml"
    resources:
        mem_mb=4000,
        runtime=60,
    params:
        p=lambda w: as_json(
            {"spec": config["corpora"][w.corpus], "seed": config["seed"]}
        ),
    shell:
        "python -m workflow_scripts corpus --params {params.p:q} --train {output.train} --valid {output.valid}"
        " --test {output.test} --world {output.world} 2> {log}"
