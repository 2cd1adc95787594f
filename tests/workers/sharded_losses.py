"""Worker (run in a subprocess with 8 simulated CPU devices): per-mesh smoke losses.

argv[1]: JSON {"config": "configs/x.py:preset", "overrides": {...},
               "meshes": [[data, fsdp, tensor(, sequence)], ...],
               "steps": N}. Prints one JSON line per mesh: {"mesh": [...], "losses": [...]},
with mesh [] meaning a single device.
"""
import json
import os
import sys
import tempfile

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.bench_train import load_config  # noqa: E402
from jaxmix import config_files  # noqa: E402
from jaxmix.train.loop import Run  # noqa: E402


def losses_for(config, steps, devices):
    with tempfile.TemporaryDirectory() as workdir:
        r = Run(config, workdir, devices=devices)
        state, it = r.init_fn(), r.data.train_iter
        out = []
        with jax.set_mesh(r.mesh):
            for _ in range(steps):
                state, m = r.train_step(state, r.to_global(next(it)))
                out.append(float(m["loss"]))
        r.ckpt.close()
    return out


def main():
    spec = json.loads(sys.argv[1])
    for mesh in spec["meshes"]:
        config = load_config(spec["config"])
        for key, value in spec.get("overrides", {}).items():
            config_files.set_field(config, key, value)
        if mesh:
            sizes = list(mesh) + [1] * (4 - len(mesh))  # [data, fsdp, tensor(, sequence)]
            config.mesh.update(dict(zip(("data", "fsdp", "tensor", "sequence"), sizes)))
            devices = None
        else:
            config.mesh.update(data=1, fsdp=1, tensor=1, sequence=1)
            devices = jax.devices()[:1]
        print(json.dumps({"mesh": mesh, "losses": losses_for(config, spec["steps"], devices)}),
              flush=True)


if __name__ == "__main__":
    main()
