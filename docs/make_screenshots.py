"""Screenshots of both demo tabs for the README: docs/demo-text-to-image.png and docs/demo-report.png.

    python docs/make_screenshots.py        # needs Debian's chromium and `pip install playwright`; offline, a minute or two
"""

import os
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # this checkout's medfm, installed or not
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from medfm.data.phantom import make_phantom  # noqa: E402
from medfm.demo.browser import generate_in_page, open_page, report_in_page, serve  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp, serve() as url:
        radiograph = Path(tmp) / "chest.png"
        Image.fromarray((make_phantom(seed=10_015, size=256)[0] * 255).astype(np.uint8)).save(radiograph)
        with open_page(url) as page:
            generate_in_page(page, finding="Large right pleural effusion.")
            page.screenshot(path=DOCS / "demo-text-to-image.png", full_page=True)
            report_in_page(page, radiograph)
            page.screenshot(path=DOCS / "demo-report.png", full_page=True)
    print(f"Wrote {DOCS / 'demo-text-to-image.png'} and {DOCS / 'demo-report.png'}")


if __name__ == "__main__":
    main()
