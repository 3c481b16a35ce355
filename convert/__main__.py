"""python -m convert: a Hugging Face or original Mistral checkpoint to an MLX directory.

A thin command over mlx_mistral.convert, which the runtime shares.
"""

import argparse
import sys

import mlx_mistral  # noqa: F401  (before mlx: fast BLAS on Linux)
from mlx_mistral.config import Quantization
from mlx_mistral.convert import BITS, DTYPES, GROUP_SIZES, convert
from mlx_mistral.errors import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="SRC",
                   help="Hugging Face layout directory, original Mistral directory (params.json), "
                        "or Hub repo id")
    p.add_argument("--out", required=True, metavar="DST",
                   help="output directory (must not exist or be empty)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize Linear and Embedding weights")
    p.add_argument("--bits", type=int, choices=BITS, help="bits per quantized weight (default 4)")
    p.add_argument("--group-size", type=int, choices=GROUP_SIZES, help="weights per scale/bias (default 64)")
    p.add_argument("--dtype", choices=DTYPES, help="float dtype of the output (default: the checkpoint's)")
    p.add_argument("--force", action="store_true", help="replace a non-empty DST")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    args = p.parse_args(argv)
    if (args.bits or args.group_size) and not args.quantize:
        p.error("--bits and --group-size need --quantize")
    return args


def run(args: argparse.Namespace) -> int:
    q = Quantization(group_size=args.group_size or 64, bits=args.bits or 4) if args.quantize else None
    summary = convert(args.model, args.out, args.dtype, q, force=args.force, progress=True)
    print(f"wrote {args.out}: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_command(lambda: run(args), args.debug, interrupted=f"interrupted: {args.out} was not written")


if __name__ == "__main__":
    sys.exit(main())
