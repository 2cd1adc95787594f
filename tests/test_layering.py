"""The package's layers, read from the import graph (module- and function-level
imports): nn <- mixers <- models <- workdir <- train <- convert, and the command-line
layer (jaxmix.cli) that only the command lines import."""
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


CLI = "jaxmix.cli"
# (files, packages none of them may import, files of `files` exempt: command lines)
RULES = [
    ("nn.py", ("jaxmix.mixers", "jaxmix.models", "jaxmix.train", "jaxmix.convert", CLI), ()),
    ("mixers", ("jaxmix.models", "jaxmix.train", "jaxmix.convert", "jaxmix.workdir", CLI),
     ()),
    ("models", ("jaxmix.train", "jaxmix.convert", "jaxmix.workdir", CLI), ()),
    ("paths.py", ("jaxmix.workdir", "jaxmix.models", "jaxmix.train", CLI), ()),
    ("workdir.py", ("jaxmix.train", "jaxmix.convert", CLI), ()),
    ("hf.py", ("jaxmix.train", "jaxmix.convert", CLI), ()),
    ("duo/__init__.py", ("jaxmix.train", "jaxmix.evaluate", "jaxmix.generate", CLI), ()),
    ("data", (CLI, "jaxmix.train"), ("prepare.py",)),  # `python -m jaxmix.data.prepare`
    ("train", ("jaxmix.convert",), ()),
    ("train", (CLI,), ("memory.py",)),  # memory.py: `python -m jaxmix.train.memory`
    ("cli.py", ("jaxmix.train", "jaxmix.convert", "jaxmix.generate", "jaxmix.evaluate"), ()),
]


@pytest.mark.parametrize("sub, banned, exempt", RULES,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RULES)])
def test_layers_import_only_downwards(sub, banned, exempt):
    bad = [(os.path.relpath(f, PKG), name) for f in files_under(sub)
           if os.path.basename(f) not in exempt
           for name in sorted(module_imports(f))
           if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_the_rules_see_imports():
    """The checker itself: it finds the known imports of a file, function-level too."""
    names = module_imports(os.path.join(PKG, "train", "loop.py"))
    assert {"jaxmix.workdir", "jaxmix.models"} <= names
    assert "jaxmix.generate" in names  # imported inside a function
    assert "jaxmix.train" in module_imports(os.path.join(PKG, "convert", "__init__.py"))
