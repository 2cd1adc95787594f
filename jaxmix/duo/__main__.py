"""python -m jaxmix.duo identify --workdir WORKDIR [--steps 300] [--out FOLDER]

Trains the DuoAttention gates of a workdir's attention model on passkey data and
writes duo_heads.json and duo_heads.png (see jaxmix.duo)."""
import os
import sys

from jaxmix import cli, duo
from jaxmix.errors import ConfigError

OUTPUTS = ("duo_heads.json", "duo_heads.png")


def build_parser():
    p = cli.Parser("python -m jaxmix.duo", "DuoAttention: find the retrieval heads of "
                   "an attention model.")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="identify")
    q = sub.add_parser("identify", prog="python -m jaxmix.duo identify",
                       description="Train one gate per KV head on passkey data (the "
                       "model frozen); write duo_heads.json and duo_heads.png.",
                       help="train the gates; writes duo_heads.json and duo_heads.png")
    q.add_argument("--workdir", type=cli.path, required=True,
                   help="a workdir of an attention language model")
    q.add_argument("--steps", type=cli.positive_int, default=300, help="training steps")
    q.add_argument("--batch", type=cli.positive_int, default=8, help="examples per step")
    q.add_argument("--seq_len", type=cli.positive_int, default=None,
                   help="passkey example length (default: the workdir's train.seq_len)")
    q.add_argument("--sink", type=cli.nonneg_int, default=duo.TRAIN_SINK,
                   help="sink tokens of the streaming attention while training")
    q.add_argument("--recent", type=cli.positive_int, default=duo.TRAIN_RECENT,
                   help="recent tokens of the streaming attention while training")
    q.add_argument("--lr", type=cli.positive_float, default=0.02, help="AdamW learning rate")
    q.add_argument("--reg", type=cli.nonneg_float, default=0.05,
                   help="weight of the L1 penalty on the gates")
    q.add_argument("--seed", type=cli.integer, default=0, help="seed of the passkey examples")
    q.add_argument("--out", type=cli.path, default=None,
                   help="folder for duo_heads.json and .png (default: the workdir)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace duo_heads.json and .png if the folder has them")
    return p


def check_out(out, overwrite):
    """The output folder can be written and holds no earlier heads (unless overwrite)."""
    from jaxmix.paths import check_output_folder
    check_output_folder(out, "--out", "give another --out")
    found = [n for n in OUTPUTS if os.path.exists(os.path.join(out, n))]
    if found and not overwrite:
        raise ConfigError(f"--out {out} already holds {found[0]}; add --overwrite to "
                          f"replace it, or give another --out")


def identify(a):
    from jaxmix import workdir
    config = workdir.open_workdir(a.workdir)
    duo.check_identify(config.model, config, a.seq_len)
    out = a.out or a.workdir
    check_out(out, a.overwrite)
    _, params, config = workdir.load_workdir(a.workdir)
    alpha, layers, summary = duo.identify(
        config.model, params, config, steps=a.steps, batch=a.batch, seq_len=a.seq_len,
        sink=a.sink, recent=a.recent, lr=a.lr, reg=a.reg, seed=a.seed,
        log=lambda m: print(m, file=sys.stderr, flush=True))
    os.makedirs(out, exist_ok=True)
    path = duo.save_heads(out, alpha, layers, summary, config.train.seq_len)
    print(f"wrote {path} and duo_heads.png ({summary['wall_s']} s)")


def main(argv=None):
    return cli.main(build_parser(), argv, identify, "interrupted; no heads were written")


if __name__ == "__main__":
    sys.exit(main())
