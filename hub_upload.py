#!/usr/bin/env python3
"""Publish EPSANet weights to the Hugging Face Hub in timm's format.

    python hub_upload.py --model epsanet50 --checkpoint model_best.pth.tar [--repo-id ORG/NAME] ...

Converts a checkpoint (authors' main.py, timm train.py, plain state dict or safetensors) into a folder
with model.safetensors, config.json and a model card, verifies that timm reloads it bit-identically,
and pushes it only when --repo-id is given. ``python hub_upload.py --help`` lists every option; the
logic lives in ``timm_epsanet.publish``.
"""

import sys
from pathlib import Path

# Run from a checkout without installing: the package sits next to this script.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timm_epsanet.publish import main  # noqa: E402

if __name__ == '__main__':
    sys.exit(main())
