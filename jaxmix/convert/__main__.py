"""python -m jaxmix.convert --from-hf HF_DIR --out WORKDIR
   python -m jaxmix.convert --to-hf HF_DIR --workdir WORKDIR"""
import sys

from jaxmix import cli
from jaxmix.errors import ConfigError


def build_parser():
    p = cli.Parser("python -m jaxmix.convert", "Convert Hugging Face checkpoints to and "
                   "from jaxmix workdirs (Mamba and Llama-style models).")
    p.add_argument("--from-hf", dest="from_hf", type=cli.path, default=None,
                   help="import: a Hugging Face model folder to read (default: none)")
    p.add_argument("--out", type=cli.path, default=None,
                   help="import: the new jaxmix workdir, a new or empty folder "
                   "(default: none; needed with --from-hf)")
    p.add_argument("--to-hf", dest="to_hf", type=cli.path, default=None,
                   help="export: the Hugging Face model folder to write, new or empty "
                   "(default: none)")
    p.add_argument("--workdir", type=cli.path, default=None,
                   help="export: the jaxmix workdir to read (default: none; needed with "
                   "--to-hf)")
    return p


def convert(a):
    from jaxmix import convert as lib
    if bool(a.from_hf) == bool(a.to_hf):
        raise ConfigError("give exactly one of --from-hf DIR --out WORKDIR or --to-hf DIR "
                          "--workdir WORKDIR")
    if a.from_hf and (not a.out or a.workdir):
        raise ConfigError("--from-hf takes --out WORKDIR (and no --workdir)")
    if a.to_hf and (not a.workdir or a.out):
        raise ConfigError("--to-hf takes --workdir WORKDIR (and no --out)")
    if a.from_hf:
        config, names = lib.from_hf(a.from_hf, a.out)
        m = config.model
        print(f"wrote {a.out}: {'+'.join(dict.fromkeys(m.mixer_pattern))} x "
              f"{m.n_layers} layers, d_model {m.d_model}, vocabulary {m.vocab_size}; "
              + (f"tokenizer files copied to {a.out}/tokenizer" if names else
                 "no tokenizer files in the source")
              + f". Sample: python -m jaxmix.generate --workdir {a.out}; fine-tune: "
              f"python train.py --config configs/finetune.py:{a.out}")
    else:
        _, tokenizer = lib.to_hf(a.workdir, a.to_hf)
        print(f"wrote {a.to_hf}: config.json, model.safetensors and "
              + (tokenizer or "no tokenizer (the workdir has none)"))


def main(argv=None):
    return cli.main(build_parser(), argv, convert)


if __name__ == "__main__":
    sys.exit(main())
