"""Source pins: the fused forwards reproduce what a class's forward does *as it was read*; a
release that changes that code must make ``patch`` leave the class alone and say so.

``source_digest(obj)`` hashes the source of a class or function with comments, docstrings,
annotations and formatting taken out (``ast.unparse`` of the parsed tree), so only a change
of code changes it. architectures.PINS lists the digests verified by the tests.

After verifying a new release (``make test`` with it installed), print its digests with::

    python -m resfuse.integrations.sources
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.metadata
import inspect
import sys
import textwrap
from functools import lru_cache
from typing import Optional


def class_key(cls) -> str:
    """``"module:qualname"``, the name the architecture table uses for a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve(key: str):
    """The object named by ``"module:qualname"``; imports the module if needed."""
    module, _, qualname = key.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _strip(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
        elif isinstance(node, ast.arg):
            node.annotation = None
    return tree


@lru_cache(maxsize=None)
def source_digest(obj) -> Optional[str]:
    """16 hex digits of the normalized source of ``obj``; None if its source is unavailable."""
    try:
        source = inspect.getsource(obj)
    except (OSError, TypeError):
        return None
    tree = _strip(ast.parse(textwrap.dedent(source)))
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def package_version(key: str) -> str:
    top = key.partition(":")[0].split(".")[0]
    try:
        return f"{top} {importlib.metadata.version(top)}"
    except Exception:
        return top


def main() -> None:  # pragma: no cover - maintainer tool
    from .architectures import PINS

    for key in sorted(PINS):
        try:
            digest = source_digest(resolve(key))
        except Exception as e:
            print(f"{key}: cannot import ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        known = "verified" if digest in PINS[key] else "NEW"
        print(f'    "{key}": {{"{digest}": "{package_version(key)}"}},  # {known}')


if __name__ == "__main__":  # pragma: no cover
    main()
