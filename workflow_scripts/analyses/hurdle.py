"""Paper 2, App. E: the "MLP hurdle". Two randomly initialised LMs of the same shape, one with the last block's
MLP removed (its output replaced by zeros, so the residual passes through), trained by the same loop
(``lm.fit``) on the same batches: on the Macondo test sentences, logging the children's log-likelihood
(Fig. 4 analogue), and on the default corpus, logging the training loss (Fig. 5 analogue).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl
import torch

from .. import lm
from ..artifacts import load_npy, write_table
from ..cli import step
from ..forward import find_hook_point, forward_scored
from . import macondo

log = logging.getLogger(__name__)


class _Zero(torch.nn.Module):
    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


def remove_last_mlp(model) -> None:
    """Replace the last block's MLP with zeros (the block keeps its attention and residual)."""
    parent, name = find_hook_point(model).rsplit(".", 1)
    setattr(model.get_submodule(parent), name, _Zero())


def new_model(tok, shape: dict, variant: str, n_positions: int, seed: int):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(lm.gpt2_config(tok, {**shape, "dropout": 0.0}, n_positions))
    if variant == "no_last_mlp":
        remove_last_mlp(model)
    elif variant != "full":
        raise ValueError(f"variant {variant!r}: expected full or no_last_mlp")
    return model


def children_loglik(model, seqs, starts) -> float:
    """Mean over test items of log p(child tokens | "[villager], is the parent of")."""
    return float(np.mean([float(lp.sum()) for _, _, lp in _scored(model, seqs, starts)]))


def _scored(model, seqs, starts):
    return forward_scored(model, find_hook_point(model), seqs, starts, 64)


def train_macondo(tokenizer_dir, test_parquet, shape: dict, p: dict, variant: str, seed: int, csv, parquet):
    """Train on the Macondo test sentences; log children's log-likelihood every ``log_every`` steps."""
    tok = lm.tokenizer_of(tokenizer_dir)
    test = pl.read_parquet(test_parquet)
    seqs_train = macondo.encode_sentences(tok, test["text"].to_list())
    seqs, starts = macondo.test_pairs(tok, test)
    model = new_model(tok, shape, variant, max(len(s) for s in seqs_train) + 1, seed)
    rng = np.random.default_rng(seed)
    rows = lm.fit(
        model,
        macondo.sentence_batches(seqs_train, p["batch_size"], tok.eos_token_id, rng),
        p,
        f"hurdle macondo {variant}",
        on_log=lambda step, m: {"children_loglik": children_loglik(m, seqs, starts)},
    )
    df = pl.DataFrame(rows).with_columns(pl.lit(variant).alias("variant"), pl.lit(seed).alias("seed"))
    write_table(df, csv, parquet)
    return df


def train_corpus(tokenizer_dir, train_npy, shape: dict, p: dict, variant: str, seed: int, csv, parquet):
    """Train on the corpus token stream; log the training loss every ``log_every`` steps."""
    tok = lm.tokenizer_of(tokenizer_dir)
    stream = load_npy(train_npy, dtype=np.int32, ndim=1)
    model = new_model(tok, shape, variant, p["block_size"], seed)
    rows = lm.fit(
        model,
        lm.stream_batches(stream, p["batch_size"], p["block_size"], np.random.default_rng(seed)),
        p,
        f"hurdle corpus {variant}",
    )
    df = pl.DataFrame(rows).with_columns(pl.lit(variant).alias("variant"), pl.lit(seed).alias("seed"))
    write_table(df, csv, parquet)
    return df



# --------------------------------------------------------------------------------------------- steps
@step
def hurdle(
    params: dict, tokenizer_dir: Path, csv: list[Path], parquet: list[Path], test: Path | None = None,
    tokens: Path | None = None, threads: int = 1,
) -> None:
    """Train a randomly initialised LM per variant of params.variants (full, no_last_mlp: without its last MLP), one
    after the other, each from the seed, logging the children's log-likelihood on the Macondo test sentences
    (--test) or the training loss on a corpus token stream (--tokens); --csv and --parquet in the variants' order."""
    lm.torch_threads(threads)
    variants = params["variants"]
    if not len(variants) == len(csv) == len(parquet):
        raise ValueError(f"hurdle: {len(variants)} variants, {len(csv)} --csv, {len(parquet)} --parquet")
    if params["data"] == "macondo" and test is None:
        raise ValueError("hurdle: Macondo data needs --test")
    if params["data"] != "macondo" and tokens is None:
        raise ValueError("hurdle: corpus data needs --tokens")
    train, data = (train_macondo, test) if params["data"] == "macondo" else (train_corpus, tokens)
    for variant, c, pq in zip(variants, csv, parquet, strict=True):
        train(tokenizer_dir, data, params["shape"], params["run"], variant, params["seed"], c, pq)
