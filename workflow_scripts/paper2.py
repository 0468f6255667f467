"""Paper 2's tables and figures, and the side-by-side table of our numbers next to the paper's.

The paper's numbers live in ``data/paper2_numbers.yaml`` (copied from its tables, with the setup each comes
from); ours are read from the analyses' outputs. Every table is csv + parquet; every figure PNG + PDF.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from .artifacts import write_table
from .figures import plt, save

PAPER = Path(__file__).with_name("data") / "paper2_numbers.yaml"
METHODS = {"lm": "LM", "knn_lm": "kNN-LM", "mlp_lm": "MLP-LM"}


def paper() -> dict:
    return yaml.safe_load(PAPER.read_text())


# --------------------------------------------------------------------------------------------- Macondo
def macondo_table(score_files, out_stem, png, pdf) -> pl.DataFrame:
    """Mean log-likelihood of the children's names by number of children: mean and std over seeds."""
    per_seed = []
    for f in score_files:
        df = pl.read_parquet(f)
        seed = int(Path(f).parent.name.removeprefix("seed"))
        g = df.group_by("n_children").agg([pl.col(c).mean() for c in METHODS])
        avg = df.select(pl.lit(0).alias("n_children"), *[pl.col(c).mean() for c in METHODS])
        per_seed.append(
            pl.concat([g.sort("n_children"), avg], how="vertical_relaxed").with_columns(pl.lit(seed).alias("seed"))
        )
    allseeds = pl.concat(per_seed)
    out = (
        allseeds.group_by("n_children")
        .agg(
            *[pl.col(c).mean().alias(c) for c in METHODS],
            *[pl.col(c).std().alias(f"{c}_std") for c in METHODS],
            pl.len().alias("seeds"),
        )
        .sort("n_children")
        .with_columns(
            pl.when(pl.col("n_children") > 0)
            .then(-(pl.col("n_children").cast(pl.Float64).log()))
            .otherwise(None)
            .alias("perfect"),
            pl.when(pl.col("n_children") > 0)
            .then(pl.col("n_children").cast(pl.Utf8))
            .otherwise(pl.lit("average"))
            .alias("children"),
        )
    )
    write_table(out, out_stem)
    rows = out.filter(pl.col("n_children") > 0)
    fig, ax = plt.subplots(figsize=(6, 4))
    x = rows["n_children"].to_numpy()
    for (c, name), style in zip(METHODS.items(), ("-o", ":s", "--^"), strict=True):
        ax.errorbar(
            x, rows[c].to_numpy(), yerr=np.nan_to_num(rows[f"{c}_std"].to_numpy()), fmt=style, capsize=3, label=name
        )
    ax.plot(x, rows["perfect"].to_numpy(), "k_", ms=20, mew=2, label="perfect: log(1/#children)")
    ax.set_xlabel("number of children of the villager")
    ax.set_ylabel("log-likelihood of the child's name")
    ax.set_title(f"Macondo test set (mean ± std over {int(out['seeds'].max())} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, png, pdf)
    return out


# --------------------------------------------------------------------------------------------- projection
def projection_figure(table, png, pdf) -> None:
    df = pl.read_parquet(table)
    labels = [f"{r['run']}\n{r['space']}" if r["space"] != "-" else r["run"] for r in df.iter_rows(named=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 4))
    bars = ax.bar(range(len(labels)), df["ppl"].to_list(), color=["grey", "C0"] + ["C2"] * (len(labels) - 2))
    for b, kl in zip(bars, df["kl"].to_list(), strict=True):
        ax.annotate(
            f"KL {kl:.3f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=7
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("perplexity")
    r = df.row(0, named=True)
    ax.set_title(
        f"Eq. 2 projection of p_knnlm (λ={r['lambda']:g}, k={r['k']}, σ={r['sigma']:g}), {r['n_positions']} positions"
    )
    save(fig, png, pdf)


# --------------------------------------------------------------------------------------------- MLP-LM
def mlp_figure(table, png, pdf) -> None:
    df = pl.read_parquet(table)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (ev,) in enumerate(df.select("eval_set").unique(maintain_order=True).iter_rows()):
        sub = df.filter(pl.col("eval_set") == ev)
        mlp = sub.filter(pl.col("model") == "MLP-LM").sort("lambda")
        ax.plot(mlp["lambda"], mlp["ppl"], "-o", color=f"C{i}", label=f"MLP-LM ({ev})")
        for r in sub.filter(pl.col("model") != "MLP-LM").iter_rows(named=True):
            ls = "--" if r["model"] == "LM" else ":"
            ax.axhline(r["ppl"], color=f"C{i}", ls=ls, lw=1, label=f"{r['model']} ({ev}) {r['ppl']:.3f}")
    ax.set_xlabel("λ (weight of the MLP part)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"MLP in place of kNN retrieval; storage {df['storage_ratio'][0]:.2%} of the datastore")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, png, pdf)


# --------------------------------------------------------------------------------------------- hurdle
def hurdle_table(files, column: str, out_stem, png, pdf, title: str) -> pl.DataFrame:
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    out = (
        df.group_by("variant", "step")
        .agg(pl.col(column).mean().alias(column), pl.col(column).std().alias("std"), pl.len().alias("seeds"))
        .sort("variant", "step")
    )
    write_table(out, out_stem)
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, style in (("full", "-o"), ("no_last_mlp", "--s")):
        sub = out.filter(pl.col("variant") == v)
        ax.plot(sub["step"], sub[column], style, ms=3, label=v.replace("_", " "))
    ax.set_xlabel("training step")
    ax.set_ylabel(column.replace("_", " "))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save(fig, png, pdf)
    return out


# --------------------------------------------------------------------------------------------- side by side
def comparison(
    out_stem,
    projection=None,
    mlp=None,
    mlp_json=None,
    macondo=None,
    hurdle_macondo=None,
    hurdle_corpus=None,
    setups: dict | None = None,
) -> pl.DataFrame:
    """One row per reported quantity: ours, with our setup, beside the paper's, with its setup."""
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
        get = {(r["run"], r["space"]): r for r in df.iter_rows(named=True)}
        runs = [r for r in dict.fromkeys(df["run"]) if r.startswith("p_proj")]
        s, ps = setups.get("projection", ""), P["projection"]["setup"]
        add("projection", "perplexity: LM", get[("LM", "-")]["ppl"], s, P["projection"]["lr0.1"]["LM"], ps)
        add("projection", "perplexity: kNN-LM", get[("kNN-LM", "-")]["ppl"], s, P["projection"]["lr0.1"]["kNN-LM"], ps)
        for run in runs:
            key = "lr0.001" if "lr=0.001" in run else "lr0.1" if "lr=0.1 " in run + " " else None
            for space in ("f", "f∘g"):
                ref = P["projection"].get(key, {}) if key else {}
                add(
                    "projection",
                    f"perplexity of p_proj, {space}, {run}",
                    get[(run, space)]["ppl"],
                    s,
                    ref.get(space),
                    ps,
                )
                add(
                    "projection",
                    f"mean KL[p_proj || p_knnlm], {space}, {run}",
                    get[(run, space)]["kl"],
                    s,
                    ref.get(f"kl_{space}"),
                    ps,
                )
    if mlp:
        df = pl.read_parquet(mlp).filter(pl.col("chosen") & (pl.col("eval_set") != pl.col("chosen_on")))
        if df.is_empty():
            df = pl.read_parquet(mlp).filter(pl.col("chosen"))
        s, ps = setups.get("mlp", ""), P["mlp"]["setup"]
        for r in df.iter_rows(named=True):
            name = "MLP-LM" if r["model"] == "MLP-LM" else r["model"].split(" ")[0]
            add(
                "MLP replacement",
                f"perplexity ({r['eval_set']}): {r['model']}"
                + (f" λ={r['lambda']:g}" if r["model"] == "MLP-LM" else ""),
                r["ppl"],
                s,
                P["mlp"]["wikitext"].get(name),
                ps,
            )
        add(
            "MLP replacement",
            "storage: MLP bytes / datastore bytes",
            df["storage_ratio"][0],
            s,
            P["mlp"]["storage_ratio_below"],
            "§5: under 4% (the bound, not a measurement)",
        )
    if macondo:
        df = pl.read_parquet(macondo)
        s, ps = setups.get("macondo", ""), P["macondo"]["setup"]
        for r in df.iter_rows(named=True):
            ref = P["macondo"]["by_children"].get("average" if r["n_children"] == 0 else r["n_children"], {})
            for c, name in METHODS.items():
                add("Macondo", f"log-likelihood, {r['children']} children: {name}", r[c], s, ref.get(name), ps)
            if r["n_children"]:
                add(
                    "Macondo",
                    f"log-likelihood, {r['children']} children: perfect",
                    r["perfect"],
                    "log(1/n)",
                    -math.log(r["n_children"]),
                    "log(1/n)",
                )
        avg = df.filter(pl.col("n_children") == 0)
        if not avg.is_empty():
            for c in ("lm", "knn_lm", "mlp_lm"):  # Table 2's Macondo perplexity is of an unstated unit
                add(
                    "Macondo",
                    f"perplexity of the child's name: {METHODS[c]}",
                    math.exp(-avg[c][0]),
                    s,
                    P["mlp"]["macondo"].get(METHODS[c]),
                    "Table 2 (Macondo; the paper does not say over which tokens)",
                )
    for kind, f, col in (("macondo", hurdle_macondo, "children_loglik"), ("corpus", hurdle_corpus, "train_loss")):
        if not f:
            continue
        df = pl.read_parquet(f)
        steps = sorted(df["step"].unique())
        early = steps[min(len(steps) - 1, max(1, len(steps) // 4))]
        for step in (early, steps[-1]):
            for v in ("full", "no_last_mlp"):
                val = df.filter((pl.col("variant") == v) & (pl.col("step") == step))[col]
                add(
                    "MLP hurdle",
                    f"{kind}: {col} at step {step}, {v}",
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
    write_table(out, out_stem)
    return out
