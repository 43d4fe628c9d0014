"""Where the shipped recipes, container plugins and templates live.

In a wheel they travel inside the package (runner/_shipped/, see pyproject.toml); in a source
checkout they are the top-level folders next to runner/.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `recipes`, `containers` or `templates`."""
    installed = _PACKAGE_DIR / "_shipped" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / kind
