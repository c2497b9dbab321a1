"""What several commands share: preset names (`sere.config.resolve_config_path`), labelled
sources from flags, the help format, the version, and `key=value` overrides anywhere on the
command line."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sere.cli.logs import add_verbosity_flags
from sere.config import resolve_config_path  # noqa: F401 (the commands' name for it)
from sere.errors import SereError

if TYPE_CHECKING:  # torch and PIL come with it: imported where a command reads images
    from sere.data.datasets import ImageSource

# `section.key=value` (a leading `-` makes a token an option or its `--flag=value` form instead)
OVERRIDE = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*=")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help text that ends with `(default: X)` for every option that has a default value.

    Options whose default is None, False or empty say in their own words what happens without
    them (tests/test_cli_help.py holds every option to it); a help text that already mentions
    its default is left alone.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.nargs == 0 or "default" in text
                or default is None or default is False or default == []
                or default == argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


class SereParser(argparse.ArgumentParser):
    """The parser class of `sere` and its sub-commands: help in `DefaultsFormatter`, and
    `-q/--quiet` and `-v/--verbose` on every command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)
        add_verbosity_flags(self)


def package_version() -> str:
    """The version in pyproject.toml: from the installed package's metadata, else (a source
    checkout on PYTHONPATH without an install) from the pyproject.toml above the package."""
    try:
        return importlib.metadata.version("sere")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
        if pyproject.is_file():
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        return "unknown"


def edge_note(chosen: float, values: list[float], what: str = "rate",
              option: str = "--lrs") -> str | None:
    """A note when the chosen value (a learning rate, a weight decay) is the smallest or largest
    of a sweep of several (the optimum may lie beyond it), else None; `sere linear` and `sere
    segment` print it."""
    if len(values) > 1 and chosen in (min(values), max(values)):
        return (f"note: the chosen {what} {chosen:g} is at the edge of the sweep; extend "
                f"{option} beyond it to check that the optimum is inside")
    return None


def sources_from_args(args: argparse.Namespace, in_chans: int) -> tuple[ImageSource, ImageSource]:
    """(train, test) from --train-dir/--test-dir, else Fashion-MNIST (--fashion-mnist-dir)."""
    from sere.data.labelled import labelled_sources

    return labelled_sources(in_chans, args.train_dir, args.test_dir, args.fashion_mnist_dir)


def add_checkpoint_flags(parser: argparse.ArgumentParser, use: str) -> None:
    """--checkpoint (required) and --backbone, the checkpoint's network to `use`."""
    parser.add_argument("--checkpoint", required=True, help="a sere pretrain checkpoint, e.g. "
                        "runs/demo/last.pt")
    parser.add_argument("--backbone", choices=("teacher", "student"), default="teacher",
                        help=f"the checkpoint's network to {use}")


def add_labelled_flags(parser: argparse.ArgumentParser) -> None:
    """--train-dir, --test-dir, --fashion-mnist-dir and --unknown-classes."""
    from sere.data.labelled import UNKNOWN_CLASSES

    parser.add_argument("--train-dir", help="labelled image folder (one sub-folder per class) "
                        "(default: the Fashion-MNIST training set)")
    parser.add_argument("--test-dir", help="labelled image folder, classes matched by name "
                        "(default: the Fashion-MNIST test set)")
    parser.add_argument("--fashion-mnist-dir", default=None,
                        help="folder of Fashion-MNIST IDX files (default: the system package)")
    parser.add_argument("--unknown-classes", choices=UNKNOWN_CLASSES, default="error",
                        help="a test class the training folder lacks (classes meet by name): "
                        "refuse, or score its images as wrong")


def option_action(parser: argparse.ArgumentParser, token: str) -> argparse.Action | None:
    """The option `token` (e.g. `--resume`, or an unambiguous prefix of one, as argparse
    accepts) names in `parser`, or None."""
    name = token.split("=", 1)[0]
    options = parser._option_string_actions  # argparse keeps no public index of its options
    if name in options:
        return options[name]
    matches = {a for opt, a in options.items() if opt.startswith("--") and opt.startswith(name)}
    return matches.pop() if len(matches) == 1 and name.startswith("--") else None


def split_overrides(parser: argparse.ArgumentParser, tokens: list[str]) -> tuple[list[str],
                                                                                 list[str]]:
    """(the tokens for argparse, the `key=value` overrides among them, in order).

    argparse lets a positional list follow only the options before it (`--resume auto x=1`
    fails), and an option with several values swallows what follows (`--k 10 20 eval.k=5`), so
    overrides are taken out before parsing: every token that looks like `key=value` and is not
    the value of a one-value option (`--checkpoint a=b.pt` stays a file name).
    """
    kept: list[str] = []
    overrides: list[str] = []
    takes_value = options_done = False
    for token in tokens:
        if takes_value:
            kept.append(token)
            takes_value = False
        elif token == "--":
            options_done = True
            kept.append(token)
        elif token.startswith("-") and not options_done:
            action = option_action(parser, token)
            takes_value = action is not None and action.nargs is None and "=" not in token
            kept.append(token)
        elif OVERRIDE.match(token):
            overrides.append(token)
        else:
            kept.append(token)
    return kept, overrides


def write_text(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: the file is whole or absent."""
    from sere.runtime.files import atomic_write_text

    try:
        atomic_write_text(path, text)
    except OSError as err:
        raise SereError(f"could not write {path}: {err}") from None
