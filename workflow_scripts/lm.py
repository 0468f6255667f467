"""Tokenizer and language model: train from scratch, or load a local directory or a hub id; one loading path.

A model is known to the rest of the pipeline through ``results/models/<model>/model.json``: where to load it
from, and the hashes of its weights and tokenizer that every datastore and retrieval cache records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from . import devices, forward
from .artifacts import ArtifactError, atomic_path, load_npy, read_json, sha256_file, write_json, write_table
from .cli import step
from .config import CHUNK_KEYS, context_length

EOS = "<|endoftext|>"
log = logging.getLogger(__name__)


def torch_threads(n: int) -> None:
    torch.set_num_threads(max(1, n))


def pick_device(requested: str = "auto") -> torch.device:
    """The device ``extraction.device`` = ``requested`` resolves to here; ``cuda`` without one is refused
    (devices.torch_device)."""
    return devices.torch_device(requested)


# --------------------------------------------------------------------------------------------- tokenizer
def bpe_tokenizer(texts, vocab_size: int, start_token: bool = False):
    """A byte-level BPE (GPT-2 style, EOS as the only special token) trained on ``texts``. With ``start_token``
    the tokenizer puts EOS before a text when asked for its special tokens (as Llama's adds <s>); training and
    extraction encode without special tokens, so only what asks for them (paper 1's memory tasks) sees it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if start_token:
        eos = tok.token_to_id(EOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def train_tokenizer(train_parquet, vocab_size: int, outdir, start_token: bool = False) -> None:
    fast = bpe_tokenizer(pl.read_parquet(train_parquet)["text"].to_list(), vocab_size, start_token)
    _save_dir_atomically(outdir, fast.save_pretrained)


WORD_COUNTS = ("lines", "words")


def word_count(tokenizer, ids, convention: str) -> int:
    """The words the token ids spell, as a paper's word-level perplexity counts them (``convention``, no default:
    each caller names its paper's):

    * ``"lines"``, paper 2's reference code (knnlm-why's fairseq: ``Dictionary.encode_line`` gives every line of
      ``wiki.*.tokens`` its whitespace-separated words plus an end-of-line ``</s>``, blank lines included, and
      ``eval_lm.py`` counts every scored token, BPE continuations merged into their word): the words of every line
      plus one per line, a blank line (whitespace only) counting one. A line ends at "\n" or at the
      end-of-sequence token; a text's final "\n" and the EOS after it end the same line, and an empty text before
      an EOS is one blank line.
    * ``"words"``, paper 1's ``run_clm.py`` (``process_texts`` for WikiText, ``len(text.split())`` of every row
      otherwise): the whitespace-separated words of the text; lines, blank or not, add nothing.

    Special tokens spell no word and separate texts (a start token between two documents joins no words); only the
    EOS ends a line. ``ids`` may be any stretch of a token stream (e.g. the scored tokens of an eval set, or of one
    window); the word perplexity is then exp(total NLL / this count)."""
    if convention not in WORD_COUNTS:
        raise ValueError(f"word count convention {convention!r}: expected one of {', '.join(WORD_COUNTS)}")
    eos = tokenizer.eos_token_id
    special = set(getattr(tokenizer, "all_special_ids", ())) | {eos}
    segments, cur = [], []  # (the tokens of a text, whether an EOS ends it)
    for i in map(int, ids):
        if i in special:
            segments.append((cur, i == eos))
            cur = []
        else:
            cur.append(i)
    segments.append((cur, False))
    n = 0
    for seg, ended in segments:
        text = tokenizer.decode(seg) if seg else ""
        if convention == "words":
            n += len(text.split())
            continue
        lines = text.split("\n")
        if lines[-1] == "":  # the text's final "\n" (or an empty text) opens no line of its own
            lines.pop()
        if ended and not lines:  # an empty text before an EOS (an EOS after an EOS): a blank line
            lines = [""]
        n += sum(len(line.split()) + 1 for line in lines)
    return n


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# Characters per encode call, so that memory does not grow with document length: encoded whole, a document costs
# ~120-200 bytes per character at peak (the tokenizer keeps tokens, offsets and masks per token; 48 MB: ~10 GB);
# in pieces, the peak is ~0.3 GB over the interpreter plus ~5 bytes per character of the longest document.
MAX_CHARS = 1 << 20


def piecewise_exact(tokenizer) -> bool:
    """Whether encoding a text in pieces cut before a space between two non-space characters gives the ids of
    encoding it whole: a byte-level BPE (GPT-2's pre-tokenizer regex, or a Split with a regex of that family, as
    Llama 3's and Qwen's) without a prefix space, and no normalizer beyond Unicode normalization. Such a space
    always starts a pre-token (`` ?\\p{L}+`` etc.), and merges never cross pre-tokens."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    norm = spec.get("normalizer")
    norms = [] if norm is None else norm.get("normalizers", []) if norm["type"] == "Sequence" else [norm]
    if any(n["type"] not in ("NFC", "NFD", "NFKC", "NFKD") for n in norms):
        return False
    pre = spec.get("pre_tokenizer") or {"type": None}
    pres = pre.get("pretokenizers", []) if pre["type"] == "Sequence" else [pre]
    byte_level = [x for x in pres if x["type"] == "ByteLevel"]
    splits = [x for x in pres if x["type"] == "Split"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space") or len(byte_level) + len(splits) != len(pres):
        return False
    gpt2_like = all(
        x.get("behavior") == "Isolated" and "\\s+(?!\\S)" in str(x.get("pattern", {}).get("Regex", "")) for x in splits
    )
    return gpt2_like and (byte_level[0].get("use_regex", True) or bool(splits))


def split_text(text: str, max_chars: int) -> tuple[list[str], int]:
    """``text`` in pieces of at most ``max_chars`` characters, each cut (but the last) before a space that has a
    non-space character on both sides (exact for ``piecewise_exact`` tokenizers); where a stretch of ``max_chars``
    characters has no such space, a cut at ``max_chars`` (not exact: the tokens around it may differ; the text is
    kept). Returns (pieces, number of such cuts)."""
    if len(text) <= max_chars:
        return [text], 0
    pieces, pos, cuts, n = [], 0, 0, len(text)
    while n - pos > max_chars:
        j = text.rfind(" ", pos + 1, pos + max_chars + 1)
        while j > pos and (text[j - 1].isspace() or text[j + 1].isspace()):
            j = text.rfind(" ", pos + 1, j)
        if j <= pos:
            j, cuts = pos + max_chars, cuts + 1
        pieces.append(text[pos:j])
        pos = j
    pieces.append(text[pos:])
    return pieces, cuts


def wikitext_groups(lines) -> tuple[list[str], int]:
    """Paper 1's ``process_texts`` (GSYfate/knnlm-limits run_clm.py) without the encoding: the texts it encodes, in
    order, and its word count. The non-empty lines under each heading that starts and ends with "= = =" are joined
    with newlines, after the heading; the lines before the first such heading form a text of their own (encoded even
    when empty), and a heading with no lines under it is a text alone. Words: ``len(text.split())`` of each text."""
    texts: list[str] = []
    title, body = None, []
    for line in lines:
        stripped = line.strip()
        if stripped.startswith("= = =") and stripped.endswith("= = ="):
            if not title:
                texts.append("\n".join(body))
            elif body:
                texts.append("\n".join([title, "\n".join(body)]))
            else:
                texts.append(title)
            title, body = stripped, []
        elif stripped:
            body.append(stripped)
    if title:
        texts.append("\n".join([title, "\n".join(body)]) if body else title)
    return texts, sum(len(t.split()) for t in texts)


PREPARE = ("row_eos", "special_tokens", "wikitext_headings")  # corpora.<name>.prepare (config.schema.yaml)


def tokenize_documents(tokenizer, parquet, out_npy, prepare: str, batch: int = 1000) -> int:
    """The papers' token streams (``corpora.<name>.prepare``): each text encoded with the tokenizer's own special
    tokens (a start token for Llama and Mistral) and the ids concatenated, no EOS added: ``special_tokens``, one text
    per row (run_clm.py's ``tokenize_function``, whose ``group_texts`` concatenates them); ``wikitext_headings``,
    the rows grouped by ``wikitext_groups`` (its ``process_texts``). The rows are read whole."""
    import pyarrow.parquet as pq

    if prepare not in PREPARE[1:]:
        raise ValueError(f"prepare {prepare!r} is not one of {PREPARE}")
    rows = pq.read_table(parquet, columns=["text"]).column(0).to_pylist()
    texts = wikitext_groups(rows)[0] if prepare == "wikitext_headings" else rows
    parts = [
        np.asarray(ids, dtype=np.int32)
        for i in tqdm(range(0, len(texts), batch), desc=f"tokenize {Path(parquet).name}", mininterval=5)
        for ids in tokenizer(texts[i : i + batch], add_special_tokens=True)["input_ids"]
    ]
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    if stream.size and int(stream.max()) >= len(tokenizer):
        raise ValueError(f"{parquet}: token id {int(stream.max())} outside vocabulary of {len(tokenizer)}")
    with atomic_path(out_npy, ".npy") as tmp:
        np.save(tmp, stream, allow_pickle=False)
    return int(stream.size)


def tokenize_split(tokenizer, parquet, out_npy, batch: int = 1000, max_chars: int = MAX_CHARS) -> int:
    """Encode every document and join them with EOS into one int32 token stream.

    Memory is flat in the corpus size and in document length: documents are read in batches and written to the
    output as they are encoded, and no encode call gets more than ``max_chars`` characters (a longer document
    is encoded in pieces, see ``split_text``; with a tokenizer for which that is not exact, ``piecewise_exact``,
    each document is encoded whole)."""
    import pyarrow.parquet as pq

    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos token; cannot separate documents")
    exact = piecewise_exact(tokenizer)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)), "fortran_order": False}
    n = 0
    stats = {"cuts": 0, "long": 0, "max": -1}
    with atomic_path(out_npy, ".npy") as tmp, open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (0,)})  # rewritten with the length at the end
        start = f.tell()
        todo: list[tuple[str, bool]] = []  # (text, ends a document)
        chars = 0

        def flush():
            nonlocal n, chars
            if not todo:
                return
            encoded = tokenizer([t for t, _ in todo], add_special_tokens=False)["input_ids"]
            parts = []
            for (_, ends), ids in zip(todo, encoded, strict=True):
                parts.append(np.asarray(ids, dtype=np.int32))
                if ends:
                    parts.append(np.asarray([eos], dtype=np.int32))
            arr = np.concatenate(parts)
            if arr.size:
                stats["max"] = max(stats["max"], int(arr.max()))
            f.write(arr.tobytes())
            n += arr.size
            todo.clear()
            chars = 0

        pf = pq.ParquetFile(parquet)
        rows = pf.iter_batches(batch_size=batch, columns=["text"])
        n_batches = -(-pf.metadata.num_rows // batch)
        for rb in tqdm(rows, desc=f"tokenize {Path(parquet).name}", mininterval=5, total=n_batches):
            for text in rb.column(0).to_pylist():
                if exact:
                    pieces, cuts = split_text(text, max_chars)
                    stats["cuts"] += bool(cuts)
                else:
                    pieces = [text]
                    stats["long"] += len(text) > max_chars
                for k, piece in enumerate(pieces):
                    if chars and (chars + len(piece) > max_chars or len(todo) >= batch):
                        flush()
                    todo.append((piece, k == len(pieces) - 1))
                    chars += len(piece)
        flush()
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (n,)})
        if f.tell() != start:
            raise RuntimeError(f"{out_npy}: the .npy header changed size ({start} -> {f.tell()} bytes)")
        if stats["max"] >= len(tokenizer):
            raise ValueError(f"{parquet}: token id {stats['max']} outside vocabulary of {len(tokenizer)}")
    if stats["cuts"]:
        log.warning(
            "%s: cut %d document(s) inside a run of %d characters without a space; the tokens at such a cut may "
            "differ from encoding the document whole", parquet, stats["cuts"], max_chars,
        )
    if stats["long"]:
        log.warning(
            "%s: %d document(s) longer than %d characters encoded whole (this tokenizer's ids would change if "
            "encoded in pieces): memory grows with their length", parquet, stats["long"], max_chars,
        )
    return int(n)


# --------------------------------------------------------------------------------------------- model
def weights_hash(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_model(identity_or_spec: dict, device: str = "auto", dtype: str = "float32"):
    """Load (model, tokenizer) from a ``model.json`` identity or a config model entry (local dir or hub id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = identity_or_spec["path"]
    kw = {
        "revision": identity_or_spec.get("revision"),
        "trust_remote_code": bool(identity_or_spec.get("trust_remote_code", False)),
    }
    if identity_or_spec.get("source") == "local" and not Path(path).is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    target = pick_device(device)
    dtype = devices.torch_dtype(target, dtype)
    devices.log_devices(target, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if Path(path).is_dir():
        check_safetensors(Path(path))
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_safetensors=True, **kw)
    except SafetensorError as e:  # not a ValueError: the step would end in a traceback
        raise ArtifactError(f"{path}: its safetensors weights cannot be read ({e})") from e
    model.to(target).eval()
    return model, tokenizer


def check_safetensors(directory: Path) -> None:
    """Refuse, naming the file, a .safetensors file of a model directory that cannot hold its own header (an empty
    or truncated file), before transformers reads it: its 8-byte header length and the header must be there."""
    for f in sorted(directory.glob("*.safetensors")):
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or 8 + int.from_bytes(head, "little") > size:
            raise ArtifactError(f"{f}: not a safetensors file ({size} bytes: empty or truncated); copy the model's "
                                "weights again")


def weight_files_hash(identity_or_spec: dict) -> dict[str, str]:
    """The sha256 of each safetensors file (and shard index) the model loads from, read from disk: a local
    directory, or the hub cache's snapshot of the pinned revision. Whatever dtype the model is then loaded in, a
    checkpoint swapped in on disk changes these."""
    path = Path(identity_or_spec["path"])
    if identity_or_spec.get("source") != "hub" and not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if identity_or_spec.get("source") == "hub":  # the snapshot from_pretrained reads (already in the cache)
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(str(identity_or_spec["path"]), revision=identity_or_spec.get("revision"),
                                      local_files_only=True, allow_patterns=["*.safetensors", "*.safetensors.*"]))
    files = sorted(f for f in path.iterdir() if f.name.endswith(".safetensors") or ".safetensors." in f.name)
    if not files:
        raise ArtifactError(f"{path}: no safetensors weights to hash")
    return {f.name: sha256_file(f) for f in files}


def describe(model, tokenizer, spec: dict) -> dict:
    """The identity record written to ``model.json``."""
    hook = forward.find_hook_point(model)
    n_pos, n_pos_key = context_length(model.config)
    return {
        "source": spec["source"],
        "path": str(spec["path"]),
        "revision": spec.get("revision"),
        "trust_remote_code": bool(spec.get("trust_remote_code", False)),
        "architecture": type(model).__name__,
        "model_sha256": weights_hash(model),
        "weight_files_sha256": weight_files_hash(spec),  # the files on disk, checked whatever the dtype
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "hook_point": hook,
        "dim": int(model.config.hidden_size),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "context_length": n_pos,  # the longest window the model takes (its config's n_positions or the like)
        "context_key": n_pos_key,
    }


def load_identity(path) -> dict:
    ident = read_json(path)
    for key in ("path", "model_sha256", "tokenizer_sha256", "hook_point", "dim"):
        if key not in ident:
            raise ArtifactError(f"{path}: no {key!r}; rerun the model stage")
    return ident


def check_window(ident: dict, block_size: int, identity_path) -> None:
    """Refuse windows of ``block_size`` (extraction.block_size) longer than the model's context, which would
    crash the forward pass (an IndexError in the position embeddings) or run it past what it was trained on."""
    n = ident.get("context_length")
    if n is not None and block_size > n:
        raise ValueError(
            f"extraction.block_size = {block_size} exceeds the context of the model in {identity_path} "
            f"({ident['path']}: {ident.get('context_key') or 'context_length'} = {n}); set "
            f"extraction.block_size to at most {n}"
        )


def load_checked(identity_path, device="auto", dtype="float32", block_size: int | None = None):
    """Load the model a ``model.json`` describes and refuse it if its weights or tokenizer changed since, or
    if ``block_size`` (the window it is to be run over) exceeds its context."""
    ident = load_identity(identity_path)
    if block_size is not None:
        check_window(ident, block_size, identity_path)
    recorded = ident.get("weight_files_sha256")
    if recorded is None:
        raise ArtifactError(f"{identity_path}: no weight_files_sha256 (written by an older version); rerun the "
                            f"model stage (snakemake --forcerun {identity_path})")
    model, tok = load_model(ident, device=device, dtype=dtype)  # first: a hub model is fetched into the cache
    got = weight_files_hash(ident)  # the files on disk, whatever dtype they were loaded in
    if got != recorded:
        changed = sorted(k for k in got.keys() | recorded.keys() if got.get(k) != recorded.get(k))
        raise ArtifactError(
            f"{ident['path']}: weights hash: files {', '.join(changed)} differ from those of the model recorded in "
            f"{identity_path} ({ident['model_sha256'][:12]}): another checkpoint, or altered since; rerun the model "
            f"stage"
        )
    if next(model.parameters()).dtype == torch.float32:  # a float16 copy cannot match the float32 weights' hash
        got = weights_hash(model)
        if got != ident["model_sha256"]:
            raise ArtifactError(
                f"{ident['path']}: weights hash {got[:12]} differs from {identity_path} "
                f"({ident['model_sha256'][:12]}); rerun the model stage"
            )
    if tokenizer_hash(tok) != ident["tokenizer_sha256"]:
        raise ArtifactError(f"{ident['path']}: tokenizer differs from the one recorded in {identity_path}")
    return model, tok, ident


def _save_dir_atomically(outdir, save_fn) -> None:
    outdir = Path(outdir)
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=outdir.parent))
    try:
        save_fn(tmp)
        if outdir.exists():
            shutil.rmtree(outdir)
        os.replace(tmp, outdir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def lr_schedule(lr: float, steps: int, warmup_fraction: float, kind: str = "cosine"):
    """Linear warm-up over ``warmup_fraction`` of the steps, then cosine (nanoGPT) or linear (HF Trainer) decay."""
    warmup = max(1, int(warmup_fraction * steps))

    def at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else 1 - frac)

    return at


def fit(
    model,
    next_batch,
    cfg: dict,
    desc: str,
    on_log=None,
    *,
    on_step=None,
    start: int = 0,
    stop: int | None = None,
    state: dict | None = None,
) -> list[dict]:
    """The one training loop: AdamW, warm-up + decay, gradient clipping at 1.0.

    ``next_batch(step)`` returns ``(input_ids, targets)`` or ``(input_ids, targets, attention_mask)``, targets
    aligned with the inputs and -100 where no loss is taken. ``cfg``: steps, lr, warmup_fraction, weight_decay,
    log_every, optional betas and schedule. Every ``log_every`` steps (and at the last) a row with the step,
    tokens seen, train loss, lr and seconds is logged; ``on_log(step, model)`` may add columns to it.
    ``on_step(step, model)`` is called before each step's update (step 0: the model as given), e.g. to save
    checkpoints; it must not change the model or the random state.

    Training in chunks: ``start``/``stop`` run only steps ``[start, stop)`` of the ``cfg["steps"]`` schedule, and
    ``state`` (a dict carried from one chunk to the next) holds the optimizer state, the tokens seen and the
    seconds spent: it is read when it has them and updated at the end. The caller restores the weights and
    the RNG states; then chunks give exactly the weights of one uninterrupted run.
    """
    steps = cfg["steps"]
    stop = steps if stop is None else stop
    if not 0 <= start <= stop <= steps:
        raise ValueError(f"fit: chunk [{start}, {stop}) is not within the {steps} steps")
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        betas=tuple(cfg.get("betas", (0.9, 0.95))),
    )
    state = {} if state is None else state
    if state.get("optimizer") is not None:
        opt.load_state_dict(state["optimizer"])
    lr_at = lr_schedule(cfg["lr"], steps, cfg["warmup_fraction"], cfg.get("schedule", "cosine"))
    rows, seen = [], int(state.get("tokens", 0))
    t0 = time.time() - float(state.get("seconds", 0.0))
    model.train()
    bar = tqdm(range(start, stop), desc=desc, mininterval=10)
    for it in bar:
        if on_step is not None:
            on_step(it, model)
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        x, y, *mask = next_batch(it)
        logits = model(input_ids=x, attention_mask=mask[0] if mask else None).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += int((y != -100).sum())
        if it % cfg["log_every"] == 0 or it == steps - 1:
            row = {"step": it, "tokens": seen, "train_loss": loss.item(), "lr": lr_at(it), "seconds": 0.0}
            if on_log is not None:
                model.eval()
                row.update(on_log(it, model))
                model.train()
            row["seconds"] = time.time() - t0
            rows.append(row)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    state.update(optimizer=opt.state_dict(), tokens=seen, seconds=time.time() - t0, step=stop)
    model.eval()
    return rows


def gpt2_config(tok, cfg: dict, n_positions: int):
    """A GPT-2 configuration of the config's shape for tokenizer ``tok``."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok),
        n_positions=n_positions,
        n_embd=cfg["n_embd"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        resid_pdrop=cfg["dropout"],
        embd_pdrop=cfg["dropout"],
        attn_pdrop=cfg["dropout"],
    )


def stream_batches(stream: np.ndarray, batch: int, block: int, rng):
    """``next_batch`` for ``fit``: random windows of ``block`` + 1 tokens from a token stream."""

    def next_batch(_step):
        starts = rng.integers(0, stream.size - block - 1, size=batch)
        x = torch.from_numpy(np.stack([stream[s : s + block + 1] for s in starts]).astype(np.int64))
        return x[:, :-1], x[:, 1:]

    return next_batch


def stream_loss(model, stream: np.ndarray, block: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over the first ``max_windows`` non-overlapping windows of a stream."""
    starts = list(range(0, max(1, stream.size - block - 1), block))[:max_windows]
    x = torch.from_numpy(np.stack([stream[s : s + block + 1] for s in starts]).astype(np.int64))
    with torch.inference_mode():
        logits = model(input_ids=x[:, :-1]).logits
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))


def save_model(model, tok, outdir) -> None:
    def save(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    _save_dir_atomically(outdir, save)


def _rng_states(rng) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": json.dumps(rng.bit_generator.state),
    }


def _set_rng_states(rng, states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    rng.bit_generator.state = json.loads(states["numpy"])


def _chunk_identity(cfg: dict, seed: int) -> str:
    """What a checkpoint must agree on with the chunk that resumes it (the chunking itself may differ)."""
    return json.dumps({"train": {k: v for k, v in cfg.items() if k not in CHUNK_KEYS}, "seed": seed}, sort_keys=True)


def save_checkpoint(path, model, state: dict, rows: list[dict], rng, cfg: dict, seed: int) -> None:
    """Everything the next chunk needs: weights, optimizer state, RNG states, step, tokens, seconds, loss rows."""
    ckpt = {
        "identity": _chunk_identity(cfg, seed),
        "step": int(state["step"]),
        "tokens": int(state["tokens"]),
        "seconds": float(state["seconds"]),
        "model": model.state_dict(),
        "optimizer": state["optimizer"],
        "rng": _rng_states(rng),
        "rows": json.dumps(rows),
    }
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(ckpt, tmp)


def load_checkpoint(path, cfg: dict, seed: int) -> dict:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: missing; rerun the previous training chunk")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file
        raise ArtifactError(f"{path}: not a training checkpoint ({e}); delete it and rerun its chunk") from e
    if ckpt.get("identity") != _chunk_identity(cfg, seed):
        raise ArtifactError(f"{path}: written for another training config or seed; delete it and rerun its chunk")
    return ckpt


def train_from_scratch(
    train_npy,
    valid_npy,
    tokenizer_dir,
    cfg: dict,
    seed: int,
    outdir,
    loss_csv,
    loss_parquet,
    *,
    resume=None,
    stop: int | None = None,
    checkpoint=None,
) -> dict:
    """Train a GPT-2-shaped causal LM from scratch on a token stream; nanoGPT-style loop.

    In one go by default. In chunks: ``resume`` is the previous chunk's checkpoint (none for the first);
    a chunk that ends before ``cfg["steps"]`` (``stop``) writes ``checkpoint`` and nothing else, the last one
    writes the model and the loss log, exactly as one uninterrupted run would.
    """
    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    train = load_npy(train_npy, dtype=np.int32, ndim=1)
    valid = load_npy(valid_npy, dtype=np.int32, ndim=1)
    B, T = cfg["batch_size"], cfg["block_size"]
    steps = cfg["steps"]
    stop = steps if stop is None else stop
    if train.size <= T + 1:
        raise ValueError(f"{train_npy}: {train.size} tokens, fewer than one block of {T + 1}")
    if stop < steps and checkpoint is None:
        raise ValueError(f"train_lm: a chunk that stops at step {stop} of {steps} needs a checkpoint path")
    devices.log_devices(torch.device("cpu"), "float32")  # training runs on the CPU, as written (docs/cluster.md)
    model = GPT2LMHeadModel(gpt2_config(tok, cfg, T))
    state, rows, start = {}, [], 0
    if resume is not None:
        ckpt = load_checkpoint(resume, cfg, seed)
        model.load_state_dict(ckpt["model"])
        _set_rng_states(rng, ckpt["rng"])
        state = {k: ckpt[k] for k in ("optimizer", "tokens", "seconds")}
        rows, start = json.loads(ckpt["rows"]), int(ckpt["step"])
        log.info("resuming %s at step %d", resume, start)
    t0 = time.time() - float(state.get("seconds", 0.0))
    rows += fit(model, stream_batches(train, B, T, rng), cfg, "train_lm", start=start, stop=stop, state=state)
    if stop < steps:
        save_checkpoint(checkpoint, model, state, rows, rng, cfg, seed)
        log.info("trained steps %d-%d of %d in %.0fs; checkpoint %s", start, stop, steps, time.time() - t0, checkpoint)
        return {"step": stop}
    vloss = stream_loss(model, valid, T)
    rows.append(
        {
            "step": steps,
            "tokens": steps * B * T,
            "train_loss": float("nan"),
            "lr": 0.0,
            "seconds": time.time() - t0,
            "valid_loss": vloss,
        }
    )
    log.info("trained %d steps in %.0fs; valid loss %.3f (ppl %.2f)", steps, time.time() - t0, vloss, math.exp(vloss))
    write_table(pl.DataFrame(rows, infer_schema_length=None), loss_csv, loss_parquet)
    save_model(model, tok, outdir)
    return {"valid_loss": vloss}


def write_identity(spec: dict, out_json, device="auto") -> dict:
    model, tok = load_model(spec, device=device)
    ident = describe(model, tok, spec)
    write_json(out_json, ident)
    return ident


def load_tokenizer(ident: dict):
    """The tokenizer of the model an identity describes."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        ident["path"], revision=ident.get("revision"), trust_remote_code=ident.get("trust_remote_code", False)
    )


def tokenizer_of(tokenizer_dir=None, model_json=None):
    """A tokenizer trained here (its directory, before its model exists) or the one of a described model."""
    from transformers import AutoTokenizer

    if (tokenizer_dir is None) == (model_json is None):
        raise ValueError("give exactly one of --tokenizer-dir and --model-json")
    return AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else load_tokenizer(load_identity(model_json))


# --------------------------------------------------------------------------------------------- steps
@step
def tokenizer(params: dict, train: Path, tokenizer_dir: Path) -> None:
    """Train the BPE tokenizer of a model trained here, on its training corpus."""
    train_tokenizer(train, params["vocab_size"], tokenizer_dir, bool(params.get("start_token")))


@step
def tokenize(
    parquet: Path, out: Path, tokenizer_dir: Path | None = None, model_json: Path | None = None,
    prepare: str = "row_eos",
) -> None:
    """Encode a corpus split into one int32 token stream with the tokenizer trained here (--tokenizer-dir) or the
    one of the model a model.json describes: --prepare row_eos (documents joined by EOS), special_tokens or
    wikitext_headings (``tokenize_documents``)."""
    tok = tokenizer_of(tokenizer_dir, model_json)
    if prepare == "row_eos":
        tokenize_split(tok, parquet, out)
    else:
        tokenize_documents(tok, parquet, out, prepare)


@step
def train_lm(
    params: dict,
    train: Path,
    valid: Path,
    tokenizer_dir: Path,
    resume: Path | None = None,
    checkpoint: Path | None = None,
    hf: Path | None = None,
    model_json: Path | None = None,
    loss_csv: Path | None = None,
    loss_parquet: Path | None = None,
    threads: int = 1,
) -> None:
    """Train the LM from scratch, in one job or in chunks (a chunk ends in --checkpoint, the last one writes
    the weights, the loss log and model.json)."""
    torch_threads(threads)
    stop = params.get("stop")
    last = stop is None or stop >= params["train"]["steps"]
    if last and None in (hf, model_json, loss_csv, loss_parquet):
        raise ValueError("train-lm: the last chunk needs --hf, --model-json, --loss-csv and --loss-parquet")
    train_from_scratch(
        train, valid, tokenizer_dir, params["train"], params["seed"], hf, loss_csv, loss_parquet,
        resume=resume, stop=stop, checkpoint=checkpoint,
    )
    if last:
        write_identity({"source": "train", "path": str(hf)}, model_json, device="cpu")


@step
def model_identity(params: dict, model_json: Path) -> None:
    """Describe a local or hub model: where it loads from, weights and tokenizer hashes, hook point."""
    write_identity(params["spec"], model_json)
