"""Where medfm keeps what it builds once and reuses: built-in bases and built-in data."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def medfm_home() -> Path:
    """`MEDFM_HOME`, default ~/.cache/medfm."""
    return Path(os.environ.get("MEDFM_HOME", Path.home() / ".cache" / "medfm"))


def build_once(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """Run `build(folder)` unless `target/marker` exists; the result appears atomically (never half-written)."""
    if not (target / marker).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            build(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target
