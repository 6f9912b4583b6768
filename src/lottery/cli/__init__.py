"""The ``lottery`` command: the entry point.

One module per command family (``train``, ``info``, ``cs``, ``imp``, ``l0gmp``, ``structured``,
``sweep``), each with a ``register`` function that adds its parsers; what they share is in
``lottery.cli.common``. Nothing imports this module except the console script and ``python -m lottery``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lottery.cli.common import OneLineErrorParser, add_import_flag, import_user_models, one_line
from lottery.errors import LotteryError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="lottery",
        description="Sparse networks: Continuous Sparsification, lottery tickets, pruning baselines.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True

    from lottery.cli import cs, imp, info, l0gmp, structured, sweep, train
    from lottery.cli.common import common_flags

    train.register(sub)
    info.register(sub)
    search_sub, prune_sub = cs.register(sub)
    imp.register(search_sub, prune_sub, sub, common_flags)
    l0gmp.register(search_sub, prune_sub, common_flags)
    sweep.register(sub, common_flags)
    structured.register(sub, common_flags)
    add_import_flag(parser)
    return parser


def _version() -> str:
    from lottery import __version__

    return f"lottery {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        import_user_models(args)
        return int(args.func(args) or 0)
    except LotteryError as e:
        print(f"lottery: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lottery: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        from lottery.distributed import is_distributed

        if is_distributed():
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
