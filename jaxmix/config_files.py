"""Loading config files (`configs/*.py`) by path, as train.py's --config does."""
import importlib.util
import os


def load_module(path):
    """The Python module at `path` (a config file; need not be on sys.path)."""
    name = "_jaxmix_config_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(spec, root=None):
    """`get_config(preset)` of a "path[:preset]" spec; relative paths from `root` (or cwd)."""
    path, _, preset = spec.partition(":")
    if root is not None and not os.path.isabs(path):
        path = os.path.join(root, path)
    module = load_module(path)
    return module.get_config(preset) if preset else module.get_config()


def sibling(config_file, name):
    """Another config file in the same folder as `config_file` (e.g. a shared base)."""
    return load_module(os.path.join(os.path.dirname(os.path.abspath(config_file)), name))


def set_field(config, path, value):
    """config[a][b][c] = value for path "a.b.c" (lists become tuples, as in configs)."""
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = tuple(value) if isinstance(value, list) else value
