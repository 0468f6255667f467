"""Paper 2 side by side: every number of ours beside the paper's, with the setup each comes from.

The paper's numbers live in ``paper2_numbers.yaml`` (copied from its tables, with the setup each comes from);
ours are read from the analyses' tables.
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import yaml

from ..artifacts import write_table
from ..cli import step
from ..knnlm import VARIANTS

PAPER = Path(__file__).with_name("paper2_numbers.yaml")


def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


def projection_reading(row: dict, paper_point: dict) -> str:
    """Which reading of the paper's λ a projected point is, or "" when it is not the paper's (k, σ, λ)."""
    if row["k"] != paper_point["k"] or not math.isclose(row["sigma"], paper_point["sigma"]):
        return ""
    if math.isclose(row["lambda"], paper_point["lambda"]):
        return f"the paper's λ = {paper_point['lambda']:g} on p_knn: our reading"
    if math.isclose(row["lambda"], 1 - paper_point["lambda"]):
        return f"the paper's λ = {paper_point['lambda']:g} on p_lm: Eq. 1 read literally"
    return ""


def same_run(paper_run: dict, row: dict) -> bool:
    """Our projection run has the paper's optimiser setting: lr and tol, and max_steps when tol is 0."""
    if not (math.isclose(paper_run["lr"], row["lr"]) and math.isclose(paper_run["tol"], row["tol"])):
        return False
    return paper_run["tol"] > 0 or paper_run.get("max_steps") == row["max_steps"]


FINE_TUNED = "at the fine-tuned model"


def macondo_at_paper_step(table: pl.DataFrame, curve, paper_step: int) -> tuple[pl.DataFrame, str]:
    """Table 5's rows (by number of children, and their average) at the fine-tuning step nearest ``paper_step``
    (the earlier one on a tie), read from the curve (``tables.macondo_curve``: one block of rows a step evaluated,
    the fine-tuned model's at its step count); without a curve, the fine-tuned model's ``table``. Returns the rows
    and the step they were read at, in words."""
    if curve is None:
        return table, f"{FINE_TUNED} (no checkpoints: analyses.macondo.checkpoints)"
    df = pl.read_parquet(curve)
    steps = sorted(df["step"].unique())
    at = min(steps, key=lambda x: (abs(x - paper_step), x))
    note = f"at fine-tuning step {at}, the step evaluated nearest the paper's {paper_step} (last: {steps[-1]})"
    return df.filter(pl.col("step") == at).drop("step"), note


# --------------------------------------------------------------------------------------------- side by side
def setups(analyses: dict) -> dict[str, str]:
    """One line per analysis of ``analyses`` (the config's section, validated) saying what our numbers come from."""
    out = {}
    if m := analyses.get("macondo"):
        f, knn = m["finetune"], m["knn"]
        out["macondo"] = (f"{m['model']} fine-tuned {f['epochs']} epochs, lr {f['lr']:g}, batch {f['batch_size']}; "
                          f"{len(m['seeds'])} seeds; kNN k={knn['k']}, λ={knn['lambda']:g}, σ={knn['sigma']:g}")
    if p := analyses.get("projection"):
        out["projection"] = f"datastore {p['datastore']}, {p['eval_set']} set, first {p['max_positions']} positions"
    if m := analyses.get("mlp"):
        t = m["train"]
        out["mlp"] = (f"datastore {m['datastore']}, hidden {t['hidden']}, {t['epochs']} epochs, lr {t['lr']:g}, "
                      f"{t['max_pairs'] or 'all'} pairs")
    if h := analyses.get("hurdle"):
        out["hurdle"] = f"shape of {h['model']}, {len(h['seeds'])} seed(s)"
    return out


def comparison(
    csv,
    parquet,
    projection=None,
    mlp=None,
    macondo=None,
    hurdle_macondo=None,
    hurdle_corpus=None,
    setups: dict | None = None,
    macondo_curve=None,
) -> pl.DataFrame:
    """One row per reported quantity: ours, with our setup, beside the paper's, with its setup. Table 5's rows
    are read from ``macondo_curve`` at the fine-tuning step nearest the paper's (``macondo.step``), or from the
    fine-tuned model's table when no checkpoints were evaluated."""
    P, setups, rows = paper(), setups or {}, []

    def add(exp, quantity, ours, our_setup, theirs, their_setup):
        rows.append(
            {
                "experiment": exp,
                "quantity": quantity,
                "ours": None if ours is None else float(ours),
                "our_setup": our_setup,
                "paper": None if theirs is None else float(theirs),
                "paper_setup": their_setup,
            }
        )

    if projection:
        df = pl.read_parquet(projection)
        s, PP = setups.get("projection", ""), P["projection"]
        for point in df["point"].unique(maintain_order=True):
            rows_p = df.filter(pl.col("point") == point)
            r0 = rows_p.row(0, named=True)
            reading = projection_reading(r0, PP["point"])
            ps = PP["setup"] if reading else "not the paper's point: no paper number"
            setup = f"{s}; {point}" + (f" ({reading})" if reading else "")
            for r in rows_p.iter_rows(named=True):
                if r["space"] == "-":
                    theirs = PP.get(r["run"]) if reading else None
                    add("projection", f"word-level perplexity: {r['run']}", r["word_ppl"], setup, theirs, ps)
                    continue
                ref = next((x for x in PP["runs"] if same_run(x, r)), None) if reading else None
                their_setup = f"{PP['setup']}, {ref['table']}" if ref else "no paper number for this setting"
                quantity = f"{r['run']}, {r['space']}"
                add("projection", f"word-level perplexity of p_proj: {quantity}", r["word_ppl"], setup,
                    (ref or {}).get(r["space"]), their_setup)
                add("projection", f"mean KL[p_proj || p_knnlm]: {quantity}", r["kl"], setup,
                    (ref or {}).get(f"kl_{r['space']}"), their_setup)
    if mlp:
        df = pl.read_parquet(mlp).filter(pl.col("chosen") & (pl.col("eval_set") != pl.col("chosen_on")))
        if df.is_empty():
            df = pl.read_parquet(mlp).filter(pl.col("chosen"))
        s, ps = setups.get("mlp", ""), P["mlp"]["setup"]
        for r in df.iter_rows(named=True):
            name = "MLP-LM" if r["model"] == "MLP-LM" else r["model"].split(" ")[0]
            add(
                "MLP replacement",
                f"word-level perplexity ({r['eval_set']}): {r['model']}"
                + ("" if r["model"] == "LM" else f" λ={r['lambda']:g}"),
                r["word_ppl"],
                s,
                P["mlp"]["wikitext"].get(name),
                ps,
            )
        add(
            "MLP replacement",
            "storage: the MLP's own parameters (hidden layer, LN; W is the LM's) in bytes / the datastore's keys "
            "and values in bytes",
            df["storage_ratio"][0],
            s,
            P["mlp"]["storage_ratio_below"],
            "§5 'less than 4% of storage' = abstract 'over 25x': a bound on MLP / kNN storage, not a measurement",
        )
    if macondo:
        df = pl.read_parquet(macondo)
        s, ps = setups.get("macondo", ""), P["macondo"]["setup"]
        table5, at = macondo_at_paper_step(df, macondo_curve, P["macondo"]["step"])
        paper_name = {"lm": "LM", "knn_lm": "kNN-LM", "knn_lm_literal": "kNN-LM"}  # the paper has one kNN-LM row
        reading = {"knn_lm": " (λ on p_knn: our reading)", "knn_lm_literal": " (λ on p_lm: Eq. 1 read literally)"}
        if macondo_curve is not None:  # the curve has no item mean (no paper number): the fine-tuned model's
            table5 = pl.concat([table5.with_columns(at=pl.lit(at)),
                                df.filter(pl.col("children") == "item mean").with_columns(at=pl.lit(FINE_TUNED))],
                               how="diagonal_relaxed")
        else:
            table5 = table5.with_columns(at=pl.lit(at))
        for r in table5.iter_rows(named=True):
            key = r["n_children"] if r["n_children"] is not None else r["children"]
            ref = P["macondo"]["by_children"].get(key, {})  # no paper number for the item mean
            label = f"{r['children']} children" if r["n_children"] is not None else r["children"]
            for c, name in VARIANTS.items():
                if r[c] is None:  # no MLP at this checkpoint (analyses.macondo.checkpoint_mlp false)
                    continue
                theirs = ref.get(paper_name.get(c, ""))
                add("Macondo", f"log-likelihood, {label}: {name}", r[c], f"{s}{reading.get(c, '')}; {r['at']}", theirs,
                    ps)
            if r["n_children"] is not None:
                add("Macondo", f"log-likelihood, {label}: perfect", r["perfect"], "log(1/n)",
                    -math.log(r["n_children"]), "log(1/n)")
        items = df.filter(pl.col("children") == "item mean")
        if not items.is_empty():
            for c in ("lm", "knn_lm", "mlp_lm"):  # Table 2's Macondo perplexity is of an unstated unit
                add(
                    "Macondo",
                    f"perplexity of the child's name (exp of minus the item mean): {VARIANTS[c]}",
                    math.exp(-items[c][0]),
                    s,
                    P["mlp"]["macondo"].get(VARIANTS[c]),
                    "Table 2 (Macondo; the paper does not say over which tokens)",
                )
    for kind, f, col in (("macondo", hurdle_macondo, "children_loglik"), ("corpus", hurdle_corpus, "train_loss")):
        if not f:
            continue
        df = pl.read_parquet(f)
        steps = sorted(df["step"].unique())
        early = steps[min(len(steps) - 1, max(1, len(steps) // 4))]
        for at in (early, steps[-1]):
            for v in ("full", "no_last_mlp"):
                val = df.filter((pl.col("variant") == v) & (pl.col("step") == at))[col]
                add(
                    "MLP hurdle",
                    f"{kind}: {col} at step {at}, {v}",
                    val[0] if len(val) else None,
                    setups.get("hurdle", ""),
                    None,
                    P["hurdle"][kind],
                )
    out = pl.DataFrame(
        rows,
        schema={
            "experiment": pl.Utf8,
            "quantity": pl.Utf8,
            "ours": pl.Float64,
            "our_setup": pl.Utf8,
            "paper": pl.Float64,
            "paper_setup": pl.Utf8,
        },
    )
    write_table(out, csv, parquet)
    return out


@step
def paper2_comparison(
    params: dict,
    csv: Path,
    parquet: Path,
    projection: Path | None = None,
    mlp: Path | None = None,
    macondo: Path | None = None,
    hurdle_macondo: Path | None = None,
    hurdle_corpus: Path | None = None,
    macondo_curve: Path | None = None,
) -> None:
    """The side-by-side table: each analysis's table (those that ran) beside the paper's numbers, with the setup
    of each from params' ``analyses`` (the config's section); Table 5 at the checkpoint of --macondo-curve nearest
    the paper's step, when checkpoints were evaluated."""
    comparison(
        csv,
        parquet,
        projection=projection,
        mlp=mlp,
        macondo=macondo,
        hurdle_macondo=hurdle_macondo,
        hurdle_corpus=hurdle_corpus,
        setups=setups(params["analyses"]),
        macondo_curve=macondo_curve,
    )
