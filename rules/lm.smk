# Language model: tokenizer and GPT-2-shaped LM trained from scratch, or a local / hub model described
# by its identity (weights and tokenizer hashes, hook point) in results/models/<model>/model.json.


# Makes the BPE tokenizer of a model trained here, from its training corpus.
rule train_tokenizer:
    input:
        train=lambda w: f"results/corpus/{MODELS[w.model]['train']['corpus']}/train.parquet",
    output:
        tokenizer_dir=directory("results/models/{model}/tokenizer"),
    log:
        "results/logs/train_tokenizer/{model}.log",
    benchmark:
        "results/benchmarks/train_tokenizer/{model}.tsv"
    wildcard_constraints:
        model=names_regex(TRAINED),
    threads: 2
    params:
        p=tokenizer_params,
    shell:
        step("tokenizer")


# Makes one int32 token stream per (model, corpus, split); documents are joined by EOS. Documents are read in
# batches and encoded in pieces of at most 1M characters (lm.tokenize_split): ~0.6 GB at peak for a 9 MB document,
# ~0.8 GB for a 54 MB one. A tokenizer for which pieces would change the ids (e.g. SentencePiece-style, Llama 2)
# encodes each document whole, ~200 bytes per character of the longest one: raise mem_mb with --set-resources.
rule tokenize:
    input:
        unpack(tokenizer_inputs),
        parquet="results/corpus/{corpus}/{split}.parquet",
    output:
        out="results/tokens/{model}/{corpus}/{split}.npy",
    log:
        "results/logs/tokenize/{model}/{corpus}/{split}.log",
    benchmark:
        "results/benchmarks/tokenize/{model}/{corpus}/{split}.tsv"
    params:
        prepare=prepare_arg,
    shell:
        step("tokenize", "{params.prepare}")


# Trains one chunk (1..n-1) of a model trained in chunks: its steps, from the previous chunk's checkpoint.
rule train_lm_chunk:
    input:
        unpack(train_inputs),
    output:
        checkpoint=temp("results/models/{model}/chunks/chunk_{chunk}.pt"),
    log:
        "results/logs/train_lm_chunk/{model}/{chunk}.log",
    benchmark:
        "results/benchmarks/train_lm_chunk/{model}/{chunk}.tsv"
    wildcard_constraints:
        model=names_regex(CHUNKED),
        chunk=r"\d{3}",
    threads: 2
    resources:
        runtime=lambda w: MODELS[w.model]["train"]["runtime"],
    params:
        p=lambda w: lm_train_params(w, stop=train_chunks(w.model)[int(w.chunk) - 1][1]),
    shell:
        step("train-lm")


# Trains the LM from scratch (or its last chunk); writes weights (safetensors), its loss log and its identity.
rule train_lm:
    input:
        unpack(train_inputs),
    output:
        **table("results/models/{model}/loss", "loss", "Language model", name="loss"),
        hf=directory("results/models/{model}/hf"),
        model_json="results/models/{model}/model.json",
    log:
        "results/logs/train_lm/{model}.log",
    benchmark:
        "results/benchmarks/train_lm/{model}.tsv"
    wildcard_constraints:
        model=names_regex(TRAINED),
    threads: 2
    resources:
        runtime=lambda w: MODELS[w.model]["train"]["runtime"],
    params:
        p=lm_train_params,
    shell:
        step("train-lm")


# Describes a local or hub model: where it loads from, weights and tokenizer hashes, hook point.
rule model_identity:
    output:
        model_json="results/models/{model}/model.json",
    log:
        "results/logs/model_identity/{model}.log",
    benchmark:
        "results/benchmarks/model_identity/{model}.tsv"
    wildcard_constraints:
        model=names_regex([m for m in MODELS if m not in TRAINED]),
    params:
        p=lambda w: as_json({"spec": MODELS[w.model]}),
    shell:
        step("model-identity")
