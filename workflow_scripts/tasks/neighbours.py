"""What the datastore returned for task items (``neighbours.py`` does eval positions): an item's query, its nearest
neighbours (distance, value, the text of the key's window in the datastore corpus) and the base LM's and kNN-LM's
probability of its gold token, at the point its task summary records.

An item's query is the one its task's scoring searched with: for choice tasks the prefix before the gold answer's
first token (the position whose neighbours predictions.parquet keeps), for classify (paper 1's memory protocol) the
premise's last position, whose gold token is the gold class's first synonym. Generate tasks decode their answers and
keep no per-item query, so they have no neighbour view.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl

from .. import knnlm
from ..artifacts import read_json, write_table
from ..cli import step
from ..neighbours import VIEW_COLUMNS, Corpus, load_tokenizer, neighbour_rows
from .evaluate import bootstrap_delta, check_task_cache

log = logging.getLogger(__name__)


def item_queries(record: dict, cache: dict) -> dict[str, np.ndarray]:
    """Per item: ``q`` its query row (of q_dists, q_vals, q_ids), ``gold`` its gold token id, ``lm`` log p_lm of
    that token at the query. A record with ``classes`` is a classify task's (one query per premise)."""
    struct = record["items"]
    if "classes" in record:
        slots = np.asarray([record["classes"][it["gold"]][0] for it in struct], np.int64)
        q = np.asarray([it["q"] for it in struct], np.int64)
        return {"q": q, "gold": np.asarray(cache["slot_ids"])[slots], "lm": np.asarray(cache["q_lm"])[q, slots]}
    _, first = np.unique(cache["t_pair"], return_index=True)  # each (context, continuation) pair's first token
    t = np.asarray([first[it["options"][it["gold"]][0]] for it in struct], np.int64)
    return {"q": np.asarray(cache["t_row"])[t], "gold": np.asarray(cache["t_target"])[t],
            "lm": np.asarray(cache["t_lm"])[t]}


class TaskRun:
    """One task's cache on a datastore, checked (``check_task_cache``), with its items' queries and its point."""

    def __init__(self, npz, scored_json, items_parquet, summary_json, predictions, manifest):
        self.summary = read_json(summary_json)
        self.task = self.summary["task"]
        record, self.items = check_task_cache(npz, scored_json, items_parquet, self.task, manifest)
        with np.load(npz, allow_pickle=False) as z:
            self.cache = {k: z[k] for k in z.files}
        self.preds = pl.read_parquet(predictions)
        if self.preds["id"].to_list() != [it["id"] for it in self.items]:
            raise ValueError(f"{predictions}: items other than {items_parquet}'s; rerun task_sweep for {self.task}")
        self.q = item_queries(record, self.cache)
        s = self.summary
        if s["k"] is None:
            raise ValueError(f"{summary_json}: no kNN-LM point for task {self.task} (an empty grid)")
        self.point = (float(s["lambda"]), int(s["k"]), float(s["sigma"]))
        lam, k, sigma = self.point
        d, v = self.cache["q_dists"][self.q["q"]], self.cache["q_vals"][self.q["q"]]
        self.knn = knnlm.interpolate(self.q["lm"], knnlm.knn_target_logprobs(d, v, self.q["gold"], [k], sigma)[k], lam)

    def view(self, i: int, corpus: Corpus, tok, n_neigh: int, window: int) -> list[dict]:
        """Rows (one per neighbour) of item ``i``."""
        lam, k, sigma = self.point
        q, gold = int(self.q["q"][i]), int(self.q["gold"][i])
        head = {"gold": tok.decode([gold]), "lm_prob": float(np.exp(self.q["lm"][i])),
                "knnlm_prob": float(np.exp(self.knn[i])), "gain_nats": float(self.knn[i] - self.q["lm"][i]),
                "lambda": lam, "k": k, "sigma": sigma}
        m = min(n_neigh, k)
        return [head | r for r in neighbour_rows(tok, corpus, self.cache["q_ids"][q, :m],
                                                 self.cache["q_dists"][q, :m], gold, window)]

    def gold_hits(self) -> np.ndarray:
        """Per item, the fraction of its k nearest neighbours (k of the point) whose value is the gold token."""
        k = self.point[1]
        return (self.cache["q_vals"][self.q["q"], :k] == self.q["gold"][:, None]).mean(axis=1)


EXAMPLE_KEYS = ("task", "category", "id", "question", "answer", "base_pred", "knn_pred")


def picks(preds: pl.DataFrame, per_task: int) -> dict[str, list[int]]:
    """The items ``task_examples`` shows (the first ``per_task`` the kNN-LM gets right and the base LM wrong), and
    the first ``per_task`` of the reverse, by their index in the task's items."""
    idx = preds.with_row_index("i")
    return {"knn_right": idx.filter(pl.col("knn_score") > pl.col("base_score"))["i"].head(per_task).to_list(),
            "base_right": idx.filter(pl.col("knn_score") < pl.col("base_score"))["i"].head(per_task).to_list()}


def frequency_bucket(count: int) -> int:
    """The power of ten below a count (0 for 0): the bucket of a token's frequency in the datastore."""
    return 0 if count <= 0 else 10 ** int(np.floor(np.log10(count)))


def task_tables(runs: list[TaskRun], corpus: Corpus, tok, p: dict, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(examples with their neighbours, the gold-token hit rate of the neighbours by the gold token's frequency
    in the datastore's values and task category)."""
    rows, hits = [], []
    counts = np.zeros(0, np.int64)
    for vals in corpus.view.vals:
        b = np.bincount(np.asarray(vals), minlength=counts.size)
        counts = np.pad(counts, (0, b.size - counts.size)) + b
    for run in runs:
        for direction, items in picks(run.preds, int(p["items_per_task"])).items():
            for i in items:
                r = run.preds.row(i, named=True)
                rows += [{k: r[k] for k in EXAMPLE_KEYS} | {"direction": direction} | v
                         for v in run.view(i, corpus, tok, int(p["neighbours"]), int(p["window"]))]
        gold = run.q["gold"]
        freq = np.where(gold < counts.size, counts[np.minimum(gold, counts.size - 1)], 0)
        hits.append(pl.DataFrame({"category": run.summary["category"], "task": run.task,
                                  "bucket_min": [frequency_bucket(int(c)) for c in freq],
                                  "hit": run.gold_hits().astype(np.float64)}))
    cols = ["category", "task", "direction", "id", "question", "answer", "base_pred", "knn_pred",
            *[c for c in VIEW_COLUMNS if c not in ("position", "context")]]
    examples = (pl.DataFrame(rows, schema_overrides={"value_is_gold": pl.Boolean}).select(cols) if rows
                else pl.DataFrame({c: [] for c in cols}))  # no item either way (e.g. kNN-LM and base LM agree)
    curve = []
    for (cat, bucket), g in pl.concat(hits).group_by(["category", "bucket_min"], maintain_order=True):
        h = g["hit"].to_numpy()
        m, lo, hi = bootstrap_delta(np.zeros_like(h), h, seed=seed)
        curve.append({"category": cat, "bucket_min": bucket, "n_items": len(h), "tasks": g["task"].n_unique(),
                      "gold_hit_rate": m, "lo": lo, "hi": hi})
    return examples, pl.DataFrame(curve).sort("category", "bucket_min")


# --------------------------------------------------------------------------------------------- steps
@step
def task_neighbours(params: dict, npz: list[Path], scored_json: list[Path], task_items: list[Path], summary: list[Path],
                    predictions: list[Path], manifest: Path, tokens: Path, model_json: Path, csv: Path,
                    parquet: Path, gold_csv: Path, gold_parquet: Path, parents: list[Path] = ()) -> None:
    """The items task_examples picks (kNN-LM right and base LM wrong) and the reverse, each with its nearest
    neighbours, for every teacher-forced task of a datastore (--params: block_size, items_per_task, neighbours,
    window, seed); and (--gold-csv) how often the neighbours' values are the gold token, by the gold token's
    frequency in the datastore, memory vs reasoning. --parents: a subsample's parent manifest (none for an extracted
    datastore)."""
    runs = [TaskRun(*f, manifest) for f in zip(npz, scored_json, task_items, summary, predictions, strict=True)]
    corpus = Corpus(manifest, tokens, params["block_size"], parents)
    examples, curve = task_tables(runs, corpus, load_tokenizer(model_json), params, int(params["seed"]))
    write_table(examples, csv, parquet)
    write_table(curve, gold_csv, gold_parquet)


@step
def item_neighbours(npz: Path, scored_json: Path, items: Path, summary: Path, predictions: Path, manifest: Path,
                    tokens: Path, model_json: Path, item: str, block_size: int = 0, show: int = 8,
                    window: int = 24) -> None:
    """Print one task item's nearest neighbours, by hand: the task's results/tasks/<ds>/<task>/ scored.npz,
    scored.json, summary.json, predictions.parquet, its items (results/task_data/<task>.parquet), the datastore's
    --manifest and corpus --tokens, --model-json, the item's --item id; --block-size is extraction.block_size."""
    if not block_size:
        raise SystemExit("--block-size: extraction.block_size of the run (the keys' windows)")
    run = TaskRun(npz, scored_json, items, summary, predictions, manifest)
    ids = [it["id"] for it in run.items]
    if item not in ids:
        raise SystemExit(f"--item {item!r}: not an item of {items} (ids {ids[0]!r}..{ids[-1]!r})")
    i = ids.index(item)
    r = run.preds.row(i, named=True)
    rows = run.view(i, Corpus(manifest, tokens, block_size), load_tokenizer(model_json), show, window)
    print(json.dumps([{k: r[k] for k in EXAMPLE_KEYS} | v for v in rows], indent=1, ensure_ascii=False))
