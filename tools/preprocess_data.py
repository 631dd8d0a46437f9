#!/usr/bin/env python
"""Tokenize .txt / .jsonl files into an indexed dataset (<prefix>.bin / <prefix>.idx).

Examples:
  python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus --tokenizer tokenizer.json
  python tools/preprocess_data.py --input a.txt b.txt --output-prefix data/ab --train-tokenizer --vocab-size 8192
"""
from __future__ import annotations

import argparse
import sys

from mtrain.data.preprocess import iter_documents, tokenizer_path, write_indexed_dataset
from mtrain.data.tokenizer import Tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help=".txt files (one document each) or .jsonl files "
                        "(one document per line)")
    parser.add_argument("--json-key", default="text", help="field holding the text in .jsonl records")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin and <prefix>.idx")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokenizer", help="a tokenizer.json to encode with")
    source.add_argument("--train-tokenizer", action="store_true", help="train a byte-level BPE on the inputs "
                        "first and save it as <prefix>.tokenizer.json")
    parser.add_argument("--vocab-size", type=int, help="vocabulary size of the trained tokenizer")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.train_tokenizer and args.vocab_size is None:
        parser.error("--train-tokenizer needs --vocab-size")
    if args.tokenizer and args.vocab_size is not None:
        parser.error("--vocab-size applies only with --train-tokenizer")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.train_tokenizer:
        print(f"training a byte-level BPE tokenizer (vocab {args.vocab_size}) on {len(args.input)} input(s)",
              flush=True)
        tokenizer = Tokenizer.train(iter_documents(args.input, args.json_key), args.vocab_size)
        saved = tokenizer_path(args.output_prefix)
        saved.parent.mkdir(parents=True, exist_ok=True)
        tokenizer.save(saved)
        print(f"saved tokenizer to {saved}", flush=True)
    else:
        tokenizer = Tokenizer.from_file(args.tokenizer)
    summary = write_indexed_dataset(iter_documents(args.input, args.json_key), args.output_prefix, tokenizer,
                                    workers=args.workers, progress=not args.no_progress)
    print(f"wrote {args.output_prefix}.bin/.idx: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
