"""Where the files shipped beside the code are (``experiments/``, ``data/test/``), checkout or install.

In a checkout (and an editable install) they sit in the repo root, next to ``saber_pl/``. A wheel
carries them inside the package under ``saber_pl/share/`` with the repo's layout (setup.cfg
``package_dir``), so a repo-relative path such as ``data/test/tiny-000000.tar`` (scale ``tiny``) is
``share/data/test/tiny-000000.tar`` there. ``data/embedded/`` is built by ``make data`` into a checkout
and is never shipped.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SHARE_DIR = PACKAGE_DIR / "share"  # the installed copy; absent in a checkout
ROOT = SHARE_DIR if SHARE_DIR.is_dir() else PACKAGE_DIR.parent  # the folder that holds experiments/ and data/


def shipped_path(path: str) -> str:
    """``path`` when it is a URL, absolute or found from the CWD; else ``ROOT/path`` when that exists.

    So the configs' repo-relative paths work from any directory and from a non-editable install. A
    path found nowhere comes back unchanged: the caller's "not found" error names it as written.
    """
    if "://" in path or path.startswith("pipe:") or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = ROOT / path
    return str(candidate) if candidate.exists() else path
