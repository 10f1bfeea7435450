"""The package's shape: layers that only import downwards, no import circles, a short top level, no repeated code.

Layers, lowest first: the library (everything but the three below), the trainer (``open_clip_po.trainer``), the
drivers that run the trainer as a command (``sweep``, ``demo``), and the entry modules (``main``, ``svd_scale``,
every ``__main__``). An import may only go to the same layer or a lower one, and nothing imports an entry module.
Function-local imports count: they are links all the same.
"""
import ast
import hashlib
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "open_clip_po"
ENTRY_MODULES = {"open_clip_po.main", "open_clip_po.svd_scale"}
DRIVERS = ("open_clip_po.sweep", "open_clip_po.demo")
TOP_LEVEL_LIMIT = 12
REPEAT_LINES = 10


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``name`` imports (a package's own ``__init__`` is not counted as a target)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not known_is_package(target):
                found.add(target)
    return found


def known_is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split("."))).is_dir()


def layer(name: str) -> int:
    if name in ENTRY_MODULES or name.endswith(".__main__"):
        return 3
    if name.startswith(DRIVERS):
        return 2
    if name.startswith("open_clip_po.trainer"):
        return 1
    return 0


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def test_imports_only_go_down(graph):
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) > layer(a))
    into_entries = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer(b) == 3)
    assert not upward, "imports from a lower layer to a higher one: " + ", ".join(upward)
    assert not into_entries, "imports of entry modules: " + ", ".join(into_entries)


def test_no_import_circles(graph):
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, "import circles: " + " | ".join(", ".join(c) for c in circles)


def test_the_library_never_imports_the_trainer(graph):
    library = [m for m in graph if layer(m) == 0]
    assert "open_clip_po.losses" in library and "open_clip_po.eval.cli" in library  # the rule sees the library
    bad = sorted(f"{m} -> {t}" for m in library for t in graph[m] if t.startswith("open_clip_po.trainer"))
    assert not bad


def test_the_top_level_is_short():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_LIMIT, f"{len(top)} modules at the top of open_clip_po/: {', '.join(top)}"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text with white space folded) of the lines that are code: not blank, not only a comment, not
    an import (two modules that need the same names are not the same code)."""
    source = path.read_text(encoding="utf-8")
    imports = {n for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in range(node.lineno, node.end_lineno + 1)}
    out = []
    for number, line in enumerate(source.splitlines(), 1):
        text = " ".join(line.split())
        if text and not text.startswith("#") and number not in imports:
            out.append((number, text))
    return out


def repeated_blocks(paths, size: int = REPEAT_LINES) -> list[str]:
    """Places where ``size`` consecutive code lines stand again elsewhere (in the same file or another)."""
    seen = defaultdict(list)
    for path in paths:
        lines = _code_lines(path)
        for i in range(len(lines) - size + 1):
            window = "\n".join(text for _, text in lines[i:i + size])
            seen[hashlib.sha1(window.encode()).hexdigest()].append(f"{path.relative_to(PACKAGE.parent)}:"
                                                                  f"{lines[i][0]}")
    return sorted(" ~ ".join(places) for places in seen.values() if len(places) > 1)


def test_no_block_of_code_is_repeated():
    repeats = repeated_blocks(sorted(PACKAGE.rglob("*.py")))
    assert not repeats, f"blocks of {REPEAT_LINES} lines written twice: " + "; ".join(repeats[:5])


def test_the_repeat_check_sees_a_copy(tmp_path):
    block = "".join(f"x{i} = compute({i}, 'a')\n" for i in range(REPEAT_LINES))
    one, two = tmp_path / "one.py", tmp_path / "two.py"
    one.write_text("import os\n" + block)
    two.write_text(block.replace("    ", "\t") + "# a comment\n\nprint()\n")
    global PACKAGE
    package, PACKAGE = PACKAGE, tmp_path
    try:
        assert repeated_blocks([one, two]) == [f"{tmp_path.name}/one.py:2 ~ {tmp_path.name}/two.py:1"]
        two.write_text(block.replace("x3 =", "y3 ="))
        assert repeated_blocks([one, two]) == []
    finally:
        PACKAGE = package
