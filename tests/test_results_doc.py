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
