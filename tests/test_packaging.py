"""Packaging: the package list in pyproject.toml covers every package of the source tree, configs/ and
patches/ travel as flashmoe's package data (no symlinks), and gguf_tools stands on its own."""
from __future__ import annotations

import ast
import os
import re
import sys

from conftest import REPO_ROOT

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _pyproject():
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_source_package_is_listed():
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("flashmoe", "gguf_tools"):
        for d, _dirs, files in os.walk(os.path.join(REPO_ROOT, top)):
            if "__init__.py" in files:
                found.add(os.path.relpath(d, REPO_ROOT).replace(os.sep, "."))
    assert found <= listed, found - listed
    assert {"flashmoe.configs", "flashmoe.patches"} <= listed


def test_configs_and_patches_are_mapped_not_linked():
    tool = _pyproject()["tool"]["setuptools"]
    assert tool["package-dir"] == {"flashmoe.configs": "configs", "flashmoe.patches": "patches"}
    for name in ("configs", "patches"):
        assert not os.path.islink(os.path.join(REPO_ROOT, "flashmoe", name))
    assert any(f.endswith(".yaml") for f in os.listdir(os.path.join(REPO_ROOT, "configs")))
    assert any(f.endswith(".patch") for f in os.listdir(os.path.join(REPO_ROOT, "patches")))


def test_gguf_tools_imports_nothing_from_flashmoe_or_click():
    bad = []
    for d, _dirs, files in os.walk(os.path.join(REPO_ROOT, "gguf_tools")):
        for fn in files:
            if not fn.endswith(".py"):
                continue
            path = os.path.join(d, fn)
            tree = ast.parse(open(path, encoding="utf-8").read(), path)
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                bad += [f"{os.path.relpath(path, REPO_ROOT)}: {n}" for n in names if re.match(r"(flashmoe|click)(\.|$)", n)]
    assert bad == []
