# Helpers of rules/lm.smk: the params and inputs its rules compute from the config.


def tokenizer_inputs(wildcards):
    """A model trained here is tokenized with its trained tokenizer; others with their own."""
    if wildcards.model in TRAINED:
        return {"tokenizer_dir": f"results/models/{wildcards.model}/tokenizer"}
    return {"model_json": model_json(wildcards.model)}


def tokenizer_params(wildcards):
    train = MODELS[wildcards.model]["train"]
    # start_token only when on, so that existing tokenizers keep their params
    start = {"start_token": True} if train.get("start_token") else {}
    return as_json({"vocab_size": train["vocab_size"], **start})


def prepare_arg(wildcards):
    """The corpus's text preparation (corpora.<c>.prepare) unless it is row_eos, the default, whose jobs' params are
    those from before the choice existed."""
    prepare = config["corpora"][wildcards.corpus]["prepare"]
    return "" if prepare == "row_eos" else f"--prepare {shlex.quote(prepare)}"


def train_spec(model):
    """The training config as the outputs depend on it: how it is split into jobs is left out."""
    return {k: v for k, v in MODELS[model]["train"].items() if k not in CHUNK_KEYS}


# Training in chunks (models.<m>.train.chunk_steps): chunks 1..n-1 are `train_lm_chunk` jobs, each resuming the
# previous chunk's checkpoint (weights, optimizer and RNG states; temporary files); the last chunk is `train_lm`,
# which writes the same outputs as one uninterrupted run. Every training job asks for train.runtime minutes.


def lm_train_params(wildcards, stop=None):
    """What training depends on (for a chunk but the last, the step it stops at)."""
    p = {"train": train_spec(wildcards.model), "seed": config["seed"]}
    return as_json(p | ({"stop": stop} if stop is not None else {}))


def train_chunks(model):
    t = MODELS[model]["train"]
    return training_chunks(t["steps"], t.get("chunk_steps"))


def chunk_ckpt(model, i):
    return f"results/models/{model}/chunks/chunk_{i:03d}.pt"


def train_inputs(wildcards):
    """Tokenizer and token streams; when resuming, the previous chunk's checkpoint."""
    m = wildcards.model
    corpus = MODELS[m]["train"]["corpus"]
    i = int(wildcards.chunk) if "chunk" in wildcards.keys() else len(train_chunks(m))
    inputs = {
        "tokenizer_dir": f"results/models/{m}/tokenizer",
        "train": f"results/tokens/{m}/{corpus}/train.npy",
        "valid": f"results/tokens/{m}/{corpus}/valid.npy",
    }
    if i > 1:
        inputs["resume"] = chunk_ckpt(m, i - 1)
    return inputs


CHUNKED = [m for m in TRAINED if len(train_chunks(m)) > 1]


# every model trained here is trained, but one only the MLP hurdle names: it gives the hurdle its shape and
# tokenizer (App. E trains its LMs from scratch)
_hurdle_only = (
    {(HURDLE or {}).get("model")}
    - {d["model"] for d in DATASTORES.values()}
    - {(MACONDO or {}).get("model")}
)


TRAINED_AND_USED = [m for m in TRAINED if m not in _hurdle_only]
