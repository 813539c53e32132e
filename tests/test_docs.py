"""The README as a user meets it: its Python snippets run as shown, and its results table is the
records' (``ekdaa report --headline``)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ekdaa.reproduce import headline

ROOT = Path(__file__).resolve().parent.parent


def snippets(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_every_python_snippet_of_the_readme_and_the_docs_runs_as_shown():
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        scope: dict = {}  # one file's snippets run in order, as a reader runs them
        torch.manual_seed(0)
        for code in snippets(path):
            exec(compile(code, str(path), "exec"), scope)
    assert snippets(ROOT / "README.md")


def test_the_readmes_results_table_is_what_the_records_say():
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- headline -->\n", 1)[1].split("\n<!-- /headline -->", 1)[0]
    assert table == headline(ROOT / "results"), "regenerate it: ekdaa report --headline"
