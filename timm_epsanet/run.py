"""Run a timm script with the EPSANet models registered.

timm finds models only in modules that were imported, and its scripts (``train.py``, ``validate.py``,
``benchmark.py``, ``inference.py``, ``onnx_export.py``) import only timm. This runner imports
``timm_epsanet`` and then runs the script as ``__main__`` with the remaining arguments, as
``python SCRIPT [ARGS...]`` would::

    python -m timm_epsanet.run path/to/timm/train.py --model epsanet50 ...
    torchrun --nproc_per_node=8 -m timm_epsanet.run path/to/timm/train.py --model epsanet50 ...

Under ``torchrun`` every process runs the runner, so every rank registers the models.
"""

import argparse
import os
import runpy
import sys
from typing import List, Optional


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The runner's command line; ``prog`` is the name the usage line shows (default: the running script's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            'Import timm_epsanet (registering the EPSANet models with timm), then run SCRIPT as __main__ with '
            'ARGS, as `python SCRIPT ARGS...` would. Everything after SCRIPT goes to the script, --help included.'
        ),
        epilog='example: %(prog)s path/to/timm/train.py --model epsanet50 --device cpu ...',
    )
    parser.add_argument('script', metavar='SCRIPT', help='the script to run, e.g. path/to/timm/train.py')
    rest = parser.add_argument('args', metavar='ARGS', nargs=argparse.REMAINDER, help="the script's own arguments")
    rest.required = False  # argparse marks every REMAINDER positional required, although it may be empty
    return parser


def main(argv: Optional[List[str]] = None, prog: Optional[str] = None) -> None:
    """Import ``timm_epsanet`` and run ``argv[0]`` as ``__main__`` with ``argv[1:]`` as its arguments.

    Args:
        argv: Script path followed by its arguments; defaults to ``sys.argv[1:]``.
        prog: Name the usage line shows; defaults to the running script's.

    Raises:
        SystemExit: With status 2 and the usage line when no script is given, an option precedes it or the
            script file does not exist; with status 0 for ``--help``; otherwise with the script's own exit
            status, if it exits.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if not os.path.isfile(args.script):
        parser.error(f'script not found: {args.script!r}')

    import timm_epsanet  # noqa: F401  (registers the EPSANet models with timm before the script runs)

    # Present the script the interpreter state `python SCRIPT ARGS...` gives it: its own argv, and its
    # folder (not the current directory) first on the import path.
    sys.argv = [args.script, *args.args]
    sys.path[0] = os.path.dirname(os.path.abspath(args.script))
    runpy.run_path(args.script, run_name='__main__')


if __name__ == '__main__':
    main(prog='python -m timm_epsanet.run')
