"""``mtrain-convert``: Hugging Face DeepSeek-V2/V3 checkpoints <-> mtrain checkpoints.

    mtrain-convert from-hf HF_DIR OUT [--name NAME] [--dtype auto|bf16|fp32]
    mtrain-convert to-hf CHECKPOINT OUT [--model YAML] [--like DIR] [--dtype ...] [--max-shard-size 5GB]
    mtrain-convert config HF_DIR [--name NAME]

``from-hf`` writes the checkpoint ``OUT/step_000000`` (``OUT/latest`` names
it) and the model config ``OUT/model/<NAME>.yaml``; train from it with the
trainer's arguments ``-cd OUT model=<NAME> checkpoint.init_from=OUT``. A
rerun continues an interrupted conversion. ``to-hf`` writes a directory
``transformers.AutoModelForCausalLM.from_pretrained`` loads. ``config``
prints the model config of a Hugging Face checkpoint. See docs/hf.md.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys

from mtrain.model.hf import HFConfigError
from mtrain.train.checkpoint_files import CorruptCheckpointError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mtrain-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    dtypes = ("auto", "bf16", "fp32")

    imp = sub.add_parser("from-hf", help="Hugging Face directory -> mtrain checkpoint")
    imp.add_argument("hf_dir")
    imp.add_argument("out", help="checkpoint root to write (OUT/step_000000, OUT/model/<name>.yaml)")
    imp.add_argument("--name", help="model config name (default: the name of OUT)")
    imp.add_argument("--dtype", choices=dtypes, default="auto",
                     help="auto: as stored (FP8 weights dequantized to bf16)")
    imp.add_argument("--no-progress", action="store_true")

    exp = sub.add_parser("to-hf", help="mtrain checkpoint -> Hugging Face directory")
    exp.add_argument("checkpoint", help="a step_N directory or a checkpoint root (its latest)")
    exp.add_argument("out")
    exp.add_argument("--model", help="model yaml or run config.yaml (default: found beside the checkpoint)")
    exp.add_argument("--like", help="Hugging Face directory or from-hf output whose config.json keys, rope layout "
                                    "and tokenizer files to reuse (default: the checkpoint's root)")
    exp.add_argument("--dtype", choices=dtypes, default="auto", help="auto: as stored")
    exp.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"))
    exp.add_argument("--no-progress", action="store_true")

    show = sub.add_parser("config", help="print the mtrain model config of a Hugging Face directory")
    show.add_argument("hf_dir")
    show.add_argument("--name", default="hf")
    return p.parse_args(argv)


def run(args) -> None:
    if args.command == "from-hf":
        from mtrain.train.hf_import import import_hf

        path = import_hf(args.hf_dir, args.out, name=args.name, dtype=args.dtype, progress=not args.no_progress)
        print(f"wrote {path}\ntrain from it (any layout; 4 ranks shown): torchrun --standalone --nproc-per-node 4 "
              f"-m mtrain.cli.train -cd {path.parent} model={args.name or path.parent.name} "
              f"checkpoint.init_from={path.parent}")
    elif args.command == "to-hf":
        from mtrain.train.hf_export import export_hf

        out = export_hf(args.checkpoint, args.out, model=args.model, like=args.like, dtype=args.dtype,
                        max_shard_bytes=args.max_shard_size, progress=not args.no_progress)
        print(f"wrote {out}")
    else:
        from mtrain.train.hf_import import HFDirectory, model_yaml, plan_import

        src = HFDirectory(args.hf_dir)
        cfg, _, _ = plan_import(src, args.name)
        print(model_yaml(cfg, src.path), end="")


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from mtrain.train.hf_import import HFCheckpointError

    try:
        run(args)
    except (HFCheckpointError, HFConfigError, CorruptCheckpointError, FileNotFoundError) as e:
        print(f"mtrain-convert: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
