"""Running a model with the key hook: where the hook sits in each architecture (``find_hook_point``), the forward
pre-hook that captures the keys (the input of the last block's feed-forward sublayer, after its layer norm), the
windows a token stream is cut into and the batched forward over a stream (``run_model``), and the padded forwards
over (context, continuation) pairs that the tasks, Macondo and the hurdle score (``build_pairs``,
``forward_scored``). Used by the extraction (``extraction.py``), retrieval, the tasks and the analyses, and by
``lm`` (the hook point a model's identity records). It runs no step and loads no model (``lm`` does). It imports
torch; the backbone modules that run no model (the datastore, the index, the tables) do not import it, so that
their steps start without it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from .datastore import strided_windows

# Where the last transformer block lives in Hugging Face causal LMs: GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT.
_BLOCK_LISTS = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")


def find_hook_point(model) -> str:
    """Name of the last block's feed-forward module (its input is the kNN-LM key)."""
    for path in _BLOCK_LISTS:
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        last = len(obj) - 1
        if hasattr(obj[last], "mlp"):
            return f"{path}.{last}.mlp"
    raise ValueError(f"{type(model).__name__}: cannot find the last block's mlp under {_BLOCK_LISTS}")


class _Stop(Exception):
    """Raised by the hook to skip the rest of the forward pass when only keys are needed."""


@contextmanager
def capture_keys(model, hook_point: str, stop: bool = False):
    """Register a forward pre-hook on ``hook_point``; ``box['keys']`` holds its input after each forward."""
    box: dict = {}

    def hook(_module, args):
        box["keys"] = args[0].detach()
        if stop:
            raise _Stop

    handle = model.get_submodule(hook_point).register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def windows(start: int, end: int, block: int) -> list[tuple[int, int]]:
    """Split query positions [start, end) into model windows of at most ``block`` positions."""
    return [(s, min(s + block, end)) for s in range(start, end, block)]


def run_model(
    model,
    hook_point: str,
    tokens: np.ndarray,
    start: int,
    end: int,
    block: int,
    batch: int,
    with_logprobs: bool,
    desc: str = "",
    stride: int | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Forward the model over positions [start, end) of ``tokens`` (each position predicts ``tokens[i+1]``).

    The windows are ``strided_windows``': with no ``stride`` the context resets every ``block`` positions counted
    from ``start``; with one, run_clm.py's sliding windows. Yields (first position, keys [n, d] float32,
    log p_lm(target) [n] float32 or None) batch by batch, so memory is bounded by one batch.
    """
    if end > tokens.size - 1:
        raise ValueError(f"position {end} has no next token (stream of {tokens.size})")
    device = next(model.parameters()).device
    groups: dict[tuple[int, int], list] = {}
    for w in strided_windows(start, end, block, stride):  # windows alike in input and scored length batch together
        groups.setdefault((w[2] - w[0], w[2] - w[1]), []).append(w)
    ordered = [
        g[i : i + batch] for _, g in sorted(groups.items(), reverse=True) for i in range(0, len(g), batch)
    ]
    ordered.sort(key=lambda ws: ws[0][1])
    with torch.inference_mode(), capture_keys(model, hook_point, stop=not with_logprobs) as box:
        for ws in tqdm(ordered, desc=desc or "forward", mininterval=10, disable=not desc):
            x = torch.from_numpy(np.stack([tokens[c:b] for c, _, b in ws]).astype(np.int64)).to(device)
            scored = ws[0][2] - ws[0][1]  # the last `scored` positions of each window
            try:
                out = model(input_ids=x)
            except _Stop:
                out = None
            keys = box["keys"][:, -scored:].float().reshape(-1, box["keys"].shape[-1]).cpu().numpy()
            lp = None
            if with_logprobs:
                y = torch.from_numpy(np.stack([tokens[a + 1 : b + 1] for _, a, b in ws]).astype(np.int64)).to(
                    device
                )
                logp = torch.log_softmax(out.logits[:, -scored:].float(), dim=-1)
                lp = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).reshape(-1).cpu().numpy()
            # windows in a group score consecutive positions, so rows are contiguous
            yield ws[0][1], keys, lp


# ------------------------------------------------------------------------- padded batches (tasks, Macondo, hurdle)
def forward_padded(model, seqs: list[list[int]]):
    """One forward pass over right-padded sequences (the attention mask hides the padding)."""
    device = next(model.parameters()).device
    x = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.as_tensor(s)
        mask[b, : len(s)] = 1
    return model(input_ids=x.to(device), attention_mask=mask.to(device))


def length_batches(seqs, batch: int, desc: str = ""):
    """Indices of ``seqs`` in batches of similar length, with a progress bar when ``desc`` is given."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = [order[a : a + batch] for a in range(0, len(order), batch)]
    return tqdm(chunks, desc=desc or "score", mininterval=10, disable=not desc)


def build_pairs(items, encode: Callable[[str], list], bos: int | None, max_len: int,
                encode_cont: Callable[[str], list] | None = None):
    """Unique (context, continuation) pairs of all items, tokenised; items' options rewritten as pair ids.
    Contexts are tokenised with ``encode``, continuations with ``encode_cont`` (``encode`` when None;
    ``continuation_encoder`` for the choice tasks).

    Returns (seqs, starts, items_with_pair_ids): ``seqs[p]`` = [bos] + context + continuation (context cut from
    the left to fit ``max_len``); tokens ``seqs[p][starts[p]:]`` are the scored ones.
    """
    caches: dict[bool, dict[str, list]] = {False: {}, True: {}}

    def enc(s, cont=False):
        cache = caches[cont]
        if s not in cache:
            cache[s] = list((encode_cont or encode)(s) if cont else encode(s)) if s else []
        return cache[s]

    index: dict[tuple, int] = {}
    seqs, starts = [], []

    def pid(ctx, cont):
        key = (ctx, cont)
        if key not in index:
            c, t = enc(ctx), enc(cont, cont=True)
            if not t:
                raise ValueError(f"continuation {cont!r} encodes to no tokens")
            head = ([bos] if bos is not None else []) + c
            if len(head) + len(t) > max_len:
                keep = max_len - len(t)
                if keep < 1:
                    raise ValueError(f"continuation {cont!r} is longer than the window of {max_len} tokens")
                head = head[-keep:]
            index[key] = len(seqs)
            seqs.append(head + t)
            starts.append(len(head))
        return index[key]

    out = []
    for it in items:
        new = dict(it)
        new["options"] = [[pid(c, t) for c, t in opt] for opt in it["options"]]
        new["domain"] = [[pid(c, t) for c, t in opt] for opt in it["domain"]] if it.get("domain") else None
        out.append(new)
    return seqs, starts, out


def forward_scored(model, hook_point: str, seqs, starts, batch: int, desc: str = ""):
    """Forward every sequence once (right-padded batches of similar length) and yield, per sequence, the
    keys at its scored positions [n, d] (float32) and log p_lm of each scored token [n]."""
    device = next(model.parameters()).device
    with torch.inference_mode(), capture_keys(model, hook_point) as box:
        for chunk in length_batches(seqs, batch, desc):
            out = forward_padded(model, [seqs[i] for i in chunk])
            keys = box["keys"]
            for b, i in enumerate(chunk):
                pos = torch.arange(starts[i] - 1, len(seqs[i]) - 1, device=device)
                tgt = torch.as_tensor(seqs[i][starts[i] :], device=device)
                logp = torch.log_softmax(out.logits[b, pos].float(), dim=-1)
                lp = logp.gather(-1, tgt[:, None])[:, 0]
                yield i, keys[b, pos].float().cpu().numpy(), lp.cpu().numpy()
