"""``python -m timm_epsanet.recipes MODEL``: print the path of MODEL's train.py recipe file."""

import argparse
from typing import Optional, Sequence

from . import list_recipes, recipe_path


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; ``prog`` is the name the usage line shows (default: the running script's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Print the path of MODEL's train.py argument file with the authors' ImageNet recipe, for "
            '`train.py -c "$(python -m timm_epsanet.recipes MODEL)" ...`.'
        ),
    )
    parser.add_argument('model', metavar='MODEL', help=f'one of: {", ".join(list_recipes())}')
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and print the recipe path; exit 2 for an unknown model."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        print(recipe_path(args.model))
    except ValueError as e:
        parser.error(str(e))


if __name__ == '__main__':
    main(prog='python -m timm_epsanet.recipes')
