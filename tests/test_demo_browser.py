"""The demo in a real browser (headless Debian Chromium via Playwright), on the adapters shipped in adapters/."""

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfm.demo.browser import CHROMIUM, generate_in_page, open_page, page_error, report_in_page, serve

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} missing: apt-get install chromium")]


@pytest.fixture(scope="module")
def demo_url():
    with serve() as url:
        yield url


def test_prompt_to_radiographs_with_base_comparison_and_provenance_downloads(demo_url, tmp_path):
    requests = []
    with open_page(demo_url, requests) as page:
        generate_in_page(page, prompt="Cardiomegaly.", finding="Large right pleural effusion.")
        assert page.locator("#prompt textarea").input_value() == "Cardiomegaly. Large right pleural effusion."
        assert page.locator("#gallery img").count() == 2 and page.locator("#base-gallery img").count() == 2
        links = page.locator("#downloads a")
        links.nth(3).wait_for()
        with page.expect_download() as download:
            links.first.click()
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)
        page.screenshot(path=tmp_path / "text-to-image.png", full_page=True)
    info = Image.open(saved).text
    assert saved.name.startswith("medfm-adapter-") and info["prompt"] == "Cardiomegaly. Large right pleural effusion." and info["synthetic"] == "true"
    assert all(url.startswith(demo_url) or url.startswith(("data:", "blob:")) for url in requests), "the page reached outside the demo"


def test_radiograph_to_report_and_a_bad_upload_shows_its_message(demo_url, tmp_path):
    from medfm.data.phantom import make_phantom

    image, _ = make_phantom(seed=10_002, size=256)
    Image.fromarray((image * 255).astype(np.uint8)).save(tmp_path / "chest.png")
    Path(tmp_path / "notes.txt").write_text("this is not a radiograph")
    with open_page(demo_url) as page:
        assert report_in_page(page, tmp_path / "chest.png")
        assert page.locator("#labels").get_by_text("Observation").is_visible()
        page.screenshot(path=tmp_path / "report.png", full_page=True)
    with open_page(demo_url) as page:
        message = page_error(page, tmp_path / "notes.txt")
        assert "notes.txt: not an image medfm can read" in message
        assert "Traceback" not in page.content()
