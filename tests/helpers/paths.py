"""Where the tests find the repository and the reference folder (``shared/`` beside the checkout,
or ``$D3D_SHARED_DIR``)."""
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("D3D_SHARED_DIR", REPO.parent / "shared"))
