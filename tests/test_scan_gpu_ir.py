"""The structure of the GPU scan kernels' Triton IR (TTIR), checked without a GPU.

jax.export for platform "cuda" runs the Pallas -> Triton lowering; with debug=True
the kernels print the Triton module they hand to XLA. On that text:
  * the chunk loop is the only loop (a chunk's steps are unrolled, not a loop);
  * inside it every load whose value is used comes before the first decay (exp2):
    the rows of a chunk are loaded before its recurrence and the next chunk's rows
    are carried into the next iteration (prefetch), so no load waits on the state;
  * the backward has no barrier and adds its dB, dC rows with atomic float adds
    (of relaxed ordering where kernels_pallas.triton_atomics provides them).
Stores lower to a swap whose loaded old value is unused (Triton drops it), so only
loads with a use count.
"""
import contextlib
import io
import re

import jax
import jax.numpy as jnp

from kernels_pallas import selective_scan_gpu as kernel
from kernels_pallas import triton_atomics

CHECKS = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
B, L, D, N, CHUNK = 1, 44, 32, 16, 8        # five full chunks and a ragged one of 4
EXP2 = "__nv_exp2f"
BARRIER = re.compile(r"gpu\.barrier|tt\.debug_barrier")


def triton_ir(fn, *args):
    """The Triton module text of the one pallas_call in fn (called with debug=True)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=CHECKS)(*args)
    text = out.getvalue()
    assert text.count("The Triton module") == 1, text[-2000:]
    return text[text.index("The Triton module"):]


def loops(ir):
    """[(header line, body lines)] of every scf.for in the module."""
    lines = ir.splitlines()
    found = []
    for i, line in enumerate(lines):
        if " scf.for " in line:
            indent = len(line) - len(line.lstrip())
            j = i + 1
            while not (lines[j].lstrip().startswith("}")
                       and len(lines[j]) - len(lines[j].lstrip()) == indent):
                j += 1
            found.append((line, lines[i + 1:j]))
    return found


def used_load_lines(body):
    """Indices of the body's tt.load lines whose result is used later in the body."""
    used = []
    for i, line in enumerate(body):
        m = re.match(r"\s*(%[\w#]+) = tt\.load ", line)
        if m and any(re.search(re.escape(m.group(1)) + r"(?![\w#])", later)
                     for later in body[i + 1:]):
            used.append(i)
    return used


def check_chunk_loop(ir, min_exp2):
    """The module's single loop, its body checked: at least min_exp2 decays, every
    used load before the first one. Returns (header, body)."""
    found = loops(ir)
    assert len(found) == 1, f"expected the chunk loop only, found {len(found)} loops"
    header, body = found[0]
    exp2 = [i for i, line in enumerate(body) if EXP2 in line]
    assert len(exp2) >= min_exp2, (len(exp2), min_exp2)
    loads = used_load_lines(body)
    assert loads, "the chunk loop loads nothing: no prefetch"
    assert max(loads) < exp2[0], "a load inside the chunk loop comes after its first decay"
    return header, body


def _inputs(dtype):
    x = lambda *s: jnp.zeros(s, dtype)
    f = lambda *s: jnp.zeros(s, jnp.float32)
    return x, f


def test_forward_loads_precede_the_recurrence():
    x, f = _inputs(jnp.bfloat16)

    def fwd(u):
        return kernel.scan_fwd(u, u, u, x(B, L, N), x(B, L, N), f(D, N), f(D), f(D),
                               f(B, D, N), f(B, L), softplus=True, block_d=D, chunk=CHUNK,
                               debug=True)

    ir = triton_ir(fwd, x(B, L, D))
    header, body = check_chunk_loop(ir, CHUNK)
    # carried: the state and the next chunk's rows of u, delta, z, B, C and keep
    assert header.count("iter_args") == 1 and header.count("%arg") >= 1 + 6 * CHUNK + 1
    assert not BARRIER.search(ir)


def test_backward_has_no_barrier_and_adds_dB_dC_atomically():
    x, f = _inputs(jnp.float32)
    n_chunks = -(-L // CHUNK)

    def bwd(u):
        return kernel.scan_bwd(u, u, u, x(B, L, N), x(B, L, N), f(D, N), f(D), f(D),
                               f(B, n_chunks, D, N), u, f(B, D, N), softplus=True,
                               block_d=D, chunk=CHUNK, debug=True)

    ir = triton_ir(bwd, x(B, L, D))
    assert not BARRIER.search(ir), "barrier in the backward"
    _, body = check_chunk_loop(ir, 2 * CHUNK)       # recompute and reverse decays
    fadd = "tt.atomic_rmw fadd, relaxed" if triton_atomics.RELAXED else "tt.atomic_rmw fadd"
    atomics = [line for line in body if fadd in line]
    assert len(atomics) == 2 * CHUNK, len(atomics)  # one dB and one dC row a step
    assert ir.count(fadd) == 2 * (CHUNK + L % CHUNK)  # and the ragged chunk's
