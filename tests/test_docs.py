"""The README as a user meets it: its Python snippets run as shown, and its results table is the
records' (``ekdaa report --headline``)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
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


def help_of(args: list[str], capsys) -> str:
    """What ``ekdaa ARGS --help`` prints (it exits 0)."""
    from ekdaa.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_every_command_line_option_the_docs_name_is_one_its_command_takes(capsys):
    named: dict[str, set[str]] = {}
    for path in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for command, rest in re.findall(r"\bekdaa ([a-z]+)\b([^`\n]*)", path.read_text()):
            named.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest))
    commands = set(re.findall(r"^    ([a-z]+)\b", help_of([], capsys), flags=re.M))
    assert {"train", "reproduce", "attack"} <= named.keys() & commands
    for command, options in sorted(named.items()):
        if command not in commands:  # prose: "ekdaa unfused"
            continue
        taken = set(re.findall(r"--[a-z][a-z0-9-]*", help_of([command], capsys)))
        assert options <= taken, f"ekdaa {command} takes no {sorted(options - taken)}"
