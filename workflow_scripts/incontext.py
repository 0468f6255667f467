"""In-context retrieval augmentation beside the kNN-LM (Ram et al. 2023, "In-Context Retrieval-Augmented Language
Models"): the datastore's corpus cut into passages, a BM25 retriever over them (``bm25s``), and the perplexity of an
eval set with the top passage(s) put before each stretch of ``incontext.stride`` tokens, retrieved with the
``incontext.query_tokens`` tokens before it; the tasks' side is ``tasks/incontext.py``.

The passages are ``[start, end)`` ranges of the datastore's token stream (``incontext.passage_tokens`` long, the last
one shorter), so each maps back to its corpus position; a passage that shares an n-gram of ``incontext.leak_ngram``
tokens with an eval set's text is left out (docs/incontext.md). The eval set is scored in the windows its retrieval
cache was (blocks of ``extraction.block_size`` positions): a stretch's input is the passage(s), then the window's own
tokens up to the stretch's end, cut from the left to fit the window, and only the stretch's tokens are scored, so
the base LM, the kNN-LM and in-context retrieval are compared on the same targets.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from .artifacts import ArtifactError, atomic_path, load_npy, read_json, read_table, sha256_file, write_json, write_table
from .cli import step
from .sweep import METHODS

log = logging.getLogger(__name__)
HASH_BASE = np.uint64(1_000_003)  # the polynomial n-gram hash (mod 2^64) of the leak check


# --------------------------------------------------------------------------------------------- passages
def passage_spans(n_tokens: int, length: int) -> np.ndarray:
    """[P, 2] int64: consecutive [start, end) ranges of ``length`` tokens covering the stream (the last shorter)."""
    starts = np.arange(0, n_tokens, length, dtype=np.int64)
    return np.stack([starts, np.minimum(starts + length, n_tokens)], axis=1)


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """The hash of every n-gram ``tokens[i : i + n]`` (uint64, wrapping), one per start i; empty when shorter."""
    t = np.asarray(tokens, np.uint64)
    m = t.size - n + 1
    if m <= 0:
        return np.empty(0, np.uint64)
    h = np.zeros(m, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * HASH_BASE + t[j : j + m]
    return h


def leaked(tokens: np.ndarray, spans: np.ndarray, eval_streams: list[np.ndarray], n: int) -> np.ndarray:
    """[P] bool: passages holding a token of an n-gram that also occurs in an eval stream (the eval text itself)."""
    found = np.concatenate([ngram_hashes(e, n) for e in eval_streams] or [np.empty(0, np.uint64)])
    hit = np.isin(ngram_hashes(tokens, n), found)
    starts = np.flatnonzero(hit)
    cover = np.zeros(tokens.size + 1, np.int64)  # +1 at a matching n-gram's start, -1 after its end
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    inside = (np.cumsum(cover[:-1]) > 0).astype(np.int64)  # token i lies in a matching n-gram
    per = np.add.reduceat(inside, spans[:, 0]) if len(spans) else np.empty(0, np.int64)
    return per > 0


def bm25_tokenize(texts: list[str]):
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", show_progress=False)


def build_passages(tokens_npy, identity_json, eval_tokens: dict, p: dict, out_meta) -> dict:
    """Cut the datastore's token stream into passages, leave out those overlapping an eval set's text, index the rest
    with BM25, and write ``passages.npy`` (their [start, end)), ``bm25/`` and ``meta.json`` (every file's sha256 and
    the digests of the tokens, tokenizer and eval sets they were made from) beside ``out_meta``."""
    import bm25s

    from .lm import load_identity, load_tokenizer

    t0 = time.time()
    ident = load_identity(identity_json)
    tok = load_tokenizer(ident)
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    spans = passage_spans(tokens.size, p["passage_tokens"])
    streams = {name: load_npy(f, dtype=np.int32, ndim=1) for name, f in eval_tokens.items()}
    out = leaked(tokens, spans, list(streams.values()), p["leak_ngram"])
    kept = spans[~out]
    if not len(kept):
        raise ValueError(f"{tokens_npy}: every one of its {len(spans)} passages shares an n-gram of "
                         f"incontext.leak_ngram = {p['leak_ngram']} tokens with an eval set ({', '.join(eval_tokens)})"
                         ": no passage is left to retrieve")
    texts = tok.batch_decode([tokens[a:b].tolist() for a, b in kept])
    retriever = bm25s.BM25()
    retriever.index(bm25_tokenize(texts), show_progress=False)
    outdir = Path(out_meta).parent
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".bm25.", dir=outdir))
    try:
        retriever.save(tmp)
        if (outdir / "bm25").exists():
            shutil.rmtree(outdir / "bm25")
        tmp.replace(outdir / "bm25")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with atomic_path(outdir / "passages.npy", ".npy") as f:
        np.save(f, kept, allow_pickle=False)
    files = ["passages.npy", *sorted(f"bm25/{f.name}" for f in (outdir / "bm25").iterdir())]
    meta = {
        "tokens_sha256": sha256_file(tokens_npy),
        "tokenizer_sha256": ident["tokenizer_sha256"],
        "model_sha256": ident["model_sha256"],
        "eval_tokens_sha256": {name: sha256_file(f) for name, f in eval_tokens.items()},
        "passage_tokens": p["passage_tokens"],
        "leak_ngram": p["leak_ngram"],
        "passages": int(len(kept)),
        "excluded": int(out.sum()),
        "sha256": {f: sha256_file(outdir / f) for f in files},
        "seconds": round(time.time() - t0, 2),
    }
    write_json(out_meta, meta)
    log.info("%d passages of %d tokens, %d left out as overlapping an eval set (%.1fs)", len(kept),
             p["passage_tokens"], int(out.sum()), meta["seconds"])
    return meta


class Passages:
    """A datastore's passages and their BM25 retriever, checked: every file against the sha256 ``meta.json``
    recorded, the token stream and (with ``ident``) the tokenizer against those they were made from."""

    def __init__(self, meta_json, tokens_npy, ident: dict | None = None):
        meta_json = Path(meta_json)
        self.meta = meta = read_json(meta_json)
        rerun = f"rerun passages for it (snakemake --forcerun {meta_json})"
        for f, digest in (meta.get("sha256") or {"passages.npy": None}).items():
            if not (meta_json.parent / f).exists() or sha256_file(meta_json.parent / f) != digest:
                raise ArtifactError(f"{meta_json.parent / f}: missing, or its sha256 differs from the one recorded in "
                                    f"{meta_json} when it was written; {rerun}")
        if sha256_file(tokens_npy) != meta["tokens_sha256"]:
            raise ArtifactError(f"{meta_json}: made from another token stream than {tokens_npy}; {rerun}")
        if ident is not None and ident["tokenizer_sha256"] != meta["tokenizer_sha256"]:
            raise ArtifactError(f"{meta_json}: made with another tokenizer than the model's ({ident['path']}); {rerun}")
        import bm25s

        self.digest = sha256_file(meta_json)
        self.tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
        self.spans = load_npy(meta_json.parent / "passages.npy", dtype=np.int64, ndim=2)
        self.retriever = bm25s.BM25.load(meta_json.parent / "bm25")

    def top(self, queries: list[str], n: int) -> np.ndarray:
        """[Q, n] passage indices, best first; -1 where the passage scores 0 (no query term in it) or none is left."""
        k = min(n, len(self.spans))
        idx, scores = self.retriever.retrieve(bm25_tokenize(queries), k=k, show_progress=False, n_threads=1)
        out = np.where(scores > 0, idx, -1).astype(np.int64)
        return np.pad(out, ((0, 0), (0, n - k)), constant_values=-1)

    def ids(self, picked) -> list[int]:
        """The token ids of the passages ``picked`` (indices, -1 skipped), concatenated best first."""
        return [t for i in picked if i >= 0 for t in self.tokens[self.spans[i, 0] : self.spans[i, 1]].tolist()]


# --------------------------------------------------------------------------------------------- perplexity
def stretches(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(window start, first, end) of every stretch: the positions [0, n) in windows of ``block`` positions (the
    retrieval cache's non-overlapping blocks), each window cut into stretches of ``stride`` positions."""
    return [(a, j, min(j + stride, a + block, n)) for a in range(0, n, block) for j in range(a, min(a + block, n),
                                                                                              stride)]


def incontext_logprobs(model, tokens: np.ndarray, n: int, passages: Passages, p: dict, tok, block: int,
                       batch: int) -> tuple[np.ndarray, np.ndarray]:
    """log p(tokens[i + 1]) for positions i in [0, n) with the top passage(s) before each stretch, and the start (in
    the datastore's stream) of each position's top passage (-1: none). A stretch [j, e) of the window starting at a
    is retrieved with the text of ``tokens[max(a, j + 1 - query_tokens) : j + 1]`` and scored from the input
    passage(s) + ``tokens[lo : e]``, lo = max(a, e - (block - passage length)) <= j: its last e - j positions."""
    import torch

    room = p["passages"] * p["passage_tokens"]
    if p["stride"] + room > block:
        raise ValueError(f"incontext.stride ({p['stride']}) + incontext.passages x passage_tokens ({room}) exceed the "
                         f"window of extraction.block_size = {block} tokens: the stretch would not fit beside its "
                         f"passages")
    parts = stretches(n, block, p["stride"])
    queries = [tok.decode(tokens[max(a, j + 1 - p["query_tokens"]) : j + 1].tolist()) for a, j, _ in parts]
    top = passages.top(queries, p["passages"])
    groups: dict[tuple[int, int], list] = {}  # inputs alike in length and scored count batch together, unpadded
    for (a, j, e), picked in zip(parts, top, strict=True):
        pre = passages.ids(picked)
        lo = max(a, e - (block - len(pre)))
        x = pre + tokens[lo:e].tolist()  # its last e - j positions are the stretch's
        groups.setdefault((len(x), e - j), []).append((x, j, e))
    lp = np.empty(n, np.float32)
    device = next(model.parameters()).device
    with torch.inference_mode():
        for (_, scored), group in sorted(groups.items()):
            for b in range(0, len(group), batch):
                chunk = group[b : b + batch]
                x = torch.as_tensor([g[0] for g in chunk], dtype=torch.long, device=device)
                logp = torch.log_softmax(model(input_ids=x).logits[:, -scored:].float(), dim=-1).cpu().numpy()
                for r, (_, j, e) in enumerate(chunk):
                    lp[j:e] = logp[r, np.arange(scored), tokens[j + 1 : e + 1]]
    first = np.full(n, -1, np.int64)
    for (_, j, e), picked in zip(parts, top, strict=True):
        if picked[0] >= 0:
            first[j:e] = passages.spans[picked[0], 0]
    return lp, first


def incontext_perplexity(cache_meta, manifest_json, tokens_npy, passages_meta, ds_tokens_npy, identity_json,
                         summary_csv, p: dict, csv, parquet, out_json) -> dict:
    """Per scored token of an eval set: log p of the base LM (the retrieval cache's), of the kNN-LM at the point
    chosen on perplexity (``results/sweeps/summary.csv``) and with in-context retrieval; the table and its record."""
    from . import devices, knnlm
    from .lm import load_checked
    from .retrieval_cache import load_cache
    from .sweep import chosen_point

    t0 = time.time()
    cache = load_cache(Path(cache_meta).parent, manifest_json, tokens_npy=tokens_npy)
    if cache["meta"].get("window"):
        raise ValueError(f"{cache_meta}: queries in sliding windows ({cache['meta']['window']}); in-context "
                         f"retrieval scores non-overlapping blocks only: drop the eval set's stride")
    point, chosen_on = chosen_point(summary_csv, p["datastore"], p.get("point"))
    if point is None:
        raise ValueError(f"{summary_csv}: no row for datastore {p['datastore']!r}")
    lam, k, sigma = point
    knn = knnlm.interpolate(cache["lm_logprob"],
                            knnlm.knn_target_logprobs(cache["dists"], cache["vals"], cache["targets"], [k], sigma)[k],
                            lam)
    device = p["device"]
    dtype = devices.model_dtype(device, p["dtype"])
    model, tok, ident = load_checked(identity_json, device=device, dtype=dtype, block_size=p["block_size"])
    passages = Passages(passages_meta, ds_tokens_npy, ident)
    tokens = load_npy(tokens_npy, dtype=np.int32, ndim=1)
    n = int(cache["meta"]["n_tokens"])
    if p.get("max_tokens"):
        n = min(n, p["max_tokens"])  # the first max_tokens of the cache's positions, in the same windows
    lp, first = incontext_logprobs(model, tokens, n, passages, p, tok, p["block_size"], p["batch_size"])
    df = pl.DataFrame({
        "position": np.arange(n, dtype=np.int64),
        "target": cache["targets"][:n].astype(np.int64),
        "base": np.asarray(cache["lm_logprob"][:n], np.float64),
        "knn": np.asarray(knn[:n], np.float64),
        "incontext": lp.astype(np.float64),
        "passage_start": first,
    })
    write_table(df, csv, parquet)
    record = {
        "eval_set": p["eval_set"], "datastore": p["datastore"], "n_tokens": n,
        "lambda": lam, "k": k, "sigma": sigma, "chosen_on": chosen_on,
        "cache_meta_sha256": sha256_file(cache_meta), "passages_meta_sha256": passages.digest,
        "model_sha256": ident["model_sha256"], "parquet_sha256": sha256_file(parquet),
        "no_passage": int((first < 0).sum()), "seconds": round(time.time() - t0, 2),
    }
    write_json(out_json, record)
    log.info("%s on %s: in-context ppl %.3f, base %.3f, kNN-LM %.3f over %d tokens", p["eval_set"], p["datastore"],
             np.exp(-df["incontext"].mean()), np.exp(-df["base"].mean()), np.exp(-df["knn"].mean()), n)
    return record


def read_scored(record_json) -> tuple[dict, pl.DataFrame]:
    """A per-token (or per-item) table and its record, the table checked against the sha256 the record holds."""
    record = read_json(record_json)
    parquet = Path(record_json).with_suffix(".parquet")
    if sha256_file(parquet) != record.get("parquet_sha256"):
        raise ArtifactError(f"{parquet}: its sha256 differs from the one {record_json} recorded when both were "
                            f"written; rerun the job that writes them (snakemake --forcerun {record_json})")
    return record, read_table(parquet)


def perplexity_table(records: list, p: dict) -> pl.DataFrame:
    """Per (eval set, datastore, method): the perplexity with a 95% block-bootstrap interval, and Δ mean NLL
    against the base LM with its interval (resampling whole windows, as the scaling study does)."""
    from .scaling import block_bootstrap_means

    rows = []
    for f in records:
        record, df = read_scored(f)
        nll = -np.stack([df[m].to_numpy() for m in METHODS])  # [3, N]
        reps = block_bootstrap_means(np.concatenate([nll, nll[1:] - nll[:1]]), p["block_size"], p["n_boot"],
                                     p["seed"])
        lo, hi = np.quantile(reps, [0.025, 0.975], axis=0)
        for i, m in enumerate(METHODS):
            d = i + 2  # the row of method i's Δ in reps
            rows.append({
                "eval_set": record["eval_set"], "datastore": record["datastore"], "method": m,
                "n_tokens": record["n_tokens"], "ppl": float(np.exp(nll[i].mean())),
                "ppl_lo": float(np.exp(lo[i])), "ppl_hi": float(np.exp(hi[i])),
                "delta_nll": float((nll[i] - nll[0]).mean()),
                "delta_lo": float(lo[d]) if i else 0.0, "delta_hi": float(hi[d]) if i else 0.0,
            })
    return pl.DataFrame(rows).sort(["datastore", "eval_set", "method"])


# --------------------------------------------------------------------------------------------- steps
@step
def passages(params: dict, tokens: Path, model_json: Path, eval_tokens: list[Path], meta: Path,
             eval_names: str = "") -> None:
    """Cut a datastore's token stream (--tokens) into passages, leave out those sharing an n-gram of
    params.leak_ngram tokens with any --eval-tokens stream, and index the rest with BM25 (--meta: the record)."""
    names = eval_names.split(",") if eval_names else [f.stem for f in eval_tokens]
    build_passages(tokens, model_json, dict(zip(names, eval_tokens, strict=True)), params, meta)


@step(name="incontext-perplexity")
def incontext_perplexity_step(params: dict, cache: Path, manifest: Path, tokens: Path, passages: Path,
                              ds_tokens: Path, model_json: Path, summary: Path, csv: Path, parquet: Path,
                              record: Path, threads: int = 1) -> None:
    """Score an eval set with in-context retrieval over a datastore's passages, beside the base LM and the kNN-LM
    from its retrieval cache (--cache: its meta.json)."""
    from .lm import torch_threads

    torch_threads(threads)
    incontext_perplexity(cache, manifest, tokens, passages, ds_tokens, model_json, summary, params, csv, parquet,
                         record)


@step(name="incontext-perplexity-table")
def incontext_perplexity_table(params: dict, records: list[Path], csv: Path, parquet: Path) -> None:
    """The perplexity of the base LM, the kNN-LM and in-context retrieval per (eval set, datastore), with 95%
    bootstrap intervals."""
    write_table(perplexity_table(records, params), csv, parquet)


@step(name="figure-incontext")
def figure_incontext(params: dict, perplexity: Path, png: Path, pdf: Path, tasks: list[Path] = ()) -> None:
    """A datastore's figure: perplexity of the base LM, the kNN-LM and in-context retrieval per eval set, and
    (with --tasks) each one's task Δ against the base LM per category, with 95% bootstrap intervals."""
    from .figures import plt, save

    ds = params["datastore"]
    ppl = read_table(perplexity).filter(pl.col("datastore") == ds)
    frames = [read_table(f).filter((pl.col("datastore") == ds) & pl.col("task").str.starts_with("all ")) for f in tasks]
    fig, axes = plt.subplots(1, 1 + bool(frames), figsize=(5 + 4 * bool(frames), 3.5), squeeze=False)
    colors = {"base": "0.5", "knn": "tab:blue", "incontext": "tab:orange"}
    names = {"base": "base LM", "knn": "kNN-LM", "incontext": "in-context retrieval"}
    sets = ppl["eval_set"].unique(maintain_order=True).to_list()
    for i, m in enumerate(METHODS):
        r = ppl.filter(pl.col("method") == m)
        x = np.arange(len(sets)) + (i - 1) * 0.25
        y = r["ppl"].to_numpy()
        axes[0, 0].bar(x, y, 0.25, color=colors[m], label=names[m],
                       yerr=[y - r["ppl_lo"].to_numpy(), r["ppl_hi"].to_numpy() - y], capsize=3)
    axes[0, 0].set_xticks(range(len(sets)), sets)
    axes[0, 0].set_ylabel("perplexity")
    axes[0, 0].set_title(f"datastore {ds}")
    axes[0, 0].legend(fontsize=8)
    if frames:
        t = frames[0]
        cats = t["category"].unique(maintain_order=True).to_list()
        for i, m in enumerate(METHODS[1:]):
            r = t.filter(pl.col("method") == m)
            y = r["delta"].to_numpy()
            axes[0, 1].barh(np.arange(len(cats)) + (i - 0.5) * 0.35, y, 0.35, color=colors[m], label=names[m],
                            xerr=[y - r["lo"].to_numpy(), r["hi"].to_numpy() - y], capsize=3)
        axes[0, 1].axvline(0, color="0.3", ls="--", lw=0.8)
        axes[0, 1].set_yticks(range(len(cats)), cats)
        axes[0, 1].set_xlabel("Δ task score vs base LM")
        axes[0, 1].legend(fontsize=8)
    save(fig, png, pdf)

