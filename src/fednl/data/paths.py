"""Where data lives: the embedded book inside the package and the optional shared data folder.

The shared folder is ``$FEDNL_SHARED_DATA`` when set, else ``<checkout>/../shared/data`` when the package runs
from a source checkout that has one next to it. Nothing else is searched and nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED_BOOK = EMBEDDED_DIR / "chesterton-thursday.txt"
SHARED_ENV = "FEDNL_SHARED_DATA"


def shared_data_dir() -> Path | None:
    """The shared data folder (with ``mmlu/``, ``gutenberg-nltk/``, ``babi-en/``), or ``None`` if there is none."""
    env = os.environ.get(SHARED_ENV)
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    # src/fednl/data/paths.py -> parents[3] is the checkout root; its sibling "shared" holds data/.
    candidate = Path(__file__).resolve().parents[3].parent / "shared" / "data"
    return candidate if candidate.is_dir() else None


def shared_subdir(name: str) -> Path | None:
    """``shared_data_dir()/name`` if it exists."""
    root = shared_data_dir()
    if root is None or not (root / name).is_dir():
        return None
    return root / name
