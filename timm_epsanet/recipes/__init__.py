"""Training recipes for timm's train.py (``-c`` argument files), shipped with the package.

``python -m timm_epsanet.recipes epsanet50`` prints the path of epsanet50's recipe file, for use as
``train.py -c "$(python -m timm_epsanet.recipes epsanet50)" ...``.
"""

from importlib import resources
from pathlib import Path
from typing import List

__all__ = ['list_recipes', 'recipe_path']

_SUFFIX = '_authors.yaml'


def list_recipes() -> List[str]:
    """Names of the models that have a recipe."""
    files = resources.files(__name__).iterdir()
    return sorted(f.name[: -len(_SUFFIX)] for f in files if f.name.endswith(_SUFFIX))


def recipe_path(model_name: str) -> Path:
    """Path of the train.py argument file with the authors' ImageNet recipe for ``model_name``.

    Raises:
        ValueError: If there is no recipe for ``model_name``; the message lists the models that have one.
    """
    path = resources.files(__name__) / f'{model_name}{_SUFFIX}'
    if not path.is_file():
        raise ValueError(f'No training recipe for {model_name!r}; recipes exist for: {", ".join(list_recipes())}.')
    return Path(str(path))
