"""python -m jaxmix.convert --from-hf HF_DIR --out WORKDIR
   python -m jaxmix.convert --to-hf HF_DIR --workdir WORKDIR"""
import argparse
import sys

from jaxmix.errors import exit_status


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jaxmix.convert",
                                description="Convert Hugging Face checkpoints to/from jaxmix.")
    p.add_argument("--from-hf", dest="from_hf", help="an HF model directory to import")
    p.add_argument("--out", help="the new jaxmix workdir (with --from-hf)")
    p.add_argument("--to-hf", dest="to_hf", help="an HF model directory to write")
    p.add_argument("--workdir", help="the jaxmix workdir to export (with --to-hf)")
    a = p.parse_args(argv)
    if bool(a.from_hf) == bool(a.to_hf):
        p.error("give exactly one of --from-hf DIR --out WORKDIR or --to-hf DIR --workdir WORKDIR")
    if a.from_hf and not a.out:
        p.error("--from-hf needs --out WORKDIR")
    if a.to_hf and not a.workdir:
        p.error("--to-hf needs --workdir WORKDIR")
    from jaxmix import convert

    def body():
        if a.from_hf:
            config = convert.from_hf(a.from_hf, a.out)
            print(f"wrote {a.out} ({tuple(config.model.mixer_pattern)} x{config.model.n_layers}, "
                  f"d_model {config.model.d_model}); sample with: python -m jaxmix.generate "
                  f"--workdir {a.out}")
        else:
            convert.to_hf(a.workdir, a.to_hf)
            print(f"wrote {a.to_hf} (config.json, model.safetensors)")
    return exit_status(body)

if __name__ == "__main__":
    sys.exit(main())
