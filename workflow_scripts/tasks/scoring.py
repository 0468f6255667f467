"""Task scoring: the three scoring kinds, each one function shared by the base LM and the kNN-LM.

The kNN distribution is applied at every scored token, with the backbone's pieces: the model loaded and
checked by ``lm.load_checked``, keys captured by ``datastore.capture_keys`` (the same hook point as the
datastore), neighbours from ``retrieval.search``, and the mixture from ``knnlm`` (the only kNN-LM math).

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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .. import knnlm
from ..artifacts import atomic_path, sha256_file, write_json
from ..cli import step
from ..config import context_length
from ..datastore import capture_keys
from ..sweep import chosen_point
from .registry import read_items

log = logging.getLogger(__name__)
N_NEIGHBOURS_KEPT = 16  # neighbour ids kept per decoding step of a generate task (the qualitative table)


# --------------------------------------------------------------------------------------------- scoring kinds
def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m + np.log(np.sum(np.exp(x - m)))) if np.isfinite(m) else float(m)


def option_scores(options, pair_logprob, pair_len, normalize: bool = False) -> np.ndarray:
    """log Σ_{pairs of the option} p(continuation | context) (per-token mean log-probability if ``normalize``)."""
    out = np.empty(len(options))
    for j, pairs in enumerate(options):
        lp = np.asarray([pair_logprob[p] / (pair_len[p] if normalize else 1) for p in pairs], dtype=np.float64)
        out[j] = _logsumexp(lp)
    return out


def score_classify(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = True) -> np.ndarray:
    """Predicted label per item: the label whose verbalizer set is most probable as the continuation; with
    ``pmi``, domain-conditional PMI (score under the input minus score under the domain premise)."""
    preds = np.empty(len(items), np.int64)
    for i, it in enumerate(items):
        s = option_scores(it["options"], pair_logprob, pair_len)
        if pmi and it.get("domain"):
            s = s - option_scores(it["domain"], pair_logprob, pair_len)
        preds[i] = int(np.argmax(s))
    return preds


def score_choice(items: Sequence[dict], pair_logprob, pair_len, pmi: bool = False, normalize: bool = False):
    """Predicted candidate per item by its log-likelihood as continuation (sum, or per-token mean when
    ``normalize``); with ``pmi``, minus its log-likelihood under the domain premise."""
    preds = np.empty(len(items), np.int64)
    for i, it in enumerate(items):
        s = option_scores(it["options"], pair_logprob, pair_len, normalize)
        if pmi and it.get("domain"):
            s = s - option_scores(it["domain"], pair_logprob, pair_len, normalize)
        preds[i] = int(np.argmax(s))
    return preds


def predict(entry: dict, items, pair_logprob, pair_len) -> np.ndarray:
    if entry["kind"] == "classify":
        return score_classify(items, pair_logprob, pair_len, pmi=bool(entry.get("pmi")))
    return score_choice(
        items, pair_logprob, pair_len, pmi=bool(entry.get("pmi")), normalize=entry["metric"] == "accuracy_norm"
    )


def pair_logprobs(token_logprob, token_pair, n_pairs: int) -> np.ndarray:
    """Sum the scored tokens' log-probabilities per (context, continuation) pair."""
    return np.bincount(token_pair, weights=np.asarray(token_logprob, np.float64), minlength=n_pairs)


# --------------------------------------------------------------------------------------------- forward passes
def forward_padded(model, seqs: list[list[int]]):
    """One forward pass over right-padded sequences (the attention mask hides the padding)."""
    device = next(model.parameters()).device
    x = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    mask = torch.zeros_like(x)
    for b, s in enumerate(seqs):
        x[b, : len(s)] = torch.as_tensor(s)
        mask[b, : len(s)] = 1
    return model(input_ids=x.to(device), attention_mask=mask.to(device))


def _length_batches(seqs, batch: int, desc: str = ""):
    """Indices of ``seqs`` in batches of similar length, with a progress bar when ``desc`` is given."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    chunks = [order[a : a + batch] for a in range(0, len(order), batch)]
    return tqdm(chunks, desc=desc or "score", mininterval=10, disable=not desc)


# --------------------------------------------------------------------------------------------- last token
PMI_EPS = 1e-10  # eval_fuzzy.py: log(p + 1e-10)


SPACE_PROBES = ("the", "a", "of", "and", "to", "in")


def subword_index(tok) -> int:
    """Where a synonym's first subword sits in ``tok(" word")`` (special tokens included): eval_fuzzy.py's
    ``word_idx``, which is 1 after the start token of Llama-3 / Mistral and 2 for Llama-2, whose tokenizer
    puts a lone "▁" piece before every " word". Here it is read off the tokenizer: the start tokens it adds, plus
    one when " w" encodes as a lone space piece followed by the pieces of "w" for every probe word."""
    special = set(tok.all_special_ids)
    start = next(j for j, i in enumerate(tok("x", add_special_tokens=True)["input_ids"]) if i not in special)

    def split(w):
        spaced = tok(" " + w, add_special_tokens=False)["input_ids"]
        alone = tok(w, add_special_tokens=False)["input_ids"]
        return len(spaced) >= 2 and not tok.decode(spaced[:1]).strip() and spaced[1:] == alone

    return start + int(all(split(w) for w in SPACE_PROBES))


def first_subword(tok, word: str, index: int | None = None) -> int:
    """The id paper 1 reads for a synonym " word": ``tok(word)["input_ids"][subword_index(tok)]``. As in the
    paper, a word whose leading space happens to be its own piece reads that piece."""
    ids = tok(word, add_special_tokens=True)["input_ids"]
    index = subword_index(tok) if index is None else index
    if len(ids) <= index:
        raise ValueError(f"synonym {word!r} encodes to {ids}: no piece at index {index}")
    return int(ids[index])


def last_token_scores(lm_logp, premise_row, domain_row, class_slots, use_pmi: bool = True) -> np.ndarray:
    """Class scores per item [n, C] from log p at the synonym slots [Q, S]: DCPMI (eval_fuzzy.py's ``dcpmi``),
    or Σ p over the class's synonyms without PMI (its ``lm``). A synonym listed twice counts twice, as there."""
    p = np.exp(np.asarray(lm_logp, np.float64))
    out = np.empty((len(premise_row), len(class_slots)))
    for c, slots in enumerate(class_slots):
        if use_pmi:
            log_p = np.log(p[:, slots] + PMI_EPS)
            out[:, c] = (log_p[premise_row] - log_p[domain_row]).sum(axis=1)
        else:
            out[:, c] = p[premise_row][:, slots].sum(axis=1)
    return out


def last_token_cache(model, hook_point, texts: list[list[int]], slot_ids, search_fn, batch: int, desc: str = ""):
    """Forward every text once; keep log p_lm at ``slot_ids``, the K_max neighbours of its last position (distances,
    values, datastore rows) and that position's query (float16; the scaling study searches a subset with it)."""
    seqs = [list(t) for t in texts]
    lm_rows, keys = [None] * len(seqs), [None] * len(seqs)
    device = next(model.parameters()).device
    ids_t = torch.as_tensor(np.asarray(slot_ids, np.int64), device=device)
    with torch.inference_mode(), capture_keys(model, hook_point) as box:
        for chunk in _length_batches(seqs, batch, desc):
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


def last_token_logps_over_grid(cache: dict, lambdas, ks, sigmas):
    """Yield ((λ, k, σ), log p [Q, S] of the kNN-LM at the synonym slots): rescoring of the cache."""
    for sigma in sigmas:
        per_k = knnlm.knn_probs_at(cache["q_dists"], cache["q_vals"], cache["slot_ids"], ks, sigma)
        for k in ks:
            with np.errstate(divide="ignore"):
                knn = np.log(per_k[int(k)])
            for lam in lambdas:
                yield (float(lam), int(k), float(sigma)), knnlm.interpolate(cache["q_lm"], knn, lam)


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


# --------------------------------------------------------------------------------------------- pairs
def build_pairs(items, encode: Callable[[str], list], bos: int | None, max_len: int):
    """Unique (context, continuation) pairs of all items, tokenised; items' options rewritten as pair ids.

    Returns (seqs, starts, items_with_pair_ids): ``seqs[p]`` = [bos] + context + continuation (context cut from
    the left to fit ``max_len``); tokens ``seqs[p][starts[p]:]`` are the scored ones.
    """
    cache: dict[str, list] = {}

    def enc(s):
        if s not in cache:
            cache[s] = list(encode(s)) if s else []
        return cache[s]

    index: dict[tuple, int] = {}
    seqs, starts = [], []

    def pid(ctx, cont):
        key = (ctx, cont)
        if key not in index:
            c, t = enc(ctx), enc(cont)
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
        for chunk in _length_batches(seqs, batch, desc):
            out = forward_padded(model, [seqs[i] for i in chunk])
            keys = box["keys"]
            for b, i in enumerate(chunk):
                pos = torch.arange(starts[i] - 1, len(seqs[i]) - 1, device=device)
                tgt = torch.as_tensor(seqs[i][starts[i] :], device=device)
                logp = torch.log_softmax(out.logits[b, pos].float(), dim=-1)
                lp = logp.gather(-1, tgt[:, None])[:, 0]
                yield i, keys[b, pos].float().cpu().numpy(), lp.cpu().numpy()


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


def token_logprobs_over_grid(cache: dict, lambdas, ks, sigmas):
    """Yield ((λ, k, σ), log p of every scored token under the kNN-LM): rescoring of the cache."""
    d = cache["q_dists"][cache["t_row"]]
    v = cache["q_vals"][cache["t_row"]]
    for sigma in sigmas:
        per_k = knnlm.knn_target_logprobs(d, v, cache["t_target"], ks, sigma)
        for k in ks:
            for lam in lambdas:
                yield (float(lam), int(k), float(sigma)), knnlm.interpolate(cache["t_lm"], per_k[int(k)], lam)


# --------------------------------------------------------------------------------------------- generate
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
) -> dict:
    """Greedy decoding of every prompt at every point: ``None`` (the base LM) or (λ, k, σ), where each step's
    next-token distribution is ``λ·p_knn + (1−λ)·p_lm`` from the step's K_max neighbours.

    Retrieval runs once per step for the batch, on the prefixes not yet searched (prefixes agree across grid
    points until their tokens differ, so early steps are shared). Returns {"outputs": {point: [ids]},
    "neighbours": {point: [first-step neighbour ids per prompt]}}.
    """
    device = next(model.parameters()).device
    searched: dict[bytes, tuple] = {}
    outputs, neighbours = {}, {}
    with torch.inference_mode(), capture_keys(model, hook_point) as box:
        for point in points:
            gen = [[] for _ in prompts]
            first_ids: list = [None] * len(prompts)
            active = list(range(len(prompts)))
            for _step in range(max_new_tokens):
                if not active:
                    break
                still = []
                for a in range(0, len(active), batch):
                    chunk = active[a : a + batch]
                    seqs = [prompts[i] + gen[i] for i in chunk]
                    out = forward_padded(model, seqs)
                    last = torch.as_tensor([len(s) - 1 for s in seqs], device=device)
                    rows = torch.arange(len(chunk), device=device)
                    logp = torch.log_softmax(out.logits[rows, last].float(), -1).cpu().numpy().astype(np.float64)
                    logp = logp[:, :vocab_size]
                    if point is not None:
                        lam, k, sigma = point
                        keys = box["keys"][rows, last].float().cpu().numpy().astype(np.float16).astype(np.float32)
                        prefixes = [np.asarray(s, np.int64).tobytes() for s in seqs]
                        todo = [b for b, p in enumerate(prefixes) if p not in searched]
                        if todo:
                            d, v, ids = search_fn(keys[todo])
                            for j, b in enumerate(todo):
                                searched[prefixes[b]] = (d[j], v[j], ids[j, :N_NEIGHBOURS_KEPT])
                        d = np.stack([searched[p][0] for p in prefixes])
                        v = np.stack([searched[p][1] for p in prefixes])
                        p_knn = knnlm.knn_distribution(d, v, k, sigma, vocab_size)
                        with np.errstate(divide="ignore"):
                            logp = knnlm.interpolate(logp, np.log(p_knn), lam)
                        for b, i in enumerate(chunk):
                            if first_ids[i] is None:
                                first_ids[i] = searched[prefixes[b]][2].tolist()
                    nxt = np.argmax(logp, axis=1)
                    for b, i in enumerate(chunk):
                        gen[i].append(int(nxt[b]))
                        if not is_done(gen[i]):
                            still.append(i)
                active = still
            outputs[point] = gen
            neighbours[point] = first_ids
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
    from ..retrieval import search

    def fn(q):
        d, i = search(index, ds, np.ascontiguousarray(q, dtype=np.float32), K, exact, distances=distances)
        return d, ds.gather_vals(i), i

    return fn


def score(
    identity_json, manifest_json, index_path, index_meta, items_parquet, p: dict, out_npz, out_json,
    summary_csv=None, threads=1,
) -> dict:
    """Run the datastore's model over a task, retrieving at every scored position; write the task's cache."""
    from ..retrieval import open_retriever

    entry, t0 = p["entry"], time.time()
    model, tok, ident, ds, index, imeta = open_retriever(
        identity_json, manifest_json, index_path, index_meta, p, threads
    )
    K = p["k_max"]
    search_fn = _search(index, ds, K, imeta["exact"], p.get("distances") or "exact")
    items = read_items(items_parquet)
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    def encode(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    meta = {"task": p["task"], "kind": entry["kind"], "K": K, "n_items": len(items), "manifest_sha256": ds.hash}
    if entry.get("protocol") == "last_token":
        cache, struct, classes = score_last_token(
            model, tok, ident, entry, items, search_fn, p["block_size"], p["batch_size"]
        )
        meta.update(protocol="last_token", n_queries=int(len(cache["q_dists"])), n_slots=int(cache["slot_ids"].size))
        record = {"meta": meta, "items": struct, "classes": classes}
    elif entry["kind"] in ("classify", "choice"):
        seqs, starts, struct = build_pairs(items, encode, bos, p["block_size"])
        cache = score_cache(model, ident["hook_point"], seqs, starts, search_fn, p["batch_size"], "score")
        cache["pair_len"] = np.asarray([len(s) - st for s, st in zip(seqs, starts, strict=True)], np.int64)
        meta.update(n_pairs=len(seqs), n_tokens=int(cache["t_pair"].size), n_queries=int(len(cache["q_dists"])))
        record = {"meta": meta, "items": [{k: it[k] for k in ("options", "domain", "gold")} for it in struct]}
    else:
        gcfg = p["generate"]
        max_new = int(entry.get("max_new_tokens", gcfg["max_new_tokens"]))
        stops = entry.get("stop", ["\n"])
        keep = generation_window(model, p["block_size"], max_new)
        prompts = [([bos] + encode(it["context"]))[-keep:] for it in items]
        chosen, _ = chosen_point(summary_csv, p["datastore"], p.get("point"))
        points = [None]
        if gcfg["points"] == "grid":
            g = p["grid"]
            points += [(float(lam), int(k), float(s)) for s in g["sigmas"] for k in g["ks"] for lam in g["lambdas"]]
        if chosen is not None and chosen not in points:
            points.append(chosen)
        eos = tok.eos_token_id

        def done(ids):
            return (eos is not None and ids[-1] == eos) or any(s in tok.decode(ids) for s in stops)

        res = greedy_generate(
            model,
            ident["hook_point"],
            prompts,
            points,
            search_fn,
            ident["vocab_size"],
            max_new,
            done,
            p["batch_size"],
        )
        record = {
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
        cache = {"generated_points": np.asarray([len(record["points"])])}
    meta["seconds"] = round(time.time() - t0, 2)
    with atomic_path(out_npz, ".npz") as tmp:
        np.savez(tmp, **cache)
        meta["npz_sha256"] = sha256_file(tmp)  # task_sweep refuses an npz altered since
    write_json(out_json, record)
    log.info("scored %s in %.1fs", p["task"], time.time() - t0)
    return meta



@step
def score_task(
    params: dict, model_json: Path, manifest: Path, index: Path, index_meta: Path, items: Path, npz: Path,
    scored_json: Path, summary: Path | None = None, threads: int = 1,
) -> None:
    """Score a task against a datastore: its retrieval cache (teacher-forced kinds) or its decoded answers
    (generate, at the base LM and the point chosen on perplexity in --summary)."""
    from ..lm import torch_threads

    torch_threads(threads)
    score(model_json, manifest, index, index_meta, items, params, npz, scored_json, summary, threads)
