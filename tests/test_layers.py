"""The code map holds: every import in src/sere runs down the layer order of README.md's "Code
map", no two modules import each other (directly or round a longer circle), and no function in
src/sere or benchmarks/ is longer than 60 lines.

Imports are read with `ast`, so imports inside functions count too; relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
MAX_FUNCTION_LINES = 60

# Low to high; a module may import only from its own layer or lower ones (README.md, Code map).
LAYERS: dict[str, int] = {
    "sere.errors": 0,
    "sere.config": 1, "sere.geometry": 1, "sere.schedule_curves": 1,
    "sere.runtime": 2,
    "sere.data": 3, "sere.models": 3,
    "sere.losses": 4,
    "sere.io": 5,
    "sere.train": 6, "sere.eval": 6,
    "sere.finetune": 7,
    "sere.api": 8, "sere": 8,  # the package itself is the public facade (re-exports)
    "sere.cli": 9,
}
# Pairs in one layer that must not import each other either.
FORBIDDEN_SIDEWAYS = {("sere.train", "sere.eval"), ("sere.eval", "sere.train"),
                      ("sere.losses", "sere.data")}


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def owner(module: str) -> str | None:
    """The entry of LAYERS that `module` belongs to (longest matching prefix)."""
    best = None
    for name in LAYERS:
        if module == name or module.startswith(name + "."):
            if best is None or len(name) > len(best):
                best = name
    return best


def from_module(node: ast.ImportFrom, name: str, path: Path) -> str:
    """The module a `from ... import` statement of module `name` reads, relative resolved."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, module) for every sere import in the file, in functions too, relative resolved."""
    name = module_name(path, src)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = from_module(node, name, path)
            # `from sere import cli` imports the module sere.cli; `from sere.x import f` sere.x.
            found += [(node.lineno, f"{module}.{alias.name}" if module == "sere" else module)
                      for alias in node.names]
    return [(line, m) for line, m in found if m == "sere" or m.startswith("sere.")]


def sources() -> list[Path]:
    return sorted((SRC / "sere").rglob("*.py"))


def layer_violations(path: Path) -> list[str]:
    here = owner(module_name(path))
    bad = []
    for line, target in imported_modules(path):
        there = owner(target)
        if there is None:
            bad.append(f"{path.relative_to(ROOT)}:{line} imports {target}, which has no layer")
        elif LAYERS[there] > LAYERS[here] or (here, there) in FORBIDDEN_SIDEWAYS:
            bad.append(f"{path.relative_to(ROOT)}:{line} ({here}, layer {LAYERS[here]}) imports "
                       f"{target} ({there}, layer {LAYERS[there]})")
    return bad


def test_every_module_has_a_layer():
    assert [p for p in sources() if owner(module_name(p)) is None] == []


def test_imports_run_down_the_layers():
    bad = [v for path in sources() for v in layer_violations(path)]
    assert bad == [], "imports against the layer order:\n" + "\n".join(bad)


def test_the_checker_sees_imports_inside_functions_and_relative_ones(tmp_path):
    package = tmp_path / "sere" / "data"
    package.mkdir(parents=True)
    bad = package / "bad.py"
    bad.write_text("def f():\n    from ..train import loop\n    import sere.cli\n"
                   "from . import datasets\nfrom sere import api\n")
    found = sorted(imported_modules(bad, tmp_path))
    assert found == [(2, "sere.train"), (3, "sere.cli"), (4, "sere.data"), (5, "sere.api")]
    assert [owner(m) for _, m in found] == ["sere.train", "sere.cli", "sere.data", "sere.api"]


def test_readme_code_map_states_the_same_layers():
    text = (ROOT / "README.md").read_text()
    assert "## Code map" in text
    section = text.split("## Code map", 1)[1].split("\n## ", 1)[0]
    stated = {}
    for match in re.finditer(r"^\s*L(\d)\s+(.+)$", section, flags=re.M):
        for name in re.findall(r"`(sere(?:\.\w+)?)[`/]", match.group(2)):
            stated[name] = int(match.group(1))
    assert stated == LAYERS


def command_line_imports(paths: list[Path], root: Path = ROOT) -> list[str]:
    """'path:line imports sere.cli...' for every import of the command line among `paths`
    (module names resolved against `root`, so benchmark scripts count too)."""
    return [f"{path.relative_to(root)}:{line} imports {module}" for path in paths
            for line, module in imported_modules(path, root)
            if module == "sere.cli" or module.startswith("sere.cli.")]


def test_nothing_outside_the_command_line_imports_it():
    library = [p for p in sources() if owner(module_name(p)) != "sere.cli"]
    benchmarks = sorted((ROOT / "benchmarks").glob("*.py"))
    assert ROOT / "benchmarks" / "dense_study.py" in benchmarks
    assert command_line_imports(library + benchmarks) == []


def test_the_command_line_import_checker_sees_one_in_a_function(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text("import json\n\ndef run():\n    from sere.cli import main\n"
                      "    from sere.config import load_config\n"
                      "TEXT = 'from sere.cli import main'  # a string, not an import\n")
    assert command_line_imports([script], tmp_path) == ["bench.py:4 imports sere.cli"]


def module_imports(paths: list[Path], src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the modules of `paths` it imports (in functions too): `from sere.data import
    scenes` and `from sere.data.scenes import f` both name the module sere.data.scenes."""
    modules = {module_name(p, src) for p in paths}
    graph = {}
    for path in paths:
        name = module_name(path, src)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                module = from_module(node, name, path)
                targets |= {f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules
                            else module for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle a depth-first walk of the import graph meets, as [a, b, ..., a]."""
    state: dict[str, str] = {}  # "open" on the walk's path, "done" once left
    circles: list[list[str]] = []

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                walk(target, path)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [])
    return circles


def test_no_import_circle_between_modules():
    circles = import_circles(module_imports(sources()))
    assert circles == [], "\n".join(" -> ".join(c) for c in circles)


def test_the_circle_checker_finds_a_circle_hidden_in_a_function(tmp_path):
    package = tmp_path / "sere" / "data"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sources.py").write_text("def build():\n    from sere.data.scenes import f\n")
    (package / "scenes.py").write_text("from sere.data import sources\n")
    (package / "masks.py").write_text("from . import sources\n")
    graph = module_imports(sorted(package.glob("*.py")), tmp_path)
    assert graph["sere.data.masks"] == {"sere.data.sources"}
    assert import_circles(graph) == [["sere.data.sources", "sere.data.scenes",
                                      "sere.data.sources"]]


def checked_for_length() -> list[Path]:
    """The files the 60-line rule covers: the library and the benchmark scripts (not tests/)."""
    return sources() + sorted((ROOT / "benchmarks").glob("*.py"))


def long_functions(paths: list[Path], root: Path = ROOT) -> list[str]:
    """'path:line name (N lines)' for every function in `paths` longer than MAX_FUNCTION_LINES,
    counted from its def line to its last line."""
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                 f"({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    checked = checked_for_length()
    assert ROOT / "benchmarks" / "train_step.py" in checked
    assert long_functions(checked) == []


def test_the_length_checker_counts_from_def_to_last_line(tmp_path):
    def body(indent: str) -> str:
        return "".join(f"{indent}x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES - 1))

    script = tmp_path / "script.py"
    script.write_text(f"def fits():\n{body('    ')}\n\nclass A:\n    def too_long(self):\n"
                      f"{body(' ' * 8)}        return 1\n")
    # fits: exactly MAX_FUNCTION_LINES lines; too_long: one more, its def after 2 blanks and `class`
    too_long_at = MAX_FUNCTION_LINES + 4
    assert long_functions([script], tmp_path) == [f"script.py:{too_long_at} too_long "
                                                  f"({MAX_FUNCTION_LINES + 1} lines)"]
