"""House-style checks that ruff does not make (../shared/DESIGN.md sections 1 and 3); CI runs it.

    python tools/check_style.py            # exit 1 and one line per violation

- size: a file under src/ of at most 600 lines, a function of at most 80 lines (the targets are
  400 and 40; files and functions over the target are listed as notes, not failures);
- import direction: ``deepkd.losses`` and ``deepkd.optim`` import nothing from ``deepkd.train``,
  ``deepkd.models``, ``deepkd.data``, ``deepkd.detection`` or ``deepkd.commands``; ``deepkd.models``
  imports nothing from ``deepkd.losses``; nothing but ``deepkd.cli`` and ``deepkd.commands``
  imports ``deepkd.commands``; ``deepkd.engine`` imports no task, dataset or model family, and
  ``deepkd.detection`` nothing from ``deepkd.train`` (train stands on detection).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
FILE_LIMIT, FILE_TARGET = 600, 400
FUNCTION_LIMIT, FUNCTION_TARGET = 80, 40
FORBIDDEN = {
    "deepkd.losses": ("deepkd.train", "deepkd.models", "deepkd.data", "deepkd.detection", "deepkd.commands"),
    "deepkd.optim": ("deepkd.train", "deepkd.models", "deepkd.data", "deepkd.detection", "deepkd.commands"),
    "deepkd.models": ("deepkd.losses", "deepkd.commands"),
    "deepkd.data": ("deepkd.commands",),
    "deepkd.train": ("deepkd.commands",),
    "deepkd.engine": ("deepkd.train", "deepkd.detection", "deepkd.models", "deepkd.data", "deepkd.commands",
                      "deepkd.deploy", "deepkd.cli"),
    "deepkd.detection": ("deepkd.train", "deepkd.commands", "deepkd.deploy", "deepkd.cli"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root / "src").with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, module: str) -> Iterator[Tuple[int, str]]:
    """``(line, module)`` of every import, relative ones resolved against ``module``."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            yield from ((node.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in node.names)


def check_file(path: Path, root: Path = ROOT) -> Tuple[List[str], List[str]]:
    """Failures and notes of one source file under ``root/src``."""
    text = path.read_text()
    where = path.relative_to(root)
    failures, notes = [], []
    lines = len(text.splitlines())
    if lines > FILE_LIMIT:
        failures.append(f"{where}: {lines} lines (limit {FILE_LIMIT})")
    elif lines > FILE_TARGET:
        notes.append(f"{where}: {lines} lines (target {FILE_TARGET})")
    tree = ast.parse(text, str(where))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > FUNCTION_LIMIT:
                failures.append(f"{where}:{node.lineno}: function {node.name} has {length} lines "
                                f"(limit {FUNCTION_LIMIT})")
            elif length > FUNCTION_TARGET:
                notes.append(f"{where}:{node.lineno}: function {node.name} has {length} lines "
                             f"(target {FUNCTION_TARGET})")
    module = module_name(path, root)
    for owner, banned in FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
            for line, name in imported(tree, module):
                if name.startswith(banned):
                    failures.append(f"{where}:{line}: {module} imports {name} (import direction: {owner} must not "
                                    f"import {', '.join(banned)})")
    return failures, notes


def main(argv=None) -> int:
    failures, notes = [], []
    for path in sorted((ROOT / "src").rglob("*.py")):
        found, noted = check_file(path)
        failures += found
        notes += noted
    for line in notes:
        print(f"note: {line}")
    for line in failures:
        print(f"error: {line}")
    print(f"check_style: {len(failures)} errors, {len(notes)} notes")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
