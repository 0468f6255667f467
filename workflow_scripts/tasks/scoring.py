"""Task scoring: the three scoring kinds, each one function shared by the base LM and the kNN-LM.

The kNN distribution is applied at every scored token, with the backbone's pieces: the model loaded and
checked by ``lm.load_checked``, keys captured by ``forward.capture_keys`` (the same hook point as the
datastore), neighbours from ``index.search``, and the mixture from ``knnlm`` (the only kNN-LM math).

* classify / choice (teacher-forced): every (context, continuation) pair is forwarded once; each scored token
  position's query is retrieved once with K_max (a position shared by several continuations — the first token
  of every label word after the same context — is one query); every (λ, k, σ) is then a rescoring of that
  cache, exactly as the perplexity sweep. A pair's log-probability is the sum over its tokens of
  ``log(λ·p_knn + (1−λ)·p_lm)``; an option's score is the log of the summed probabilities of its pairs (a fuzzy
  verbalizer), divided by token count for ``accuracy_norm``, minus the same under the domain premise with PMI.
* classify with ``protocol: last_token`` (paper 1's memory tasks, eval_fuzzy.py): one forward pass and one
  query per premise (and per distinct domain premise); the cache keeps log p_lm and the K_max neighbours at the
  premise's last position only, and each (λ, k, σ) reads the mixture at the first subword of every synonym
  (``knnlm.knn_probs_at``); the class score is DCPMI, Σ_synonyms log(p + 1e-10) − log(p_domain + 1e-10).
* generate: greedy decoding with the mixture at every step; one retrieval per step for the whole batch of
  examples (shared across grid points while their prefixes agree).

A task's items are scored in blocks of ``memory.task_block`` items, each on its own (its own forward batches,
FAISS calls and decoding batches), and the blocks' caches joined (``join_parts``). ``tasks.chunks`` splits a task
into jobs of whole blocks (``score_task_chunk``) whose caches ``merge_chunks`` joins into the one job's, byte
for byte: a forward pass's or a FAISS call's float32 results depend on what else is in its batch.

The caches are rescored (option scores, PMI, every (λ, k, σ)) by ``rescoring``, which imports no torch.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .. import knnlm, memory
from ..artifacts import sha256_file
from ..cli import step
from ..config import context_length
from ..forward import build_pairs, capture_keys, forward_padded, forward_scored, length_batches
from ..sweep import chosen_point
from .cache import CHUNK_KEY, chunk_items, join_parts, merge_chunks, mode, write_task_cache
from .items import read_items

log = logging.getLogger(__name__)
N_NEIGHBOURS_KEPT = 16  # neighbour ids kept per decoding step of a generate task (the qualitative table)


# --------------------------------------------------------------------------------------------- last token

SPACE_PROBES = ("the", "a", "of", "and", "to", "in")


def lone_space_piece(tok) -> bool:
    """Whether the tokenizer puts a lone space piece before every " word": " w" encodes as a piece that decodes to
    whitespace followed by the pieces of "w", for every probe word. SentencePiece with a dummy prefix does
    (Llama-2, and Mistral's own model files: " true" is ["▁", "▁true"]); byte-level BPE (GPT-2, Llama-3) does not."""

    def split(w):
        spaced = tok(" " + w, add_special_tokens=False)["input_ids"]
        alone = tok(w, add_special_tokens=False)["input_ids"]
        return len(spaced) >= 2 and not tok.decode(spaced[:1]).strip() and spaced[1:] == alone

    return all(split(w) for w in SPACE_PROBES)


def subword_index(tok) -> int:
    """Where a synonym's first subword sits in ``tok(" word")`` (special tokens included): eval_fuzzy.py's
    ``word_idx``, which is 1 after the start token of Llama-3 / Mistral and 2 for Llama-2, whose tokenizer
    puts a lone "▁" piece before every " word". Here it is read off the tokenizer: the start tokens it adds, plus
    one for a tokenizer with a lone space piece (``lone_space_piece``)."""
    special = set(tok.all_special_ids)
    start = next(j for j, i in enumerate(tok("x", add_special_tokens=True)["input_ids"]) if i not in special)
    return start + int(lone_space_piece(tok))


def continuation_encoder(tok) -> Callable[[str], list]:
    """How a choice's continuation (" " + the choice) is tokenised: its pieces without special tokens, less a
    leading piece that decodes to whitespace when the tokenizer puts a lone space piece before every word. That
    is eval_pmi.py's ``target[2:]`` for Llama-2-7b-hf (the start token and the lone "▁" dropped), so the
    continuation is scored as the pieces the word has in running text ("▁Paris", not "▁" then "▁Paris"); for
    other tokenizers the pieces as they are (its ``target[1:]``, the start token dropped)."""
    lone = lone_space_piece(tok)

    def encode(s: str) -> list:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        if lone and len(ids) >= 2 and not tok.decode(ids[:1]).strip():
            return ids[1:]
        return ids

    return encode


def first_subword(tok, word: str, index: int | None = None) -> int:
    """The id paper 1 reads for a synonym " word": ``tok(word)["input_ids"][subword_index(tok)]``. As in the
    paper, a word whose leading space happens to be its own piece reads that piece."""
    ids = tok(word, add_special_tokens=True)["input_ids"]
    index = subword_index(tok) if index is None else index
    if len(ids) <= index:
        raise ValueError(f"synonym {word!r} encodes to {ids}: no piece at index {index}")
    return int(ids[index])



def last_token_cache(model, hook_point, texts: list[list[int]], slot_ids, search_fn, batch: int, desc: str = ""):
    """Forward every text once; keep log p_lm at ``slot_ids``, the K_max neighbours of its last position (distances,
    values, datastore rows) and that position's query (float16; the scaling study searches a subset with it)."""
    seqs = [list(t) for t in texts]
    lm_rows, keys = [None] * len(seqs), [None] * len(seqs)
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(np.asarray(slot_ids, np.int64), device=device)
    with torch.inference_mode(), capture_keys(model, hook_point) as box:
        for chunk in length_batches(seqs, batch, desc):
            out = forward_padded(model, [seqs[i] for i in chunk])
            for b, i in enumerate(chunk):
                last = len(seqs[i]) - 1  # the next-token distribution after the whole premise
                logp = torch.log_softmax(out.logits[b, last].float(), dim=-1)
                lm_rows[i] = logp[ids_t].cpu().numpy()
                keys[i] = box["keys"][b, last].float().cpu().numpy()
    q = np.stack(keys).astype(np.float16).astype(np.float32)  # the precision of the datastore's keys
    dists, vals, ids = search_fn(q)
    return {
        "q_lm": np.stack(lm_rows).astype(np.float32),
        "q_dists": dists.astype(np.float32),
        "q_vals": vals.astype(np.int32),
        "q_ids": ids.astype(np.int64),
        "q_keys": q.astype(np.float16),
    }



def score_last_token(model, tok, ident, entry, items, search_fn, block_size: int, batch: int):
    """Paper 1's memory-task scoring: the task's cache and, per item, its premise and domain-premise rows."""
    words, index = entry["synonyms"], subword_index(tok)
    class_ids = [[first_subword(tok, w, index) for w in ws] for ws in words]
    slot_ids = sorted({i for ids in class_ids for i in ids})
    where = {i: j for j, i in enumerate(slot_ids)}
    texts: dict[str, int] = {}
    for it in items:
        for t in (it["premise"], it.get("domain_premise")):
            if t is not None:
                texts.setdefault(t, len(texts))
    # eval_fuzzy.py: encode_plus (the tokenizer's special tokens), cut from the left to the model's window
    encoded = [tok(t, add_special_tokens=True)["input_ids"][-block_size:] for t in texts]
    if any(not e for e in encoded):
        raise ValueError(f"task {entry.get('name', '')}: a premise encodes to no tokens")
    cache = last_token_cache(model, ident["hook_point"], encoded, slot_ids, search_fn, batch, "score")
    cache["slot_ids"] = np.asarray(slot_ids, np.int64)
    record_items = [
        {"q": texts[it["premise"]], "dq": texts.get(it.get("domain_premise"), -1), "gold": it["gold"]} for it in items
    ]
    classes = [[where[i] for i in ids] for ids in class_ids]
    return cache, record_items, classes


def score_cache(model, hook_point, seqs, starts, search_fn, batch: int = 16, desc: str = "") -> dict:
    """The task's retrieval cache: one query per distinct scored position (its prefix), K_max neighbours each.

    Returns arrays ``t_pair, t_row, t_target, t_lm`` (one per scored token) and ``q_dists, q_vals, q_ids, q_keys``
    (one row per distinct query: its K_max neighbours' distances, values and datastore rows, and the query itself in
    float16, so that the scaling study can search a subset of the datastore again)."""
    rows: dict[bytes, int] = {}
    queries: list[np.ndarray] = []
    t_pair, t_row, t_target, t_lm = [], [], [], []
    for i, keys, lp in forward_scored(model, hook_point, seqs, starts, batch, desc):
        seq = np.asarray(seqs[i], np.int64)
        for j, pos in enumerate(range(starts[i] - 1, len(seqs[i]) - 1)):
            key = seq[: pos + 1].tobytes()
            if key not in rows:
                rows[key] = len(queries)
                queries.append(keys[j])
            t_pair.append(i)
            t_row.append(rows[key])
            t_target.append(seqs[i][pos + 1])
            t_lm.append(lp[j])
    q = np.stack(queries).astype(np.float16).astype(np.float32)  # the precision of the datastore's keys
    dists, vals, ids = search_fn(q)
    log.info("%d scored tokens, %d distinct queries, K = %d", len(t_pair), len(q), dists.shape[1])
    return {
        "t_pair": np.asarray(t_pair, np.int64),
        "t_row": np.asarray(t_row, np.int64),
        "t_target": np.asarray(t_target, np.int32),
        "t_lm": np.asarray(t_lm, np.float32),
        "q_dists": dists.astype(np.float32),
        "q_vals": vals.astype(np.int32),
        "q_ids": ids.astype(np.int64),
        "q_keys": q.astype(np.float16),
    }



# --------------------------------------------------------------------------------------------- generate
def _cache_argument(model) -> str | None:
    """The forward argument that takes a key/value cache: ``cache`` (transformers ≥ 5.2x), ``past_key_values``
    (before); None for a model without one, which then forwards the whole prefix at every step."""
    params = _forward_params(model)
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def _forward_params(model):
    """The names of ``model.forward``'s arguments (none when its signature cannot be read)."""
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


class _CachedBatch:
    """A batch of growing sequences decoded with the model's key/value cache.

    The prompts are left-padded and forwarded once (the prefill; position ids count each row's own tokens and the
    attention mask hides the padding); ``feed`` then forwards one new token per row, the rows not kept dropped
    from the cache first. ``logits`` [b, V] and ``keys`` [b, d] (the hook point's input) are at each row's last
    token."""

    def __init__(self, model, box: dict, prompts: list[list[int]], cache_arg: str):
        self.model, self.box, self.cache_arg = model, box, cache_arg
        self.device = next(model.parameters()).device
        n = max(len(p) for p in prompts)
        x = torch.zeros((len(prompts), n), dtype=torch.long)
        mask = torch.zeros_like(x)
        for b, p in enumerate(prompts):
            x[b, n - len(p) :] = torch.as_tensor(p)
            mask[b, n - len(p) :] = 1
        self.mask = mask.to(self.device)
        kw = {"use_cache": True}
        params = _forward_params(model)
        for name in ("logits_to_keep", "num_logits_to_keep"):  # the LM head at the last position only
            if name in params:
                kw[name] = 1
                break
        self._forward(x.to(self.device), (self.mask.cumsum(1) - 1).clamp(min=0), kw)

    def _forward(self, x, pos, kw):
        out = self.model(input_ids=x, attention_mask=self.mask, position_ids=pos, **kw)
        self.cache = getattr(out, self.cache_arg)
        self.logits, self.keys = out.logits[:, -1], self.box["keys"][:, -1]
        self.pos = pos[:, -1:]

    def feed(self, rows: list[int], tokens: list[int]) -> None:
        """Keep the rows ``rows`` (indices among the current ones) and append ``tokens`` (one per kept row)."""
        if len(rows) < self.mask.shape[0]:
            idx = torch.as_tensor(rows, device=self.device)
            self.mask, self.pos = self.mask[idx], self.pos[idx]
            self.cache = _select_rows(self.cache, idx)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        x = torch.as_tensor(tokens, device=self.device)[:, None]
        self._forward(x, self.pos + 1, {"use_cache": True, self.cache_arg: self.cache})


def _select_rows(cache, idx: torch.Tensor):
    """The key/value cache of the rows ``idx`` only: a transformers ``Cache`` in place, a legacy tuple anew."""
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return cache
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(idx)
        return cache
    return tuple(tuple(t[idx] for t in layer) for layer in cache)


class _Greedy:
    """One point's greedy decoding: the answers so far, the first step's neighbours, and the step itself."""

    def __init__(self, point, prompts, searched: dict, search_fn, vocab_size: int, is_done, on_step):
        self.point, self.prompts, self.searched, self.search_fn = point, prompts, searched, search_fn
        self.vocab_size, self.is_done, self.on_step = vocab_size, is_done, on_step
        self.gen: list[list[int]] = [[] for _ in prompts]
        self.first_ids: list = [None] * len(prompts)

    def step(self, live: list[int], logits, keys) -> list[int]:
        """Append each prompt of ``live``'s next token given its logits [b, V] and key [b, d] at the prefix's last
        position; return the positions in ``live`` of the prompts not done."""
        logp = torch.log_softmax(logits.float(), -1).cpu().numpy().astype(np.float64)
        logp = logp[:, : self.vocab_size]
        if self.point is not None:
            lam, k, sigma = self.point
            keys = keys.float().cpu().numpy().astype(np.float16).astype(np.float32)
            prefixes = [np.asarray(self.prompts[i] + self.gen[i], np.int64).tobytes() for i in live]
            todo = [b for b, p in enumerate(prefixes) if p not in self.searched]
            if todo:
                d, v, ids = self.search_fn(keys[todo])
                for j, b in enumerate(todo):
                    self.searched[prefixes[b]] = (d[j], v[j], ids[j, :N_NEIGHBOURS_KEPT])
            d = np.stack([self.searched[p][0] for p in prefixes])
            v = np.stack([self.searched[p][1] for p in prefixes])
            p_knn = knnlm.knn_distribution(d, v, k, sigma, self.vocab_size)
            with np.errstate(divide="ignore"):
                logp = knnlm.interpolate(logp, np.log(p_knn), lam)
            for b, i in enumerate(live):
                if self.first_ids[i] is None:
                    self.first_ids[i] = self.searched[prefixes[b]][2].tolist()
        nxt = np.argmax(logp, axis=1)
        keep = []
        for b, i in enumerate(live):
            if self.on_step is not None:
                self.on_step(self.point, i, logp[b])
            self.gen[i].append(int(nxt[b]))
            if not self.is_done(self.gen[i]):
                keep.append(b)
        return keep


def greedy_generate(
    model,
    hook_point: str,
    prompts: list[list[int]],
    points: list[tuple | None],
    search_fn,
    vocab_size: int,
    max_new_tokens: int,
    is_done: Callable[[list[int]], bool],
    batch: int = 16,
    on_step: Callable[[tuple | None, int, np.ndarray], None] | None = None,
) -> dict:
    """Greedy decoding of every prompt at every point: ``None`` (the base LM) or (λ, k, σ), where each step's
    next-token distribution is ``λ·p_knn + (1−λ)·p_lm`` from the step's K_max neighbours.

    With the model's key/value cache, prompts are decoded in batches of ``batch`` (shortest first), one batch at a
    time: the prompts forwarded once, then one new token a step per unfinished prompt (finished ones leave the
    batch); the step's query is the hook point's input at that new token. A model without a cache argument
    forwards the whole prefixes at every step instead, in batches of the unfinished prompts. Retrieval runs once
    per step for the batch, on the prefixes not yet searched (prefixes agree across grid points until their tokens
    differ, so early steps are shared). ``on_step(point, prompt index, log p)`` sees each step's next-token
    log-probabilities [vocab_size] (float64). Returns {"outputs": {point: [ids]}, "neighbours": {point:
    [first-step neighbour ids per prompt]}}.
    """
    device = next(model.parameters()).device
    searched: dict[bytes, tuple] = {}
    outputs, neighbours = {}, {}
    cache_arg = _cache_argument(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    with torch.inference_mode(), capture_keys(model, hook_point) as box:
        for point in points:
            g = _Greedy(point, prompts, searched, search_fn, vocab_size, is_done, on_step)
            if cache_arg is None:  # every step forwards the whole prefixes (right-padded)
                active = list(range(len(prompts)))
                for _step in range(max_new_tokens):
                    still = []
                    for a in range(0, len(active), batch):
                        chunk = active[a : a + batch]
                        seqs = [prompts[i] + g.gen[i] for i in chunk]
                        out = forward_padded(model, seqs)
                        last = torch.as_tensor([len(s) - 1 for s in seqs], device=device)
                        rows = torch.arange(len(chunk), device=device)
                        keep = g.step(chunk, out.logits[rows, last], box["keys"][rows, last])
                        still += [chunk[b] for b in keep]
                    active = still
                    if not active:
                        break
            else:
                for a in range(0, len(order) if max_new_tokens > 0 else 0, batch):
                    live = order[a : a + batch]
                    state = _CachedBatch(model, box, [prompts[i] for i in live], cache_arg)
                    for step_ in range(max_new_tokens):
                        keep = g.step(live, state.logits, state.keys)
                        if not keep or step_ == max_new_tokens - 1:
                            break
                        live = [live[b] for b in keep]
                        state.feed(keep, [g.gen[i][-1] for i in live])
            outputs[point] = g.gen
            neighbours[point] = g.first_ids
    return {"outputs": outputs, "neighbours": neighbours}


def generation_window(model, block_size: int, max_new: int) -> int:
    """Tokens of prompt kept for a generate task: the model's own context (``config.context_length``, as paper 1
    decodes with the whole model window; the GSM8K prompt is ~850 Llama tokens + 512 new) less ``max_new``;
    ``block_size`` (the datastore's window) when the model does not say."""
    window = context_length(getattr(model, "config", None) or {})[0] or block_size
    if max_new >= window:
        raise ValueError(f"max_new_tokens {max_new} leaves no room for the prompt in a window of {window} tokens")
    return window - max_new


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for s in stops:
        if s and s in text:
            text = text[: text.index(s)]
    return text.strip()


# --------------------------------------------------------------------------------------------- the task's cache
def _search(index, ds, K: int, exact: bool, distances: str = "exact"):
    from ..index import gemm_distances
    from ..retrieval import search

    def fn(q):
        with gemm_distances():  # a block's ~950 queries would take FAISS's per-pair loop, 2.5-4x slower
            d, i = search(index, ds, np.ascontiguousarray(q, dtype=np.float32), K, exact, distances=distances)
        return d, ds.gather_vals(i), i

    return fn


def score_block(model, tok, ident, entry, items, search_fn, p: dict, points) -> tuple[dict, dict]:
    """(cache, record) of one block of items: its pairs or premises forwarded in their own batches and their
    queries searched in their own calls; generate, its prompts decoded in their own batches."""
    how = mode(entry)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    meta = {"n_items": len(items)}

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    if how == "last_token":
        cache, struct, classes = score_last_token(
            model, tok, ident, entry, items, search_fn, p["block_size"], p["batch_size"]
        )
        meta |= {"n_queries": int(len(cache["q_dists"])), "n_slots": int(cache["slot_ids"].size)}
        return cache, {"meta": meta, "items": struct, "classes": classes}
    if how == "pairs":
        seqs, starts, struct = build_pairs(items, encode, bos, p["block_size"], continuation_encoder(tok))
        cache = score_cache(model, ident["hook_point"], seqs, starts, search_fn, p["batch_size"], "score")
        cache["pair_len"] = np.asarray([len(s) - st for s, st in zip(seqs, starts, strict=True)], np.int64)
        meta |= {"n_pairs": len(seqs), "n_tokens": int(cache["t_pair"].size), "n_queries": int(len(cache["q_dists"]))}
        return cache, {"meta": meta, "items": [{k: it[k] for k in ("options", "domain", "gold")} for it in struct]}
    max_new = int(entry.get("max_new_tokens", p["generate"]["max_new_tokens"]))
    stops = entry.get("stop", ["\n"])
    keep = generation_window(model, p["block_size"], max_new)
    prompts = [([bos] + encode(it["context"]))[-keep:] for it in items]
    eos = tok.eos_token_id

    def done(ids):
        return (eos is not None and ids[-1] == eos) or any(s in tok.decode(ids) for s in stops)

    res = greedy_generate(
        model, ident["hook_point"], prompts, points, search_fn, ident["vocab_size"], max_new, done, p["batch_size"]
    )
    return {}, {
        "meta": meta,
        "points": [
            {
                "lambda": 0.0 if pt is None else pt[0],
                "k": None if pt is None else pt[1],
                "sigma": None if pt is None else pt[2],
                "texts": [cut_at_stop(tok.decode(ids, skip_special_tokens=True), stops) for ids in out],
                "neighbours": res["neighbours"][pt],
            }
            for pt, out in res["outputs"].items()
        ],
    }


def decode_points(entry: dict, p: dict, summary_csv) -> list:
    """The points a generate task decodes at: the base LM (None), the grid's with ``points: grid``, and the point
    chosen on perplexity (or pinned) when it is not among them."""
    if mode(entry) != "generate":
        return []
    chosen, _ = chosen_point(summary_csv, p["datastore"], p.get("point"))
    points = [None]
    if p["generate"]["points"] == "grid":
        g = p["grid"]
        points += [(float(lam), int(k), float(s)) for s in g["sigmas"] for k in g["ks"] for lam in g["lambdas"]]
    if chosen is not None and chosen not in points:
        points.append(chosen)
    return points


def score(
    identity_json, manifest_json, index_path, index_meta, items_parquet, p: dict, out_npz, out_json,
    summary_csv=None, threads=1, chunk: tuple[int, int] | None = None,
) -> dict:
    """Run the datastore's model over a task, retrieving at every scored position; write the task's cache. The
    items are scored in blocks (``memory.task_block``) and the blocks' caches joined; with ``chunk`` = (i, n),
    only the blocks of chunk i of n, a partial cache that ``merge_chunks`` joins into the one-job cache."""
    from ..retrieval import open_retriever

    entry, t0 = p["entry"], time.time()
    empty = False
    if chunk is not None:  # a chunk with no items (a task of fewer blocks than chunks) loads no model
        all_items = read_items(items_parquet)
        a, b = chunk_items(len(all_items), p, chunk)
        empty = a == b
    if empty:
        from ..datastore import manifest_hash

        manifest_sha = manifest_hash(manifest_json)
        parts = []
        log.info("chunk %d of %d: no items (the task's %d items make fewer blocks of %d than chunks)", chunk[0],
                 chunk[1], len(all_items), memory.task_block(p))
    else:
        model, tok, ident, ds, index, imeta = open_retriever(
            identity_json, manifest_json, index_path, index_meta, p, threads
        )
        manifest_sha = ds.hash
        if chunk is None:
            all_items = read_items(items_parquet)
        a, b = chunk_items(len(all_items), p, chunk)
        items = all_items[a:b]
        bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

        cont = continuation_encoder(tok)

        def count_pairs(block):  # scored tokens of a block's pairs, as score_block will tokenize them
            seqs, starts, _ = build_pairs(block, lambda s: tok(s, add_special_tokens=False)["input_ids"], bos,
                                          p["block_size"], cont)
            return sum(len(q) - st for q, st in zip(seqs, starts, strict=True))

        n_rows, block_rows = memory.task_queries(items, p, count_pairs)
        plan = {"window": p["block_size"], "batch": p["batch_size"], "vocab": ident["vocab_size"],
                "device": p.get("device"), "block_queries": block_rows}
        rule = "score_task" if chunk is None else "score_task_chunk"
        memory.check(rule, ds.manifest, memory.search_config(imeta, p.get("distances") or "exact"),
                     CHUNK_KEY, p["k_max"], n_rows, plan)
        search_fn = _search(index, ds, p["k_max"], imeta["exact"], p.get("distances") or "exact")
        points = decode_points(entry, p, summary_csv)
        block = memory.task_block(p)
        parts = [
            score_block(model, tok, ident, entry, items[i : i + block], search_fn, p, points)
            for i in range(0, len(items), block)
        ]
    if parts:
        cache, record = join_parts(entry, parts)
    else:
        cache, record = {}, {"meta": {"n_items": 0}}
    meta = {"task": p["task"], "kind": entry["kind"], "K": p["k_max"], "manifest_sha256": manifest_sha,
            "items_sha256": sha256_file(items_parquet), **record.pop("meta")}
    if chunk is not None:
        meta["chunk"] = {"index": chunk[0], "of": chunk[1], "start": a, "end": b, "items": len(all_items)}
    return write_task_cache(out_npz, out_json, cache, {"meta": meta, **record}, time.time() - t0)


@step
def score_task(
    params: dict, model_json: Path, manifest: Path, index: Path, index_meta: Path, items: Path, npz: Path,
    scored_json: Path, summary: Path | None = None, threads: int = 1, chunks: list[Path] = (),
) -> None:
    """Score a task against a datastore: its retrieval cache (teacher-forced kinds) or its decoded answers
    (generate, at the base LM and the point chosen on perplexity in --summary). With --chunks (the
    score-task-chunk records, in order): join them."""
    from ..lm import torch_threads

    if chunks:
        merge_chunks(chunks, items, params, npz, scored_json, manifest, index_meta)
        return
    torch_threads(threads)
    score(model_json, manifest, index, index_meta, items, params, npz, scored_json, summary, threads)


@step(name="score-task-chunk")
def score_task_chunk(
    params: dict, model_json: Path, manifest: Path, index: Path, index_meta: Path, items: Path, npz: Path,
    scored_json: Path, summary: Path | None = None, threads: int = 1,
) -> None:
    """Score one chunk of a task's items (params ``chunk``: [i, n]; cut on whole blocks of items), a partial cache
    that ``score-task --chunks`` joins into the one-job cache."""
    from ..lm import torch_threads

    torch_threads(threads)
    score(model_json, manifest, index, index_meta, items, params, npz, scored_json, summary, threads,
          chunk=tuple(params["chunk"]))
