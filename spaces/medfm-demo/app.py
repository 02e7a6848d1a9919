"""Hugging Face Space entry point for the medfm demo; `python spaces/medfm-demo/app.py` runs it from a clone too.

The Space installs medfm from requirements.txt; in a clone without `pip install`, the repository root is put on
sys.path instead. An index.yaml next to this file (Hub ids of the adapters to offer) wins over the shipped one.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    import medfm.demo  # noqa: F401
except ImportError:  # a clone: use the repository's medfm
    sys.path.insert(0, str(HERE.parents[1]))

from medfm.demo import launch  # noqa: E402

if __name__ == "__main__":
    launch(HERE / "index.yaml" if (HERE / "index.yaml").is_file() else None)
