"""``python -m timm_epsanet.recipes MODEL``: print the path of MODEL's train.py recipe file."""

import sys

from . import list_recipes, recipe_path


def main() -> None:
    if len(sys.argv) != 2:
        print(f'usage: python -m timm_epsanet.recipes MODEL   (MODEL: {", ".join(list_recipes())})', file=sys.stderr)
        raise SystemExit(2)
    try:
        print(recipe_path(sys.argv[1]))
    except ValueError as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == '__main__':
    main()
