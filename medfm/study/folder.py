"""The layout of a study folder: what the app serves and what only the organiser reads.


    STUDY/study.json        design, readers' names, findings offered, each case's report, each reader's order (case ids only)
    STUDY/cases/ID.png      every image decoded and re-encoded the same way: grayscale 8-bit, SIZE x SIZE, uncompressed PNG
    STUDY/answers.sqlite    the answers (created by `medfm study serve`)
    STUDY/private/          never served: key.json (case id -> source, original file, prompt, labels), readers.json and
                            links.txt (per-reader tokens: send each reader their own link), skipped.jsonl (unreadable rows)
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:7860"


def write_private(folder: Path, key: dict, tokens: dict[str, str], url: str) -> None:
    """The organiser's files: the unblinding key and the per-reader tokens, readable by the owner only."""
    for name, text in (("key.json", json.dumps(key, indent=1)), ("readers.json", json.dumps(tokens, indent=1))):
        (folder / name).write_text(text)
        (folder / name).chmod(0o600)
    write_links(folder, tokens, url)


def write_links(folder: Path, tokens: dict[str, str], url: str) -> Path:
    """links.txt: one line per reader, `name<TAB>URL?token=...`; send each reader only their own line."""
    path = folder / "links.txt"
    path.write_text("".join(f"{name}\t{url.rstrip('/')}/?token={token}\n" for name, token in tokens.items()))
    path.chmod(0o600)
    return path


def load_study(folder: str | Path) -> dict:
    """study.json of a study folder, with a clear error when it is not one."""
    path = Path(folder) / "study.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not a study folder (no study.json); create one with `medfm study create`")
    return json.loads(path.read_text())


def load_private(folder: str | Path, name: str) -> dict:
    return json.loads((Path(folder) / "private" / name).read_text())
