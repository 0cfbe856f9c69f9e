"""Which code computed a sweep: a digest of the library and the experiment's compute modules, by syntax.

A sweep's part files are reused only by the same code, so the fingerprint of a sweep hashes the code
that computes its numbers, and nothing else:

* **the library**: every ``.py`` file of :mod:`precision_lab` outside :mod:`precision_lab.lab`;
* **the experiment's compute module** (``experiments/NAME.py``) and every module of the
  ``experiments`` package it imports, directly or through another one, except figure modules.

What counts is *where* code lives, never what a function is called: figure code lives in
``experiments/figures/`` and the lab (runner, results store, plotting, command line) in
``precision_lab/lab/``, and neither is hashed.  A compute module that imports figure code is an
error (:class:`ValueError` naming both), because an edit there would then change results without
changing the fingerprint.

Each file is hashed by its syntax tree without docstrings (:func:`syntax_digest`): a comment or a
docstring edited in the library keeps every finished part; any change to code invalidates them.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

__all__ = ["FIGURE_PACKAGES", "code_digest", "compute_modules", "library_files", "syntax_digest"]

#: Modules whose code only draws or reports stored results: a compute module must not import them.
#: (It may import the rest of the lab, e.g. the runner: running and storing do not change numbers.)
FIGURE_PACKAGES: tuple[str, ...] = (
    "experiments.figures",
    "experiments.claims",
    "precision_lab.lab.plotting",
    "matplotlib",
)

_PACKAGE = Path(__file__).resolve().parents[1]  # precision_lab/
_LAB = Path(__file__).resolve().parent  # precision_lab/lab/


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    """Remove the docstring of the module and of every class and function (in place)."""
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        first = body[0] if body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            node.body = body[1:] or [ast.Pass()]
    return tree


def syntax_digest(source: str | bytes) -> bytes:
    """The syntax tree of ``source`` without docstrings, comments or layout, as bytes to hash."""
    tree = _strip_docstrings(ast.parse(source))
    return ast.dump(tree, include_attributes=False).encode()


def library_files() -> list[Path]:
    """The library's source files: ``precision_lab/**/*.py`` outside ``precision_lab/lab/``."""
    return [f for f in sorted(_PACKAGE.rglob("*.py")) if _LAB not in f.parents]


def _module_path(name: str) -> Path | None:
    """The source file of module ``name``, or None if it is no module.

    ``from pkg.mod import Class`` yields the candidate ``pkg.mod.Class``, whose parent is no package.
    """
    try:
        spec = importlib.util.find_spec(name)
    except (ModuleNotFoundError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec is not None and spec.origin not in (None, "built-in") else None


def _imports(path: Path) -> list[str]:
    """Absolute module names imported by the file at ``path`` (``from a import b`` gives ``a`` and ``a.b``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_bytes())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _is_under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def compute_modules(module: str) -> list[str]:
    """``module`` and the ``experiments`` modules it imports, transitively, sorted by name.

    Raises:
        ValueError: ``module`` does not exist, or one of them imports figure code
            (:data:`FIGURE_PACKAGES`).
    """
    if _module_path(module) is None:
        raise ValueError(f"no module {module!r} to fingerprint")
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in _imports(_module_path(name)):
            if _is_under(imported, FIGURE_PACKAGES):
                raise ValueError(
                    f"compute module {name!r} imports figure code {imported!r}: move what it uses out of "
                    "the figure modules, or the sweep fingerprint would not see changes to it"
                )
            if _is_under(imported, ("experiments",)) and imported != "experiments":
                path = _module_path(imported)
                if path is not None and path.suffix == ".py" and imported not in seen:
                    todo.append(imported)
    return sorted(seen)


@functools.cache
def _library_digest() -> bytes:
    h = hashlib.sha256()
    for f in library_files():
        h.update(f.relative_to(_PACKAGE.parent).as_posix().encode() + b"\0" + syntax_digest(f.read_bytes()) + b"\0")
    return h.digest()


def code_digest(module: str) -> str:
    """sha256 (16 hex digits) of the code that computes the results of the experiment ``module``.

    Hashes the library (:func:`library_files`) and :func:`compute_modules` of ``module``, each by
    :func:`syntax_digest`.  Part of the sweep fingerprint (:mod:`precision_lab.lab.runner`).
    """
    h = hashlib.sha256(_library_digest())
    for name in compute_modules(module):
        h.update(name.encode() + b"\0" + syntax_digest(_module_path(name).read_bytes()) + b"\0")
    return h.hexdigest()[:16]
