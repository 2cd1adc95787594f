"""The package's layers, read from the import graph (module- and function-level
imports): nn <- mixers <- models <- workdir <- train <- convert."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxmix")


def module_imports(path):
    """Every jaxmix module a file imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {name for name in found if name.split(".")[0] == "jaxmix"}


def files_under(sub):
    root = os.path.join(PKG, sub)
    if root.endswith(".py"):
        return [root]
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".py")]


# (files, packages none of them may import)
RULES = [
    ("nn.py", ("jaxmix.mixers", "jaxmix.models", "jaxmix.train", "jaxmix.convert")),
    ("mixers", ("jaxmix.models", "jaxmix.train", "jaxmix.convert", "jaxmix.workdir")),
    ("models", ("jaxmix.train", "jaxmix.convert", "jaxmix.workdir")),
    ("workdir.py", ("jaxmix.train", "jaxmix.convert")),
    ("hf.py", ("jaxmix.train", "jaxmix.convert")),
    ("train", ("jaxmix.convert",)),
]


@pytest.mark.parametrize("sub, banned", RULES, ids=[r[0] for r in RULES])
def test_layers_import_only_downwards(sub, banned):
    bad = [(os.path.relpath(f, PKG), name) for f in files_under(sub)
           for name in sorted(module_imports(f))
           if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_the_rules_see_imports():
    """The checker itself: it finds the known imports of a file, function-level too."""
    names = module_imports(os.path.join(PKG, "train", "loop.py"))
    assert {"jaxmix.workdir", "jaxmix.models"} <= names
    assert "jaxmix.generate" in names  # imported inside a function
    assert "jaxmix.train" in module_imports(os.path.join(PKG, "convert", "__init__.py"))
