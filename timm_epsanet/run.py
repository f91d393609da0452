"""Run a timm script with the EPSANet models registered.

timm finds models only in modules that were imported, and its scripts (``train.py``, ``validate.py``,
``benchmark.py``, ``inference.py``, ``onnx_export.py``) import only timm. This runner imports
``timm_epsanet`` and then runs the script as ``__main__`` with the remaining arguments, as
``python SCRIPT [ARGS...]`` would::

    python -m timm_epsanet.run path/to/timm/train.py --model epsanet50 ...
    torchrun --nproc_per_node=8 -m timm_epsanet.run path/to/timm/train.py --model epsanet50 ...

Under ``torchrun`` every process runs the runner, so every rank registers the models.
"""

import os
import runpy
import sys
from typing import List, Optional

USAGE = 'usage: python -m timm_epsanet.run SCRIPT [ARGS...]   (e.g. SCRIPT = path/to/timm/train.py)'


def main(argv: Optional[List[str]] = None) -> None:
    """Import ``timm_epsanet`` and run ``argv[0]`` as ``__main__`` with ``argv[1:]`` as its arguments.

    Args:
        argv: Script path followed by its arguments; defaults to ``sys.argv[1:]``.

    Raises:
        SystemExit: With status 2 and a message when no script is given or the script file does not exist;
            otherwise with the script's own exit status, if it exits.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        raise SystemExit(2 if not argv else 0)
    script = argv[0]
    if not os.path.isfile(script):
        print(f'timm_epsanet.run: script not found: {script!r}\n{USAGE}', file=sys.stderr)
        raise SystemExit(2)

    import timm_epsanet  # noqa: F401  (registers the EPSANet models with timm before the script runs)

    # Present the script the interpreter state `python SCRIPT ARGS...` gives it: its own argv, and its
    # folder (not the current directory) first on the import path.
    sys.argv = [script, *argv[1:]]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
