"""The design lives in the repository: no file cites a file outside it, and every citation of a
section of `docs/design.md` names a section that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg", ""}
# Written in pieces, so that this file does not match itself.
OUTSIDE = ("SERE-" + "SPEC", ".." + "/shared", "/work/" + "shared")
DESIGN_LINK = re.compile(r"design\.md#([a-z0-9-]+)")


def repository_text_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if (path.is_file() and not parts & SKIPPED_DIRS and not any(
                p.endswith(".egg-info") for p in parts) and path.suffix in TEXT_SUFFIXES):
            files.append(path)
    return files


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_no_file_cites_a_file_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}" for path in repository_text_files()
             for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if any(word in line for word in OUTSIDE)]
    assert not found


def test_every_design_citation_names_a_section():
    design = (ROOT / "docs" / "design.md").read_text()
    sections = {anchor(line[3:]) for line in design.splitlines() if line.startswith("## ")}
    cited = {(m.group(1), str(path.relative_to(ROOT))) for path in repository_text_files()
             for m in DESIGN_LINK.finditer(path.read_text(errors="replace"))}
    assert len(cited) > 20
    assert not [c for c in cited if c[0] not in sections]
