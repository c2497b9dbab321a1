"""`sere --help` and every sub-command's help: every option explained, every default shown;
`sere --version` is pyproject.toml's version."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import pytest

from sere.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent


def sub_commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def explained_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if not isinstance(a, (argparse._HelpAction,
                                                             argparse._VersionAction))]


def flat(text: str) -> str:
    """Help text with its line wrapping undone."""
    return re.sub(r"\s+", " ", text)


def test_every_command_is_walked():
    assert set(sub_commands()) == {"pretrain", "knn", "visualize", "linear", "finetune",
                                   "export", "import-check", "demo", "config", "segment",
                                   "segment-ceiling", "scenes", "embed", "convert-checkpoint"}


@pytest.mark.parametrize("name", sorted(sub_commands()))
def test_every_option_has_help(name):
    missing = [a.option_strings or a.dest for a in explained_actions(sub_commands()[name])
               if not (a.help or "").strip()]
    assert not missing, f"sere {name}: options without help text: {missing}"


@pytest.mark.parametrize("name", sorted(sub_commands()))
def test_help_shows_every_default(name):
    """An option with a value shows it as `default: X`; one without (None) says in words what
    happens without it; flags (off by default) and required options need neither."""
    parser = sub_commands()[name]
    text = flat(parser.format_help())
    for action in explained_actions(parser):
        if not action.option_strings or action.nargs == 0 or action.required:
            continue
        default = action.default
        if default is None or default == []:
            assert "default" in (action.help or ""), (name, action.option_strings)
            continue
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        assert f"default: {shown})" in text, (name, action.option_strings, shown)


def test_help_defaults_are_the_parsed_defaults():
    """What the help says is what the parser does: `--workers` of knn shows 0 and parses 0."""
    knn = sub_commands()["knn"]
    assert "--workers WORKERS DataLoader" in flat(knn.format_help())
    assert "(default: 0)" in flat(knn.format_help())
    assert knn.parse_args(["--checkpoint", "x"]).workers == 0


def test_version_is_pyproject_version(capsys):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sere {version}"


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["config", "--list"],
                                  ["pretrain", "--help"]])
def test_start_up_imports_no_heavy_library(argv):
    """`sere --version`, `--help`, `config --list` and a command's help import none of torch,
    timm, matplotlib and scikit-learn (benchmarks/startup.py times them)."""
    import subprocess
    import sys

    probe = ("import sys; from sere.cli import main\ntry:\n    main(sys.argv[1:])\n"
             "except SystemExit:\n    pass\n"
             "print(sorted(m for m in ('torch', 'timm', 'matplotlib', 'sklearn') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "src")}, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-500:] + done.stderr
