"""The project files a stage's code can import: the closure of its module's imports inside the project.

Every ``import`` statement counts, also those inside functions (lazy imports run when the code path does),
and a module's parent packages count too (importing ``diet.tasks.spec`` runs ``diet/tasks/__init__.py``).
Two lazy forms are followed as well: registry entries ``"diet.adapters.llama:LlamaAdapter"`` (string
constants naming a project module), and a package's lazy exports (``_EXPORTS = {name: submodule}`` served
by a module ``__getattr__``), followed only for the names imported from that package.
The dvc.yaml ``deps`` of each stage must list exactly these files (``tests/test_stage_deps.py``), so editing
a module reruns exactly the stages that can run its code.

    python -m tests.stage_deps stages.score     # prints the files, one per line
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("diet", "stages")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The file of a project module (``diet.tasks`` -> diet/tasks/__init__.py), None for any other module."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


_REGISTRY_ENTRY = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(PACKAGES))


def lazy_exports(path: Path) -> dict[str, str]:
    """A package's ``_EXPORTS = {name: submodule}`` literal (empty when it has none)."""
    for node in ast.parse(path.read_text(), str(path)).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    return {}


def _nodes(tree: ast.AST):
    """Every node, except inside a module-level ``__getattr__`` (lazy exports are followed by name)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            continue
        yield node
        yield from _nodes(node)


def _imported(path: Path, module: str, root: Path = ROOT) -> set[str]:
    """Module names ``path`` imports (absolute; ``from X import y`` also yields ``X.y``, which may be a module)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := _REGISTRY_ENTRY.match(node.value)):
            names.add(m[1])
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
            init = module_file(base, root)
            exports = lazy_exports(init) if init is not None and init.name == "__init__.py" else {}
            names.update(f"{base}.{exports[a.name]}" for a in node.names if a.name in exports)
    return names


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """Files (relative to ``root``) of ``module`` and of every project module it imports, transitively."""
    seen: set[str] = set()
    files: set[Path] = set()
    stack = [module]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):       # the package __init__ files run first
            path = module_file(".".join(parts[:i]), root)
            if path is None:
                continue
            files.add(path.relative_to(root))
            if ".".join(parts[:i]) not in seen or i == len(parts):
                stack.extend(_imported(path, ".".join(parts[:i]), root) - seen)
    return files


if __name__ == "__main__":
    for f in sorted(closure(sys.argv[1])):
        print(f)
