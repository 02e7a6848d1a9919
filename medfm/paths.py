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
    """Run `build(folder)` unless `target/marker` exists; the result appears atomically (never half-written). When another
    process finishes the same folder first, its copy is kept (never deleted under a reader) and this one's is discarded."""
    if not (target / marker).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
        try:
            build(staging)
            if not (target / marker).is_file():
                shutil.rmtree(target, ignore_errors=True)  # a half-written leftover (no marker) of an interrupted older build
                try:
                    staging.rename(target)
                except OSError:  # another process renamed its finished copy there in the meantime
                    if not (target / marker).is_file():
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc/self/status), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_default_mode(*files: str | Path) -> None:
    """Give files the mode a plain open() would (0666 less the umask): safetensors >= 0.8 writes its files 0600 (it writes a
    private temporary file and renames it into place), unlike every other file in an adapter folder."""
    mode = 0o666 & ~current_umask()
    for file in files:
        os.chmod(file, mode)
