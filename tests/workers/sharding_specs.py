"""Worker (8 simulated CPU devices): the train state's shardings under mesh (2, 2, 2).

Prints one JSON object: {leaf path: {"spec": [...], "shard_bytes": n, "bytes": n}}.
"""
import json
import os
import sys
import tempfile

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks.bench_train import load_config  # noqa: E402
from jaxmix.train.loop import Run  # noqa: E402


def main():
    config = load_config(sys.argv[1])
    config.train.batch_size = 8
    config.mesh.update(data=2, fsdp=2, tensor=2, sequence=1)
    with tempfile.TemporaryDirectory() as workdir:
        r = Run(config, workdir)
        state = r.init_fn()
        report = {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
            name = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
            report[name] = {"spec": [list(a) if isinstance(a, tuple) else a
                                     for a in leaf.sharding.spec],
                            "shard_bytes": leaf.addressable_shards[0].data.nbytes,
                            "bytes": leaf.nbytes}
        r.ckpt.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
