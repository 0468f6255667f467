"""What the datastore returned: for a scored position, its nearest neighbours with their distance, their value token
and the text that produced each key (the tokens of the key's window in the datastore corpus, up to the key's
position), beside the base LM's and the kNN-LM's probability of the gold token.

A datastore row maps back to its corpus position through the manifest: shards are concatenated in manifest order,
and shard s's rows are its positions [start, end) in order (``datastore_positions``); a subsampled datastore's row
is first mapped to its parent's row (its ``rows.npy``, checked against the sha256 its manifest records), and so on
to an extracted datastore. The key at position p is the model's hook-point state of token p in its window (blocks of
``extraction.block_size`` counted from 0, or the strided windows its manifest records), its value token p + 1; every
view checks that value against the datastore's own values, so a wrong mapping is refused, not shown.

Steps: ``eval-neighbours`` (the default run's table: the eval positions where the kNN-LM gains and loses most) and
``neighbours`` (one position by hand, printed). ``tasks/neighbours.py`` does the same for task items.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl

from . import knnlm
from .artifacts import ArtifactError, load_npy, sha256_file, write_table
from .cli import step
from .datastore import Datastore, manifest_hash
from .retrieval_cache import load_cache
from .sweep import chosen_point

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- rows -> positions
def _parent_rows(ds: Datastore) -> tuple[Path, np.ndarray]:
    """A subsampled datastore's parent manifest and its rows.npy (the parent's row of each of its rows), checked."""
    rec = ds.manifest["subsample"]
    rows_npy, parent = ds.path.parent / "rows.npy", Path(rec["of"])
    if not rows_npy.exists() or sha256_file(rows_npy) != rec.get("rows_sha256"):
        raise ArtifactError(f"{rows_npy}: missing, or its sha256 differs from the one {ds.path} records; rerun "
                            f"subsample_datastore (snakemake --forcerun {ds.path})")
    if not parent.exists() or manifest_hash(parent) != rec["manifest_sha256"]:
        raise ArtifactError(f"{ds.path}: a subsample of {parent}, which is missing or was rebuilt since (its digest "
                            f"differs from the recorded one); rerun subsample_datastore (snakemake --forcerun "
                            f"{ds.path})")
    rows = load_npy(rows_npy, mmap=True, dtype=np.int64, ndim=1)
    if rows.size != ds.rows:
        raise ArtifactError(f"{rows_npy}: {rows.size} rows, {ds.path} has {ds.rows}; rerun subsample_datastore")
    return parent, rows


class RowPositions:
    """Global rows of a datastore -> corpus positions, its manifests (and a subsample's rows.npy) read and checked
    once: row r of shard s is position start_s + r − offset_s (offset_s the rows of the shards before it); a
    subsample's row is first its parent's row. ``root``: the extracted datastore whose corpus it is."""

    def __init__(self, manifest_json):
        ds = Datastore(manifest_json, deep=False)
        self.path, self.rows, self.maps = ds.path, ds.rows, []
        while "subsample" in ds.manifest:
            parent, parent_rows = _parent_rows(ds)
            self.maps.append(parent_rows)
            ds = Datastore(parent, deep=False)
        for i, s in enumerate(ds.manifest["shards"]):
            if "start" not in s or s["end"] - s["start"] != s["rows"]:
                raise ArtifactError(f"{ds.path}: shard {i} records no position range of {s['rows']} rows "
                                    f"({s.get('start')}..{s.get('end')}); rerun datastore_manifest")
        self.root, self.starts = ds, np.asarray([s["start"] for s in ds.manifest["shards"]], np.int64)

    def __call__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.rows):
            raise ArtifactError(f"datastore rows {int(rows.min())}..{int(rows.max())} outside {self.path} "
                                f"({self.rows} rows)")
        for m in self.maps:
            rows = np.asarray(m[rows], np.int64)
        shard = np.searchsorted(self.root.offsets, rows, side="right") - 1
        return self.starts[shard] + rows - self.root.offsets[shard]


def datastore_positions(manifest_json, rows) -> tuple[np.ndarray, Datastore]:
    """The corpus position of each global row of a datastore (any shape), and the extracted datastore whose corpus
    it is (``RowPositions``)."""
    where = RowPositions(manifest_json)
    return where(rows), where.root


def key_windows(ds: Datastore, block: int) -> tuple[int, int | None]:
    """(block, stride) of the windows a datastore's keys were computed in: its manifest's strided ``window``, else
    non-overlapping blocks of ``block`` (extraction.block_size)."""
    w = ds.manifest.get("window")
    return (int(w["block_size"]), int(w["stride"])) if w else (int(block), None)


def window_start(position: int, block: int, stride: int | None) -> int:
    """The first token of the window whose state at ``position`` is the key (or query) there."""
    if stride is None:
        return position - position % block
    from .datastore import context_start  # strided windows (run_clm.py's), where the datastore has them

    return context_start(position, block, stride)


class Corpus:
    """A datastore's corpus tokens, checked against the manifest that records them, and its rows' positions."""

    def __init__(self, manifest_json, tokens_npy, block: int, parents=None):
        self.manifest_json, self.tokens_npy = Path(manifest_json), Path(tokens_npy)
        self.view = Datastore(manifest_json, deep=False)  # the datastore searched: its values are the shown ones
        sub = self.view.manifest.get("subsample")
        want = {Path(sub["of"]).resolve()} if sub else set()
        if parents is not None and {Path(f).resolve() for f in parents} != want:
            raise ArtifactError(f"{manifest_json}: its parent manifest is {sorted(map(str, want)) or 'none'}, given "
                                f"{[str(f) for f in parents]} (--parents)")
        self.where = RowPositions(manifest_json)
        root = self.where.root
        if sha256_file(tokens_npy) != root.manifest["tokens_sha256"]:
            raise ArtifactError(f"{tokens_npy}: not the tokens {root.path} was extracted from (sha256 differs from "
                                f"its tokens_sha256); give that datastore's corpus tokens")
        self.tokens = load_npy(tokens_npy, mmap=True, dtype=np.int32, ndim=1)
        self.block, self.stride = key_windows(root, block)

    def rows(self, rows) -> list[dict]:
        """Per row: its corpus position, the first token of its key's window, its value (checked against the
        corpus token after the position)."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        pos = self.where(rows)
        vals = self.view.gather_vals(rows)
        out = []
        for r, p, v in zip(rows.tolist(), pos.tolist(), vals.tolist(), strict=True):
            if int(self.tokens[p + 1]) != v:
                raise ArtifactError(f"{self.manifest_json}: row {r} maps to position {p} of {self.tokens_npy}, whose "
                                    f"next token {int(self.tokens[p + 1])} is not the row's value {v}: the manifest's "
                                    f"positions are wrong; rerun datastore_manifest")
            out.append({"row": r, "position": p, "window_start": window_start(p, self.block, self.stride),
                        "value_id": v})
        return out


def shown_context(tok, tokens, start: int, position: int, window: int) -> str:
    """The last ``window`` tokens of tokens[start : position + 1], decoded."""
    return tok.decode(np.asarray(tokens[max(start, position - window + 1) : position + 1]).tolist())


def neighbour_rows(tok, corpus: Corpus, ids, dists, gold: int, window: int) -> list[dict]:
    """The shown columns of each neighbour (nearest first)."""
    return [{"rank": i + 1, "row": r["row"], "corpus_position": r["position"], "distance": float(d),
             "value_id": r["value_id"], "value": tok.decode([r["value_id"]]), "value_is_gold": r["value_id"] == gold,
             "neighbour_context": shown_context(tok, corpus.tokens, r["window_start"], r["position"], window)}
            for i, (r, d) in enumerate(zip(corpus.rows(ids), np.asarray(dists).tolist(), strict=True))]


# --------------------------------------------------------------------------------------------- eval positions
def position_view(cache: dict, eval_tokens, corpus: Corpus, tok, point, positions, p: dict) -> list[dict]:
    """Rows (one per neighbour) of the given eval positions of a retrieval cache at (λ, k, σ) ``point``."""
    lam, k, sigma = point
    window, n_neigh = int(p["window"]), int(p["neighbours"])
    positions = np.asarray(positions, np.int64)
    n = len(cache["targets"])
    if positions.size and (positions.min() < 0 or positions.max() >= n):
        raise ValueError(f"eval position {int(positions.max() if positions.max() >= n else positions.min())} "
                         f"outside the {n} scored positions of the retrieval cache")
    d, v = np.asarray(cache["dists"][positions]), np.asarray(cache["vals"][positions])
    gold = np.asarray(cache["targets"][positions])
    lm = np.asarray(cache["lm_logprob"][positions], np.float64)
    knn = knnlm.interpolate(lm, knnlm.knn_target_logprobs(d, v, gold, [k], sigma)[k], lam)
    qblock = (cache["meta"].get("window") or {}).get("block_size", corpus.block)
    qstride = (cache["meta"].get("window") or {}).get("stride")
    out = []
    for j, pos in enumerate(positions.tolist()):
        if int(eval_tokens[pos + 1]) != int(gold[j]):
            raise ArtifactError(f"retrieval cache target {int(gold[j])} at position {pos} is not token {pos + 1} of "
                                f"the eval set ({int(eval_tokens[pos + 1])}); rerun retrieve")
        ctx = shown_context(tok, eval_tokens, window_start(pos, qblock, qstride), pos, window)
        head = {"position": pos, "context": ctx, "gold": tok.decode([int(gold[j])]), "lm_prob": float(np.exp(lm[j])),
                "knnlm_prob": float(np.exp(knn[j])), "gain_nats": float(knn[j] - lm[j]), "lambda": lam, "k": k,
                "sigma": sigma}
        ids = cache["ids"][pos, : min(n_neigh, k)]
        out += [head | r for r in neighbour_rows(tok, corpus, ids, cache["dists"][pos, : len(ids)], int(gold[j]),
                                                 window)]
    return out


def gains_and_losses(cache: dict, point, n: int) -> dict[str, np.ndarray]:
    """The ``n`` positions where the kNN-LM raises log p(gold) most over the base LM, and the ``n`` where it lowers
    it most (ties: the earlier position)."""
    lam, k, sigma = point
    lm = np.asarray(cache["lm_logprob"], np.float64)
    knn = knnlm.knn_target_logprobs(cache["dists"], cache["vals"], cache["targets"], [k], sigma)[k]
    gain = knnlm.interpolate(lm, knn, lam) - lm
    return {"gain": np.argsort(-gain, kind="stable")[:n], "loss": np.argsort(gain, kind="stable")[:n]}


VIEW_COLUMNS = ["position", "context", "gold", "lm_prob", "knnlm_prob", "gain_nats", "lambda", "k", "sigma", "rank",
                "row", "corpus_position", "distance", "value_id", "value", "value_is_gold", "neighbour_context"]


def load_tokenizer(model_json):
    from . import lm  # the tokenizer (transformers, torch): imported by these steps alone

    return lm.load_tokenizer(lm.load_identity(model_json))


def _eval_set(cache_meta, manifest, eval_tokens) -> tuple[dict, np.ndarray]:
    cache = load_cache(Path(cache_meta).parent, manifest, tokens_npy=eval_tokens)
    return cache, load_npy(eval_tokens, mmap=True, dtype=np.int32, ndim=1)


def eval_table(p: dict, caches, manifest, ds_tokens, eval_tokens, model_json, summary, parents=None) -> pl.DataFrame:
    """Per eval set (``p['eval_sets']``, with their ``caches`` and ``eval_tokens`` in that order): the positions
    where the kNN-LM (at the point chosen on perplexity) gains and loses most, each with its nearest neighbours."""
    corpus, tok = Corpus(manifest, ds_tokens, p["block_size"], parents), load_tokenizer(model_json)
    point, chosen_on = chosen_point(summary, p["datastore"])
    if point is None:
        raise ArtifactError(f"{summary}: no row for datastore {p['datastore']!r}; rerun summarize")
    rows = []
    for name, cache_meta, toks in zip(p["eval_sets"], caches, eval_tokens, strict=True):
        cache, ev = _eval_set(cache_meta, manifest, toks)
        for kind, positions in gains_and_losses(cache, point, int(p["positions"])).items():
            rows += [{"eval_set": name, "kind": kind} | r
                     for r in position_view(cache, ev, corpus, tok, point, positions, p)]
    log.info("%d rows at λ=%g, k=%d, σ=%g (%s)", len(rows), *point, chosen_on)
    return pl.DataFrame(rows, schema_overrides={"value_is_gold": pl.Boolean}).select(
        ["eval_set", "kind", *VIEW_COLUMNS])


# --------------------------------------------------------------------------------------------- steps
@step
def eval_neighbours(params: dict, cache: list[Path], manifest: Path, ds_tokens: Path, eval_tokens: list[Path],
                    model_json: Path, summary: Path, csv: Path, parquet: Path, parents: list[Path] = ()) -> None:
    """The eval positions where the kNN-LM gains and loses most (--params: eval_sets, datastore, block_size,
    positions, neighbours, window; a --cache meta.json and --eval-tokens per eval set), each with its nearest
    neighbours: distance, value, the text of the key's window in the datastore corpus, and the base LM's and
    kNN-LM's probability of the gold token. --parents: a subsample's parent manifest (none for an extracted
    datastore)."""
    write_table(eval_table(params, cache, manifest, ds_tokens, eval_tokens, model_json, summary, parents), csv,
                parquet)


@step
def neighbours(cache: Path, manifest: Path, ds_tokens: Path, eval_tokens: Path, model_json: Path, position: int,
               summary: Path | None = None, point: str = "", block_size: int = 0, show: int = 8,
               window: int = 24) -> None:
    """Print one eval position's nearest neighbours, by hand: --cache results/retrieval/<eval set>/<ds>/meta.json,
    --manifest, --ds-tokens (the datastore's corpus tokens), --eval-tokens, --model-json, --position; the kNN-LM at
    --point 'λ,k,σ' or the point --summary (perplexity_summary.csv) chose; --block-size is extraction.block_size."""
    if not block_size:
        raise SystemExit("--block-size: extraction.block_size of the run (the keys' windows)")
    cache_, ev = _eval_set(cache, manifest, eval_tokens)
    corpus, tok = Corpus(manifest, ds_tokens, block_size), load_tokenizer(model_json)
    if point:
        lam, k, sigma = (float(x) for x in point.split(","))
        pt = (lam, int(k), sigma)
    else:
        pt, _ = chosen_point(summary, Path(manifest).parent.name)
        if pt is None:
            raise SystemExit("give --point 'λ,k,σ' or a --summary with a row for this datastore")
    rows = position_view(cache_, ev, corpus, tok, pt, [position], {"window": window, "neighbours": show})
    print(json.dumps(rows, indent=1, ensure_ascii=False))
