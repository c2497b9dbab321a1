"""Docs that cannot drift (issue 26): every `sere ...` line shown in README.md and docs/*.md
goes through the real argument parser (and its settings through `load_config`; tests/
test_docs_run.py runs them), every command's help ends with an example that parses, the README
stays short, and the site builds with `mkdocs build --strict`."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import sere
from sere.cli import build_parser, parse_args
from sere.config import resolve_config_path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# commands whose `--config` and key=value settings are pretraining settings
PRETRAIN_SETTINGS = {"pretrain", "config", "import-check"}


def shown_command_lines(text: str) -> list[str]:
    """The `sere` command lines of a page's bash blocks, continuations joined, comments cut,
    `.venv/bin/sere` and `torchrun ... -m sere.cli` read as `sere`."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            found = re.search(r"(?:^\.venv/bin/sere|^sere|-m sere\.cli) (.*)$", line)
            if found:
                lines.append(found.group(1))
    return lines


SHOWN = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES
         for line in shown_command_lines(page.read_text())]


def check_settings(args: argparse.Namespace) -> None:
    """The settings of a parsed pretraining-settings command resolve (unknown keys and invalid
    values raise SereError)."""
    if args.command == "config" and args.list:
        return  # no settings
    if args.command == "pretrain" and args.resume not in (None, "auto") and not args.config:
        return  # the checkpoint brings its saved settings
    if args.command == "demo":
        sere.load_config([resolve_config_path("demo")], args.overrides)
    elif args.command in PRETRAIN_SETTINGS:
        configs = [resolve_config_path(c) for c in (args.config or [])]
        # import-check builds only the model, on synthetic data (as `cmd_import_check` does)
        data = ["data.dataset=synthetic"] if args.command == "import-check" else []
        sere.load_config(configs, data + args.overrides)


def test_the_pages_show_command_lines():
    pages = {page for page, _ in SHOWN}
    assert {"README.md", "docs/pretraining.md", "docs/settings.md", "docs/many-gpus.md",
            "docs/resuming.md", "docs/evaluation.md", "docs/weights.md"} <= pages
    assert len(SHOWN) >= 30


@pytest.mark.parametrize("page,line", SHOWN)
def test_every_shown_command_line_parses_with_valid_settings(page, line):
    args = parse_args(shlex.split(line))
    assert args.command == shlex.split(line)[0]
    check_settings(args)


def sub_commands() -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in build_parser()._actions
                 if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(sub_commands()))
def test_every_command_help_ends_with_an_example_that_parses(name):
    text = sub_commands()[name].format_help()
    examples = re.findall(r"^example: sere (.+)$", text, flags=re.M)
    assert len(examples) == 1, text
    args = parse_args(shlex.split(examples[0]))
    assert args.command == name
    check_settings(args)


def test_front_page_help_gives_an_example():
    assert re.search(r"^example: sere demo\b", build_parser().format_help(), flags=re.M)


def test_a_wrong_setting_on_a_shown_line_would_fail():
    """The check above is not vacuous: a misspelt key on a shown line raises."""
    with pytest.raises(sere.SereError, match="optim.lrr"):
        check_settings(parse_args(["pretrain", "--config", "demo", "optim.lrr=1e-3"]))
    with pytest.raises(SystemExit):
        parse_args(["knn", "--checkpont", "runs/demo/last.pt"])


def test_readme_is_short_and_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"],
                                                                       ["make", "test"]]


def test_no_text_speaks_of_how_it_was_developed():
    word = "ses" + "sion"  # spelt apart so that this file passes its own check
    tracked = subprocess.run(["git", "ls-files", "README.md", "docs", "src", "benchmarks",
                              "tests", "configs"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    found = [name for name in tracked.stdout.split()
             if name.endswith((".md", ".py", ".yaml", ".txt", ".json"))
             and (ROOT / name).is_file()
             and word in (ROOT / name).read_text(errors="ignore").lower()]
    assert found == []


@pytest.mark.slow
def test_documentation_site_builds_strictly(tmp_path):
    """`make docs`'s build: every page, link and API-reference docstring resolves."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reference = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert "SEREPretraining" in reference and "forward_backward" in reference


@pytest.mark.slow
def test_every_python_block_of_the_api_page_runs(tmp_path, monkeypatch):
    """docs/api.md's blocks, in page order in one namespace, from a folder whose configs/ is the
    repository's (the page trains 2 steps of the demo's network on generated images, exports
    the checkpoint and loads it back)."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs/api.md").read_text(), flags=re.S)
    assert len(blocks) >= 10
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for number, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md, python block {number}", "exec"), namespace)
    assert namespace["result"].step == 2
    assert namespace["report"].missing == [] and namespace["report"].loaded
    assert (tmp_path / "exported" / "model.safetensors").is_file()
