"""docs/results.md is written from the tables: every number in it is a table's cell, rounded."""

import polars as pl

from workflow_scripts import results_doc


def test_markdown_rounds_floats_and_escapes_cells():
    df = pl.DataFrame({"name": ["a|b", "c\nd", None], "x": [1.23456, 2.0, None], "n": [1, 2, 3]})
    lines = results_doc.markdown(df, digits=2).splitlines()
    assert lines[0] == "| name | x | n |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| a\\|b | 1.23 | 1 |" and lines[3] == "| c d | 2.00 | 2 |" and lines[4] == "|  |  | 3 |"


def test_write_shows_the_tables_given_and_only_those(tmp_path):
    summary = pl.DataFrame({"eval_set": ["test"], "datastore": ["d"], "base_ppl": [4.96382], "knn_ppl": [3.58334]})
    summary.write_csv(tmp_path / "s.csv")
    comp = pl.DataFrame({"experiment": ["Macondo"], "quantity": ["log-likelihood, average: LM"], "ours": [-3.6589],
                         "our_setup": ["3 seeds"], "paper": [-3.5], "paper_setup": ["Table 5"]})
    comp.write_csv(tmp_path / "c.csv")
    text = results_doc.write({"perplexity": tmp_path / "s.csv", "comparison": tmp_path / "c.csv"}, "x.yaml",
                             tmp_path / "out.md")
    assert (tmp_path / "out.md").read_text() == text
    assert "| test | d | 4.964 | 3.583 |" in text
    assert "| Macondo | log-likelihood, average: LM | -3.659 | -3.500 | 3 seeds |" in text
    assert "Config: `x.yaml`" in text and "Paper 1" not in text and "Macondo, mean" not in text


def test_the_incontext_columns_get_sections_of_their_own_only_where_incontext_retrieval_ran(tmp_path):
    """The summaries' in-context columns (rows without in-context retrieval: empty) are shown in their own sections,
    over the rows where it ran; a summary without them (in-context retrieval not configured) has none."""
    ppl = pl.DataFrame({"eval_set": ["test", "test"], "datastore": ["a", "b"], "n_tokens": [8192, 8192],
                        "base_ppl": [4.96, 5.5], "knn_ppl": [3.58, 4.0], "incontext_n_tokens": [1024, None],
                        "incontext_base_ppl": [4.9, None], "incontext_knn_ppl": [3.5, None],
                        "incontext_ppl": [5.07, None], "incontext_ppl_lo": [4.8, None],
                        "incontext_ppl_hi": [5.3, None]})
    ppl.write_csv(tmp_path / "ppl.csv")
    tasks = pl.DataFrame({"datastore": ["a"], "task": ["t"], "category": ["memory"], "metric": ["accuracy"],
                          "n": [1200], "base": [0.275], "knn": [0.318], "delta": [0.043], "best": [0.32],
                          "incontext_n": [100], "incontext_base": [0.27], "incontext": [0.28],
                          "incontext_delta": [0.01], "incontext_lo": [-0.05], "incontext_hi": [0.07]})
    tasks.write_csv(tmp_path / "tasks.csv")
    text = results_doc.write({"perplexity": tmp_path / "ppl.csv", "tasks": tmp_path / "tasks.csv"}, "x.yaml",
                             tmp_path / "out.md")
    sections = text.split("\n## ")
    main = next(s for s in sections if s.startswith("Perplexity: base LM and kNN-LM"))
    assert "| eval_set | datastore | n_tokens | base_ppl | knn_ppl |\n" in main  # no in-context column
    assert "| test | b | 8192 | 5.500 | 4.000 |" in main
    ic = next(s for s in sections if s.startswith("Perplexity: in-context retrieval"))
    assert "| test | a | 8192 | 4.960 | 3.580 | 1024 | 4.900 | 3.500 | 5.070 | 4.800 | 5.300 |" in ic
    assert "| test | b |" not in ic
    task = next(s for s in sections if s.startswith("Tasks: in-context retrieval"))
    assert "| a | t | memory | 1200 | 0.275 | 0.318 | 0.043 | 100 | 0.270 | 0.280 | 0.010 | -0.050 | 0.070 |" in task
    ppl.select(c for c in ppl.columns if not c.startswith("incontext")).write_csv(tmp_path / "ppl.csv")
    tasks.select(c for c in tasks.columns if not c.startswith("incontext")).write_csv(tmp_path / "tasks.csv")
    text = results_doc.write({"perplexity": tmp_path / "ppl.csv", "tasks": tmp_path / "tasks.csv"}, "x.yaml",
                             tmp_path / "out.md")
    assert "in-context" not in text and text.count("\n## ") == 2
