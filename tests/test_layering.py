"""The package's layers, read from the import graph (module- and function-level
imports, relative ones resolved), lowest first: kernels_pallas <- ops <- parallel <- nn
<- mixers <- models <- sampling <- data <- workdir/hf/duo <- train <- the command-line
helpers (jaxmix.cli) <- the command lines, none of which imports another. The graph of
every module under jaxmix/ and kernels_pallas/ has no import cycle."""
import ast
import collections
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "jaxmix")
TOPS = ("jaxmix", "kernels_pallas")


def module_name(path):
    """The dotted name of a .py file under ROOT (a package's __init__ is the package)."""
    parts = os.path.relpath(path, ROOT)[:-len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path, name=None):
    """(module, [imported names]) of every import in a file, at any depth of its code:
    `import X` gives (X, []), `from X import Y` gives (X, [Y]) (Y may be a submodule);
    relative imports are resolved against the file's package (`name`: its module name,
    by default read from its path)."""
    name = module_name(path) if name is None else name
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            yield base, [a.name for a in node.names]


def imported_names(path, name=None):
    """Every dotted name a file imports: X for `import X`, X and X.Y for
    `from X import Y`."""
    found = set()
    for base, names in import_statements(path, name):
        found.add(base)
        found.update(f"{base}.{n}" for n in names)
    return found


def module_imports(path, name=None):
    """The jaxmix and kernels_pallas names a file imports (see `imported_names`)."""
    return {n for n in imported_names(path, name) if n.split(".")[0] in TOPS}


def files_under(sub):
    """The .py files of `sub` (a folder or a file, relative to the repository root)."""
    root = os.path.join(ROOT, sub)
    if root.endswith(".py"):
        return [root]
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                  if f.endswith(".py"))


def all_modules():
    """{module name: path} of every module under jaxmix/ and kernels_pallas/."""
    return {module_name(f): f for top in TOPS for f in files_under(top)}


def import_graph():
    """{module: the modules it imports}: each imported name maps to the longest known
    module it names (`from X import Y` is an edge to X.Y when that is a module, else to
    X). A parent package that Python loads first is not an edge of its own."""
    modules = all_modules()

    def known(target):
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target

    graph = {}
    for name, path in modules.items():
        edges = set()
        for base, names in import_statements(path, name):
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in modules]
            targets = subs + ([known(base)] if len(subs) < len(names) or not names else [])
            edges.update(t for t in targets if t and t != name)
        graph[name] = edges
    return graph


def strongly_connected(graph):
    """The graph's strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def cycle_through(graph, component):
    """A shortest cycle inside `component` through its first module, as a list that
    starts and ends with it."""
    start, inside = component[0], set(component)
    came_from = {start: None}
    queue = collections.deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v] & inside):
            if w == start:
                path = [v]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if w not in came_from:
                came_from[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in component {component}")


def import_cycles(graph):
    """One cycle (a list of modules, first == last) per strongly connected component."""
    return [cycle_through(graph, c) for c in strongly_connected(graph)]


def test_no_import_cycle():
    graph = import_graph()
    found = [f"{' -> '.join(cycle_through(graph, c))}   (tangled: {', '.join(c)})"
             for c in strongly_connected(graph)]
    assert not found, "import cycles:\n" + "\n".join(found)


CLI = "jaxmix.cli"   # the command-line helpers, imported only by command lines
# The command lines (`python -m ...`); none may import another's module.
COMMANDS = ("jaxmix.generate", "jaxmix.evaluate", "jaxmix.duo.__main__", "jaxmix.convert",
            "jaxmix.data.prepare", "jaxmix.train.memory", "jaxmix.serve")
_ABOVE_TRAIN = (CLI, "jaxmix.generate", "jaxmix.evaluate", "jaxmix.convert", "jaxmix.serve",
                "jaxmix.duo.__main__")
_ABOVE_DATA = ("jaxmix.workdir", "jaxmix.hf", "jaxmix.duo", "jaxmix.train") + _ABOVE_TRAIN
_ABOVE_MODELS = ("jaxmix.sampling", "jaxmix.data") + _ABOVE_DATA
_ABOVE_NN = ("jaxmix.mixers", "jaxmix.models") + _ABOVE_MODELS
_ABOVE_OPS = ("jaxmix.parallel", "jaxmix.nn") + _ABOVE_NN


def _other_commands(module):
    return tuple(c for c in COMMANDS if c != module)


# (files, packages none of them may import, files of `files` exempt: command lines)
RULES = [
    ("kernels_pallas", ("jaxmix",), ()),
    ("jaxmix/errors.py", ("jaxmix.ops",) + _ABOVE_OPS, ()),
    ("jaxmix/paths.py", ("jaxmix.ops",) + _ABOVE_OPS, ()),
    ("jaxmix/config_files.py", ("jaxmix.ops",) + _ABOVE_OPS, ()),
    ("jaxmix/cpu.py", ("jaxmix.ops",) + _ABOVE_NN, ()),  # it reads parallel.mesh
    ("jaxmix/ops", _ABOVE_OPS, ()),
    ("jaxmix/parallel", ("jaxmix.nn",) + _ABOVE_NN, ()),
    ("jaxmix/nn.py", _ABOVE_NN, ()),
    ("jaxmix/mixers", ("jaxmix.models",) + _ABOVE_MODELS, ()),
    ("jaxmix/models", _ABOVE_MODELS, ()),
    ("jaxmix/__init__.py", _ABOVE_MODELS, ()),
    ("jaxmix/sampling.py", ("jaxmix.data",) + _ABOVE_DATA, ()),
    ("jaxmix/data", _ABOVE_DATA, ("prepare.py",)),  # `python -m jaxmix.data.prepare`
    ("jaxmix/workdir.py", ("jaxmix.duo", "jaxmix.train") + _ABOVE_TRAIN, ()),
    ("jaxmix/hf.py", ("jaxmix.workdir", "jaxmix.duo", "jaxmix.train") + _ABOVE_TRAIN, ()),
    ("jaxmix/duo/__init__.py", ("jaxmix.workdir", "jaxmix.train") + _ABOVE_TRAIN, ()),
    ("jaxmix/train", _ABOVE_TRAIN, ("memory.py",)),  # `python -m jaxmix.train.memory`
    ("jaxmix/train/memory.py", _other_commands("jaxmix.train.memory"), ()),
    ("jaxmix/cli.py", COMMANDS, ()),
    ("jaxmix/data/prepare.py", _other_commands("jaxmix.data.prepare"), ()),
    ("jaxmix/generate.py", _other_commands("jaxmix.generate"), ()),
    ("jaxmix/evaluate.py", _other_commands("jaxmix.evaluate"), ()),
    ("jaxmix/duo/__main__.py", _other_commands("jaxmix.duo.__main__"), ()),
    ("jaxmix/convert", _other_commands("jaxmix.convert"), ()),
]


@pytest.mark.parametrize("sub, banned, exempt", RULES,
                         ids=[f"{r[0]}-{i}" for i, r in enumerate(RULES)])
def test_layers_import_only_downwards(sub, banned, exempt):
    bad = [(os.path.relpath(f, ROOT), name) for f in files_under(sub)
           if os.path.basename(f) not in exempt
           for name in sorted(module_imports(f))
           if any(name == b or name.startswith(b + ".") for b in banned)]
    assert not bad, bad


def test_every_module_has_a_rule():
    """Each module of the package falls under at least one rule (new layers need one)."""
    covered = {f for sub, _, exempt in RULES for f in files_under(sub)
               if os.path.basename(f) not in exempt}
    loose = sorted(os.path.relpath(f, ROOT) for f in all_modules().values()
                   if f not in covered)
    assert not loose, loose


def test_the_rules_see_imports():
    """The checker itself: it finds the known imports of a file, function-level too."""
    names = module_imports(os.path.join(PKG, "train", "loop.py"))
    assert {"jaxmix.workdir", "jaxmix.models"} <= names
    assert "jaxmix.sampling" in names  # imported inside a function
    assert "jaxmix.train" in module_imports(os.path.join(PKG, "convert", "__init__.py"))
    assert "jaxmix.mixers.attention" in import_graph()["jaxmix.duo"]  # function-level


def test_relative_imports_resolve(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("from . import sibling\nfrom ..ops import vma\n"
                    "def f():\n    from .x import y\n")
    names = module_imports(str(path), "jaxmix.data.mod")
    assert {"jaxmix.data.sibling", "jaxmix.ops.vma", "jaxmix.data.x.y"} <= names


def test_the_cycle_check_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c", "a"], ["e", "f", "e"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []
