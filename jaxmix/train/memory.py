"""Per-chip memory of one train step, estimated from the config alone (no devices).

`estimate(config, chips)` splits the bytes one chip holds at the step's peak into:

  weights (this chip's shards, as the mesh and `config.sharding.rules` split them)
    params      fp32 master copy, counted exactly from `jax.eval_shape` of the init
    opt_state   AdamW's two fp32 moments (2 x params; clipping keeps no state)
    grads       fp32 gradients after the reduce-scatter (1 x params)
    gathered    FSDP only, the largest block's weights split by `tensor` only: gathered
                in fp32 and cast to the compute dtype, the next block's gathered
                while this one computes, and the gradient before its reduce-scatter
  activations (per chip: B_local = batch / (data*fsdp), L_local = seq_len / sequence)
    saved       with remat "block", every block's input: the fp32 residual
                [B_local, L, d_model]; "save_kernels" adds every Mamba layer's fp32 scan
                output [B_local, L, d_inner]; without remat (and for "dots_saveable", as
                an upper bound) every block's whole forward residuals
    block       the peak working set of recomputing and back-propagating ONE block:
                Mamba: norm output, in_proj x/z, conv output, SiLU output, x_proj/dt,
                the scan's fp32 inputs/output and chunk states, then dy/du/ddelta and one
                chunk's recomputed states; attention: q/k/v/o and the blocked attention's
                fp32 score tiles and dq/dk/dv; the SwiGLU MLP's gate/up/product and their
                gradients (widths divided by `tensor`)
    logits      [B_local, L, V / tensor]: compute-dtype output, fp32 logits/softmax, fp32
                gradient

On TPU (the default) the Pallas kernels keep the scan's recomputed states and the
attention score tiles in VMEM; `on_tpu=False` models the XLA paths the CPU backend runs
instead (chunked scan, blocked attention), where those live in memory. XLA's own
buffers (collective staging, fragmentation) are not modelled. With remat the estimate
assumes each block is recomputed just before its backward, as XLA's TPU/GPU schedulers
aim to; XLA:CPU schedules every recomputation early, so on CPU a remat'd step holds
about what a step without remat holds.

Checked against XLA on CPU only (tests/test_memory_estimate.py): the estimate is within
2x (0.6 to 0.8) of argument + output - alias + temp bytes of `compiled.memory_analysis()`
of the real train step, for smoke models on one device and FSDP over 8, and for two
blocks of the largest pod presets at their real widths. Nothing is measured on a TPU.

  python -m jaxmix.train.memory                       # the pod presets (Markdown table)
  python -m jaxmix.train.memory --config configs/mamba_lm.py:2.8b --chips 32
"""
import dataclasses
import math
import os
import resource
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxmix import config_files, models, parallel
from jaxmix.errors import ConfigError
from jaxmix.mixers.attention import head_shape
from jaxmix.mixers.mamba import dt_rank_of
from jaxmix.ops.attention_xla import BLOCK_K, BLOCK_Q
from jaxmix.ops.scan_xla import chunk_size

GIB = 2 ** 30
F32 = 4
HBM_BYTES = 16 * GIB  # a TPU v5e chip
FIT_BYTES = 12 * GIB  # the pod presets' budget: a quarter left for XLA's own buffers
SLICES = (4, 8, 16, 32, 64, 128, 256)  # the TPU v5e slice sizes the presets choose from
PALLAS_SCAN_TILE = 128  # time steps per saved state in the Pallas scan
POD_CONFIGS = ("configs/mamba_lm.py", "configs/transformer_lm.py")


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes per chip (see the module docstring for each field)."""
    n_params: int
    mesh: dict
    params: int
    opt_state: int
    grads: int
    gathered: int
    saved: int
    block: int
    logits: int

    @property
    def weights(self):
        return self.params + self.opt_state + self.grads + self.gathered

    @property
    def activations(self):
        return self.saved + self.block + self.logits

    @property
    def total(self):
        return self.weights + self.activations


def _param_shards(model_cfg, rules, mesh):
    """[(global elements, elements on one chip, elements gathered over all but `tensor`)]
    for every block and one more for the rest (embedding, final norm, head). Traced for
    one repeat of the mixer pattern (block shapes depend only on the mixer kind)."""
    unit = models.normalize_config(model_cfg)
    models.layer_kinds(unit)  # validates the pattern
    unit.n_layers = len(tuple(model_cfg.mixer_pattern))
    model = models.build(unit)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda t: model.init(jax.random.PRNGKey(0), t)["params"], tokens)
    is_box = lambda x: isinstance(x, nn.Partitioned)
    groups = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]:
        names = leaf.names if is_box(leaf) else (None,) * len(leaf.shape)
        shape = (leaf.value if is_box(leaf) else leaf).shape
        spec = tuple(nn.logical_to_mesh_axes(names, rules))
        local, gathered = 1, 1
        for dim, axes in zip(shape, spec + (None,) * (len(shape) - len(spec))):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            split = math.prod(mesh[a] for a in axes)
            if dim % split:
                raise ConfigError(f"mesh: a param dim of {dim} is split {split} ways over "
                                  f"{'x'.join(axes)}; change mesh.{axes[0]} or the model width")
            local *= dim // split
            gathered *= dim // (mesh["tensor"] if "tensor" in axes else 1)
        key = str(getattr(path[0], "key", path[0]))
        group = int(key.split("_")[1]) if key.startswith("layers_") else -1
        g = groups.get(group, (0, 0, 0))
        groups[group] = (g[0] + math.prod(shape), g[1] + local, g[2] + gathered)
    blocks = [groups[i % unit.n_layers] for i in range(model_cfg.n_layers)]
    return blocks + [groups.get(-1, (0, 0, 0))]


def _mamba_block(cfg, B, L, t, c, kernels):
    """(forward residuals, backward transients) of one Mamba mixer, bytes."""
    T, D = B * L, cfg.d_model
    I, n, r = cfg.expand * D // t, cfg.d_state, dt_rank_of(cfg)
    # The Pallas kernel saves a state every 128 steps and recomputes a tile in VMEM.
    chunk = min(L, PALLAS_SCAN_TILE) if kernels else chunk_size(B, I, n, L, backend="cpu")
    fwd = (T * D * c                   # norm output (in_proj's input)
           + 5 * T * I * c             # in_proj x and z, conv output, SiLU output, dt
           + T * (r + 2 * n) * c       # x_proj output (dt, B, C)
           + 3 * T * I * F32           # the scan's fp32 u and delta, its fp32 output
           + 2 * T * n * F32           # fp32 B, C
           + T * I * c                 # gated output (out_proj's input)
           + -(-L // chunk) * B * n * I * F32)  # states at each chunk start
    bwd = (3 * T * I * F32             # dy, du, ddelta
           + T * I * c                 # dz
           + 2 * T * n * F32           # dB, dC
           + (0 if kernels else B * chunk * n * I * F32))  # one chunk's recomputed states
    return fwd, bwd


def _attention_block(cfg, B, L, t, c, kernels):
    """(forward residuals, backward transients) of one attention mixer, bytes."""
    T, D = B * L, cfg.d_model
    hq, hkv, hd = head_shape(cfg)
    hq, hkv = max(hq // t, 1), max(hkv // t, 1)
    bq, bk = min(L, BLOCK_Q), min(L, BLOCK_K)
    fwd = (T * D * c                   # norm output
           + T * (hq + 2 * hkv) * hd * c  # q, k, v (rotated)
           + T * hq * hd * c           # attention output (o_proj's input)
           + T * hq * F32)             # log-sum-exp
    bwd = (T * (hq + 2 * hkv) * hd * F32  # dq, dk, dv (fp32 accumulators)
           + (0 if kernels else 3 * B * hq * bq * bk * F32))  # score tiles: s, p, ds
    return fwd, bwd


def _moh_block(cfg, B, L, t, c, kernels):
    """Attention's, plus the fp32 gates [T, Hq] and their gradient."""
    fwd, bwd = _attention_block(cfg, B, L, t, c, kernels)
    gates = B * L * cfg.n_heads * F32
    return fwd + gates, bwd + gates


MIXER_BLOCKS = {"mamba": _mamba_block, "attention": _attention_block, "moh": _moh_block}


def _layer_bytes(cfg, kind, B, L, t, c, on_tpu):
    """(forward residuals, backward transients) of one whole block: mixer (`cfg`: its
    merged config), MLP, residual."""
    if kind not in MIXER_BLOCKS:
        raise ConfigError(f"memory: no estimate for mixer {kind!r}; known: {sorted(MIXER_BLOCKS)}")
    impl = cfg.get("scan_impl" if kind == "mamba" else "attn_impl", "auto")
    kernels = on_tpu and impl in ("auto", "pallas")
    fwd, bwd = MIXER_BLOCKS[kind](cfg, B, L, t, c, kernels)
    T, D = B * L, cfg.d_model
    F = cfg.get("d_ff", 0) // t
    if F:
        fwd += T * D * F32 + T * D * c + 3 * T * F * c  # MLP input, its norm, gate/up/product
        bwd += 2 * T * F * c                            # dgate, dup
    bwd += 2 * T * D * F32  # the residual stream's gradient in and out
    return fwd, bwd


def estimate(config, chips, on_tpu=True):
    """The per-chip `Estimate` of `config`'s train step on `chips` devices: TPUs, where
    impl="auto" runs the Pallas kernels (tiles in VMEM), or with on_tpu=False the XLA
    paths the CPU backend runs (scan chunk states and attention score tiles in memory)."""
    if int(chips) <= 0:
        raise ConfigError(f"memory: chips={chips} must be a positive integer")
    mesh = parallel.mesh_shape(config.mesh, int(chips))
    m, t = config.model, mesh["tensor"]
    batch_devices = mesh["data"] * mesh["fsdp"]
    if config.train.batch_size % batch_devices or config.train.seq_len % mesh["sequence"]:
        raise ConfigError(f"chips={chips}: train.batch_size={config.train.batch_size} over "
                          f"data x fsdp or train.seq_len={config.train.seq_len} over "
                          f"sequence does not split on mesh {mesh}; use a chip count that "
                          f"divides them")
    B, L = config.train.batch_size // batch_devices, config.train.seq_len // mesh["sequence"]
    c = jnp.dtype(m.get("dtype", "float32")).itemsize
    groups = _param_shards(m, parallel.rules_of(config), mesh)
    n_params = sum(g[0] for g in groups)
    local = sum(g[1] for g in groups)
    split = any(g[1] != g[2] for g in groups)  # params split beyond `tensor`
    gathered = (3 * F32 + c) * max(g[2] for g in groups) if split else 0

    m = models.normalize_config(m)
    layers = [_layer_bytes(mcfg, models.kind_of(m, name), B, L, t, c, on_tpu)
              for name, _, mcfg in models.layer_mixers(m)]
    residual = B * L * m.d_model * F32
    policy = models.remat.policy_name(m)
    if policy in ("block", "save_kernels"):
        saved = residual * len(layers)
        if policy == "save_kernels":  # the scan's fp32 output, per Mamba layer
            saved += sum(B * L * (mcfg.expand * mcfg.d_model // t) * F32
                         for name, _, mcfg in models.layer_mixers(m)
                         if models.kind_of(m, name) == "mamba")
        block = max(f + b for f, b in layers)
    else:  # "none", and "dots_saveable" counted as keeping everything (an upper bound)
        saved = sum(residual + f for f, _ in layers)
        block = max(b for _, b in layers)
    logits = B * L * (models.padded_vocab(m) // t) * (2 * F32 + c)
    return Estimate(n_params=n_params, mesh=mesh, params=local * F32, opt_state=2 * local * F32,
                    grads=local * F32, gathered=gathered, saved=saved, block=block,
                    logits=logits)


def repo_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pod_presets(root=None):
    """[(spec "path:preset", config, chips)] for every pod preset (configs' POD_CHIPS)."""
    root = root or repo_root()
    out = []
    for path in POD_CONFIGS:
        module = config_files.load_module(os.path.join(root, path))
        for preset, chips in module.POD_CHIPS.items():
            out.append((f"{path}:{preset}", module.get_config(preset), chips))
    return out


def _gib(n):
    return f"{n / GIB:.1f}"


def table(rows, estimates=None):
    """Markdown table of [(spec, config, chips)] (and their `estimate`s, when made)."""
    lines = ["| preset | params | params + opt + grads (GiB) | activations (GiB) "
             "| total per chip (GiB) | chips | mesh (data, fsdp, tensor, sequence) |",
             "|---|--:|--:|--:|--:|--:|---|"]
    estimates = estimates or [estimate(config, chips) for _, config, chips in rows]
    for (spec, _, chips), e in zip(rows, estimates, strict=True):
        lines.append(f"| `{spec.split('/')[-1]}` | {e.n_params / 1e6:,.0f}M | {_gib(e.weights)} "
                     f"| {_gib(e.activations)} | {_gib(e.total)} | {chips} "
                     f"| {', '.join(str(v) for v in e.mesh.values())} |")
    return "\n".join(lines)


FIT_SHARE = FIT_BYTES / HBM_BYTES  # of a chip's memory, the rest left to XLA's buffers
HOST_SHARE = 0.6  # of the host's memory: a CPU run above it is warned about


def compiled_warning(compiled, devices):
    """A line to report when the compiled train step (XLA's own figure) nears the
    memory it will run in: on CPU devices, with this process's peak so far, the host's
    (more than HOST_SHARE of it); on accelerators, a chip's (more than FIT_SHARE of
    it). None otherwise, or when XLA gives no figure."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    per_device = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                  - m.alias_size_in_bytes)
    fix = "lower train.batch_size or train.seq_len"
    if devices[0].platform == "cpu":
        from jaxmix import cpu
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        need, have = per_device * len(devices) + rss, cpu.host_memory_bytes()
        if need <= HOST_SHARE * have:
            return None
        return (f"this run needs about {_gib(need)} GiB of this machine's {_gib(have)} GiB "
                f"(XLA's figure for the train step on {len(devices)} CPU devices, plus "
                f"this process's {_gib(rss)} GiB so far) and may run out of memory; "
                f"{fix}, or close other programs")
    try:
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        limit = None
    if not limit or per_device <= FIT_SHARE * limit:
        return None
    return (f"the train step needs {_gib(per_device)} GiB per device (XLA's figure) of "
            f"the {_gib(limit)} GiB a {devices[0].device_kind} offers and may run out of "
            f"memory; {fix}, or spread the run over more devices (mesh.fsdp)")


MOST_CHIPS = 4096


def fitting_chips(config, chips, limit):
    """(chip count, Estimate) of the smallest count 2x, 4x, ... `chips` (up to 4096)
    whose estimate is at most `limit` bytes per chip, or None."""
    n = 2 * chips
    while n <= MOST_CHIPS:
        try:
            e = estimate(config, n)
        except ConfigError:  # the batch or a param dim does not split that many ways
            return None
        if e.total <= limit:
            return n, e
        n *= 2
    return None


def fit_warnings(rows, estimates, chip_bytes):
    """One line per row whose estimate exceeds FIT_SHARE of a chip of `chip_bytes`:
    whether it fits at all, and the chip count (and mesh) that would."""
    out, limit = [], chip_bytes * FIT_SHARE
    for (spec, config, chips), e in zip(rows, estimates, strict=True):
        if e.total <= limit:
            continue
        chip = f"a {chip_bytes / GIB:g} GiB chip"
        what = (f"does not fit {chip}" if e.total > chip_bytes else
                f"leaves less than {1 - FIT_SHARE:.0%} of {chip} to XLA's own buffers")
        found = fitting_chips(config, chips, limit)
        fix = (f"{found[0]} chips would need {_gib(found[1].total)} GiB (mesh data, fsdp, "
               f"tensor, sequence = {', '.join(str(v) for v in found[1].mesh.values())})"
               if found else
               f"no count up to {MOST_CHIPS} chips brings it under {_gib(limit)} GiB; lower "
               f"train.batch_size or train.seq_len, or split mesh.tensor")
        out.append(f"`{spec.split('/')[-1]}` on {chips} chips needs {_gib(e.total)} GiB per "
                   f"chip: it {what}; {fix}")
    return out


def build_parser():
    from jaxmix import cli
    p = cli.Parser("python -m jaxmix.train.memory", __doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="a config file path[:preset] (default: "
                   "every pod preset, each on its own chip count)")
    p.add_argument("--chips", type=cli.positive_int, default=None,
                   help="the device count (default: none; needed with --config)")
    p.add_argument("--chip-gib", type=cli.positive_float, default=HBM_BYTES / GIB,
                   help="memory of one chip in GiB (a TPU v5e chip)")
    return p


def main(argv=None):
    from jaxmix import cli

    def body(args):
        if args.chips and not args.config:
            raise ConfigError("--chips needs --config PATH:PRESET")
        if args.config:
            if not args.chips:
                raise ConfigError("--config needs --chips N (the device count)")
            rows = [(args.config, config_files.load_config(args.config), args.chips)]
        else:
            rows = pod_presets()
        estimates = [estimate(config, chips) for _, config, chips in rows]
        print(table(rows, estimates))
        for line in fit_warnings(rows, estimates, args.chip_gib * GIB):
            cli.warn(line)
    return cli.main(build_parser(), argv, body)


if __name__ == "__main__":
    sys.exit(main())
