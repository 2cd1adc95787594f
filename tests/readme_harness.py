"""Runs the commands of a Markdown file's ```bash blocks as a user would: in order, in a
fresh folder, at smoke size, and fails on the first one that fails or that writes
outside the folders it was asked to write.

- The folder (`Sandbox`) holds links to the checkout's train.py, configs/ and
  benchmarks/, and a home folder (HOME) with what the commands name under `~`:
  ~/notes and ~/corpus (text files), ~/more (JSONL), ~/models/mamba-130m-hf (a tiny
  random Hugging Face Mamba with a byte-level BPE tokenizer) and ~/ESC-50/classes
  (50 class folders of short WAV clips).
- Commands are read with shell quoting (backslash continuations joined, comments
  dropped) and run with bash, one segment of an `a && b` line at a time.
- Smoke size: train.py runs get `SHRINK_TRAIN` (2 steps, batch 4, one evaluation,
  no sample) and, unless they start from a model of their own (configs/finetune.py),
  d_model 32; `jaxmix.evaluate` scores 2 examples at the lengths up to 1024;
  `jaxmix.duo identify` trains 2 steps; `jaxmix.generate` makes 8 tokens.
- Not run, each for a stated reason (`NOT_RUN`): the install steps (this environment
  was made by them), the test command (this is it), and the pod commands (a TPU pod
  or a SLURM cluster). Benchmarks measure minutes of work each: their scripts are
  started with `--help` (they import and parse their flags) but not run.
- Writes: before and after every command the whole folder is listed (size and
  modification time of every file); whatever changed must lie in the command's
  output folder: train.py's --workdir (or its default, runs/<config stem> or
  runs/<stem>-<preset>), convert's --out / --to-hf, prepare's --out, evaluate's --out
  (or first --workdir), duo identify's --out (or --workdir); generate and the
  benchmarks write nothing.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import wave

import numpy as np

from conftest import FAST_COMPILE, ROOT

SHRINK_TRAIN = ["--config.train.steps=2", "--config.train.decay_steps=2",
                "--config.train.warmup_steps=0", "--config.train.log_every=1",
                "--config.train.eval_every=2", "--config.train.eval_batches=1",
                "--config.train.checkpoint_every=2", "--config.train.batch_size=4",
                "--config.sample_at_end=False"]
SHRINK_MODEL = ["--config.model.d_model=32"]
MAX_EVAL_LENGTH = 1024
NOT_RUN = {"install": "an install step: this environment was made by it",
           "accelerator": "installs JAX for TPUs or NVIDIA GPUs",
           "pytest": "the test command: this is it",
           "pod": "needs a TPU pod or a SLURM cluster"}
COMMAND_TIMEOUT_S = 600


# ----------------------------------------------------------------------------- reading

def bash_blocks(markdown):
    """[(heading, block text)] of the ```bash blocks, each under its nearest heading."""
    out, heading, block = [], "", None
    for line in markdown.splitlines():
        if block is None and line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif block is None and line.strip() == "```bash":
            block = []
        elif block is not None and line.strip() == "```":
            out.append((heading, "\n".join(block)))
            block = None
        elif block is not None:
            block.append(line)
    return out


def commands(block):
    """[(tokens, text)] of the block's commands: tokens with shell quoting applied and
    comments dropped, and the command's text; a command continues over backslash line
    ends and open quotes."""
    out, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on
            continue
        if tokens:
            out.append((tokens, pending))
        pending = ""
    assert not pending, f"unclosed quote in {block!r}"
    return out


def expand_home(tokens, raw, home):
    """`tokens` with a leading `~` replaced by `home` where bash would expand it: at the
    start of a word written without quotes in the command's text `raw`."""
    return [home + t[1:] if t.startswith("~") and re.search(
        r"(^|\s)" + re.escape(t) + r"(\s|$)", raw) else t for t in tokens]


def segments(tokens):
    """The `a && b && c` parts of a command."""
    out = [[]]
    for t in tokens:
        if t == "&&":
            out.append([])
        else:
            out[-1].append(t)
    return [s for s in out if s]


def kind_of(argv):
    """(what the segment is, the argv without leading VAR=value assignments)."""
    env = 0
    while env < len(argv) and re.fullmatch(r"[A-Z_]+=.*", argv[env]):
        env += 1
    words = argv[env:]
    head = " ".join(words[:3])
    if words[0] == "pip" and any(w.startswith("jax[") for w in words):
        return "accelerator", words
    if words[0] in ("pip", ".") or head.startswith("python3 -m venv"):
        return "install", words
    if head.startswith("python -m pytest"):
        return "pytest", words
    if words[0] in ("gcloud", "srun"):
        return "pod", words
    if words[:2] == ["python", "train.py"]:
        return "train", words
    if words[:2] == ["python", "-m"]:
        return words[2], words
    if words[0] == "python" and words[1].startswith("benchmarks/"):
        return "benchmark", words
    raise AssertionError(f"the README harness does not know this command: {argv}")


def flag(argv, name, first=False):
    """The value of --name VALUE / --name=VALUE (the last one, or the first), or None."""
    found = [argv[i + 1] if a == name else a.split("=", 1)[1]
             for i, a in enumerate(argv[:-1] + [""])
             if a == name and i + 1 < len(argv) or a.startswith(name + "=")]
    return (found[0] if first else found[-1]) if found else None


def default_workdir(spec):
    """train.py's documented default: runs/<stem>, or runs/<stem>-<preset> (a preset
    that is a path gives its last part)."""
    path, _, preset = spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    preset = os.path.basename(os.path.normpath(preset)) if preset else ""
    return f"runs/{stem}-{preset}" if preset not in ("", "default") else f"runs/{stem}"


def shrink(kind, argv):
    """(argv at smoke size, its output folders relative to the sandbox, or None for
    a command that is only started with --help)."""
    if kind == "train":
        spec = flag(argv, "--config")
        extra = SHRINK_TRAIN + ([] if "finetune.py" in spec else SHRINK_MODEL)
        return argv + extra, [flag(argv, "--workdir") or default_workdir(spec)]
    if kind == "benchmark":
        return argv + ["--help"], []
    if kind == "jaxmix.evaluate":
        from jaxmix.evaluate import parse_lengths
        lengths = [n for n in parse_lengths(flag(argv, "--lengths")) if n <= MAX_EVAL_LENGTH]
        return (argv + ["--examples", "2", "--batch", "2", "--lengths",
                        ",".join(map(str, lengths))],
                [flag(argv, "--out") or flag(argv, "--workdir", first=True)])
    if kind == "jaxmix.duo":
        return argv + ["--steps", "2", "--batch", "2"], [flag(argv, "--out") or
                                                          flag(argv, "--workdir")]
    if kind == "jaxmix.generate":
        return argv + ["--max_new_tokens", "8"], []
    if kind == "jaxmix.convert":
        return argv, [flag(argv, "--out") or flag(argv, "--to-hf")]
    if kind == "jaxmix.data.prepare":
        return argv, [flag(argv, "--out")]
    raise AssertionError(f"the README harness does not know this command: {argv}")


# ----------------------------------------------------------------------------- the folder

def write_wav(path, seconds, rate, seed):
    x = np.random.RandomState(seed).uniform(-0.5, 0.5, int(seconds * rate))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((x * 32767).astype("<i2").tobytes())


def make_home(home):
    """The files the README's commands name under ~ (see the module docstring)."""
    import jax
    import mamba_lm  # configs/ is on sys.path (conftest)
    from bpe import train_bpe
    from jaxmix import hf, models
    rs = np.random.RandomState(0)
    words = "state space model token mixer scan attention head memory chunk".split()
    for folder, n, ext in (("notes/2026", 12, ".md"), ("corpus/a", 10, ".txt"),
                           ("corpus/b", 10, ".txt")):
        for i in range(n):
            os.makedirs(f"{home}/{folder}", exist_ok=True)
            with open(f"{home}/{folder}/{i}{ext}", "w") as f:
                f.write(" ".join(rs.choice(words, 900)) + "\n")
    os.makedirs(f"{home}/more")
    with open(f"{home}/more/rows.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": " ".join(rs.choice(words, 200))}) + "\n")
    hf_dir = f"{home}/models/mamba-130m-hf"
    train_bpe(hf_dir, vocab_size=512, n_files=40)
    config = mamba_lm.get_config("smoke").model
    config.update(vocab_size=512, tie_embeddings=True)
    params = jax.tree.map(lambda s: (0.02 * rs.standard_normal(s.shape)).astype(s.dtype),
                          models.abstract_params(models.build(config)))
    hf.save(hf_dir, config, params)
    for c in range(50):
        for i in range(2):
            write_wav(f"{home}/ESC-50/classes/{c:02d}-class/{i}.wav", 1.0, 16000, 50 * c + i)


class Sandbox:
    """A fresh folder to run commands in, as a user's checkout and home."""

    def __init__(self, root):
        self.root = str(root)
        os.makedirs(f"{self.root}/home")
        for name in ("train.py", "configs", "benchmarks"):
            os.symlink(os.path.join(ROOT, name), os.path.join(self.root, name))
        make_home(f"{self.root}/home")
        self.env = dict(os.environ, HOME=f"{self.root}/home", JAX_PLATFORMS="cpu",
                        MPLCONFIGDIR=f"{self.root}.mpl", PYTHONPATH=ROOT,
                        XLA_FLAGS=FAST_COMPILE)
        self.env.pop("XDG_CACHE_HOME", None)
        self.log = []

    def listing(self):
        """{path relative to the sandbox: (size, mtime)} of every file, and folders."""
        out = {}
        for d, dirs, files in os.walk(self.root):
            dirs[:] = [x for x in dirs if not os.path.islink(os.path.join(d, x))]
            for name in dirs + files:
                full = os.path.join(d, name)
                if os.path.islink(full):
                    continue
                st = os.lstat(full)
                rel = os.path.relpath(full, self.root)
                out[rel] = None if name in dirs else (st.st_size, st.st_mtime_ns)
        return out

    def run(self, heading, argv):
        """Runs one README segment; returns what was done (a string for the log)."""
        kind, words = kind_of(argv)
        if kind in NOT_RUN:
            self.log.append(f"not run ({NOT_RUN[kind]}): {shlex.join(argv)}")
            return
        env_prefix = argv[:len(argv) - len(words)]
        words, outputs = shrink(kind, words)
        line = shlex.join(env_prefix + words)
        before, t0 = self.listing(), time.perf_counter()
        proc = subprocess.run(["bash", "-c", line], cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        self.log.append(f"[{heading}] {line} -> exit {proc.returncode}, "
                        f"{time.perf_counter() - t0:.1f} s")
        assert proc.returncode == 0, (f"[{heading}] {line}\nexit {proc.returncode}\n"
                                      f"{proc.stderr[-4000:]}")
        after = self.listing()
        changed = {p for p in set(before) | set(after) if before.get(p, 0) != after.get(p, 0)}
        outs = [os.path.normpath(o) for o in outputs]

        def allowed(p):
            return any(p == o or p.startswith(o + os.sep) or o.startswith(p + os.sep)
                       for o in outs)
        stray = sorted(p for p in changed if not allowed(p))
        assert not stray, f"[{heading}] {line} wrote outside {outs}: {stray[:10]}"


def run_markdown(path, root, sections=None):
    """Runs every command of the file's bash blocks (those under `sections`' headings
    only, when given) in a new Sandbox at `root`; returns the sandbox."""
    with open(path) as f:
        blocks = bash_blocks(f.read())
    box = Sandbox(root)
    seen = set()
    for heading, block in blocks:
        if sections is not None and heading not in sections:
            continue
        seen.add(heading)
        for tokens, raw in commands(block):
            for argv in segments(expand_home(tokens, raw, box.env["HOME"])):
                box.run(heading, argv)
    missing = set(sections or ()) - seen
    assert not missing, f"no bash block under {sorted(missing)} in {path}"
    return box


if __name__ == "__main__":  # python tests/readme_harness.py README.md FOLDER
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    shutil.rmtree(sys.argv[2], ignore_errors=True)
    sandbox = run_markdown(sys.argv[1], sys.argv[2])
    print("\n".join(sandbox.log))
