"""``python -m timm_epsanet``: print the EPSANet model zoo (no network needed)."""

from .zoo import format_zoo, zoo_entries


def main() -> None:
    print(format_zoo(zoo_entries()))


if __name__ == '__main__':
    main()
