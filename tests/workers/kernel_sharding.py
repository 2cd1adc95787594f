"""Worker (8 simulated CPU devices): Pallas kernels in the sharded train step.

argv[1]: JSON {"config": "configs/x.py:preset", "overrides": {...}, "meshes": [[data,
fsdp, tensor], ...], "steps": N}. For every mesh ([] = one device) prints one JSON line
{"mesh", "losses", "kernels"}: the losses of N train steps and, for every pallas_call
in the train step's jaxpr, whether it sits inside a shard_map, its operand shapes and
the body input shapes of the innermost enclosing shard_map.
"""
import json
import os
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from jax.extend import core as jex_core  # noqa: E402

from benchmarks.bench_train import load_config  # noqa: E402
from jaxmix import config_files  # noqa: E402
from jaxmix.train.loop import Run  # noqa: E402


def _subjaxprs(params):
    for value in params.values():
        for item in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def find_kernels(jaxpr, enclosing=None, found=None):
    """Every pallas_call under `jaxpr`, with the body input shapes of the innermost
    shard_map around it (None when there is none)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "pallas_call":
            found.append({"name": str(eqn.params.get("name_and_src_info", "")).split(" ")[0],
                          "operands": [list(v.aval.shape) for v in eqn.invars],
                          "shard_map": enclosing})
            continue
        inner = enclosing
        if name == "shard_map":
            inner = [list(v.aval.shape) for v in eqn.params["jaxpr"].invars]
        for sub in _subjaxprs(eqn.params):
            find_kernels(sub, inner, found)
    return found


def run_mesh(spec, mesh):
    config = load_config(spec["config"])
    for key, value in spec.get("overrides", {}).items():
        config_files.set_field(config, key, value)
    if mesh:
        config.mesh.update(dict(zip(("data", "fsdp", "tensor", "sequence"), list(mesh) + [1])))
        devices = None
    else:
        config.mesh.update(data=1, fsdp=1, tensor=1, sequence=1)
        devices = jax.devices()[:1]
    with tempfile.TemporaryDirectory() as workdir:
        r = Run(config, workdir, devices=devices)
        state, it = r.init_fn(), r.data.train_iter
        batch = r.to_global(next(it))
        kernels = find_kernels(r.train_step.trace(state, batch).jaxpr.jaxpr)
        losses = []
        with jax.set_mesh(r.mesh):
            for step in range(spec["steps"]):
                if step:
                    batch = r.to_global(next(it))
                state, metrics = r.train_step(state, batch)
                losses.append(float(metrics["loss"]))
        r.ckpt.close()
    return {"mesh": mesh, "losses": losses, "kernels": kernels}


def main():
    spec = json.loads(sys.argv[1])
    for mesh in spec["meshes"]:
        print(json.dumps(run_mesh(spec, mesh)), flush=True)


if __name__ == "__main__":
    main()
