"""``python -m transfer.convert NAME SRC DST``: convert an official checkpoint to safetensors."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import transfer.convert as convert_pkg
from transfer.convert import CONVERTERS
from transfer.errors import TransferError
from transfer.weights import write_safetensors


def _load_all() -> None:
    for mod in pkgutil.iter_modules(convert_pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"transfer.convert.{mod.name}")


def main(argv: list[str] | None = None) -> int:
    _load_all()
    names = CONVERTERS.names()
    parser = argparse.ArgumentParser(prog="python -m transfer.convert", description=__doc__)
    parser.add_argument("name", help=f"converter: {', '.join(names) or '(none registered)'}")
    parser.add_argument("src", type=Path, help="the official checkpoint (file, folder or tarball)")
    parser.add_argument("dst", type=Path, help="output .safetensors file")
    args = parser.parse_args(argv)
    try:
        spec = CONVERTERS.get(args.name)
        if args.dst.suffix != ".safetensors":
            raise TransferError(f"output {str(args.dst)!r} must end in .safetensors")
        sd = spec.convert(args.src)
        digest = write_safetensors(sd, args.dst, metadata={"converter": args.name, "source": args.src.name})
    except (TransferError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst} ({len(sd)} tensors, sha256 {digest})")
    if spec.backbones:
        print(f"use it with: python -m transfer.run backbone=NAME backbone.weights={args.dst}, where NAME is "
              f"the entry of this checkpoint: {', '.join(spec.backbones)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
