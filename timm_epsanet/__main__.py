"""``python -m timm_epsanet`` (or ``epsanet-zoo``): print the EPSANet model zoo (no network needed)."""

import argparse
from typing import Optional, Sequence

from .zoo import format_zoo, zoo_entries


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The zoo's command line; ``prog`` is the name the usage line shows (default: the running script's)."""
    return argparse.ArgumentParser(
        prog=prog,
        description=(
            'Print the EPSANet models registered with timm as a Markdown table: parameters, GMACs at 224x224 '
            "(convolutions and linear layers), feature channels, the paper's top-1, the Hub repository of the "
            'pretrained config and whether weights are published there. Computed on the meta device, offline.'
        ),
    )


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and print the zoo table."""
    build_parser(prog).parse_args(argv)
    print(format_zoo(zoo_entries()))


if __name__ == '__main__':
    main(prog='python -m timm_epsanet')
