"""The reader-study app in a real browser (headless Debian Chromium via Playwright), served in its own process as `medfm study serve` serves it."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from medfm.demo.browser import CHROMIUM, CHROMIUM_ARGS, free_port
from medfm.study.create import create_study
from medfm.study.folder import load_private, load_study
from medfm.study.results import compute_results
from medfm.study.store import store_of
from study_inputs import leaks, write_real, write_synthetic

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK), reason=f"{CHROMIUM} missing: apt-get install chromium")]
REPO = Path(__file__).resolve().parents[1]
TIMEOUT_MS = 60_000


SERVE = "import sys; from medfm.study.app import serve; serve(sys.argv[1], port=int(sys.argv[2]))"


@contextmanager
def study_server(folder: Path):
    """What `medfm study serve` runs, in a subprocess at a free port; yields the process once it says where it serves (links.txt written).

    Started through medfm.study.app rather than the `medfm` command, whose error handling imports torch (20 s more per start here).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, "-c", SERVE, str(folder), str(free_port())], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    threading.Thread(target=lambda: output.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 180
    while not any(line.startswith("Serving the study at") for line in output):
        assert process.poll() is None, "".join(output)
        assert time.monotonic() < deadline, "the study server did not start: " + "".join(output)
        time.sleep(0.2)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def links_of(folder: Path) -> dict[str, str]:
    return dict(line.split("\t") for line in (folder / "private" / "links.txt").read_text().splitlines())


def fetch_files(urls: list[str], server: str) -> dict[str, bytes]:
    """The bytes of every file URL of `server` the pages requested (what a reader's browser received)."""
    served = {}
    for url in {u for u in urls if u.startswith(server) and "/gradio_api/file=" in u}:
        with urllib.request.urlopen(url) as response:
            served[url] = response.read()
    return served


def open_reader(browser, link: str, urls: list[str]):
    """A fresh browser context (no shared session) on a reader's link; every URL it requests goes to `urls`."""
    context = browser.new_context(viewport={"width": 1200, "height": 1400})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.on("request", lambda request: urls.append(request.url))
    page.goto(link)
    page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').trim().length > 0")  # the page has loaded its reader
    return context, page


def answer_in_page(page, folder: Path, study: dict, reader: str, position: int, said: str, confidence: int, keyboard: bool) -> None:
    """Check the page shows `position` with the expected case image, answer it (keys R/S, 1-5, Enter; or clicks) and wait for the next."""
    total = len(study["orders"][reader])
    page.locator("#status").get_by_text(f"case {position + 1} of {total}").wait_for()
    expected = Path(study["cases"][study["orders"][reader][position]["cases"][0]]["image"]).name
    page.wait_for_function("name => (document.querySelector('#image-a img')?.src || '').endsWith(name)", arg=expected)
    if keyboard:
        page.locator("#status").click()  # focus the page, not a field
        page.keyboard.press(said[0])
        page.keyboard.press(str(confidence))
        page.keyboard.press("Enter")
    else:
        page.locator(f'#source input[value="{said}"]').click()
        page.locator(f'#confidence input[value="{confidence}"]').click()
        page.locator("#submit").click()
    following = f"case {position + 2} of {total}" if position + 1 < total else f"All {total} cases answered"
    page.locator("#status").get_by_text(following).wait_for()


def test_two_readers_resume_survive_a_server_kill_and_nothing_tells_the_source(tmp_path):
    from playwright.sync_api import sync_playwright

    real, synthetic = write_real(tmp_path / "real", 4), write_synthetic(tmp_path / "synthetic", 4)
    folder = create_study(tmp_path / "study", real, synthetic, "turing", ["ann", "ben"], repeats=2, seed=5, size=64)
    study, key = load_study(folder), load_private(folder, "key.json")
    total = len(study["orders"]["ann"])
    truth = {reader: [key[e["cases"][0]]["source"] for e in order] for reader, order in study["orders"].items()}

    def scripted(reader, position):  # ann: right on even positions, wrong on odd; ben: always "real"
        if reader == "ben":
            return "real", 3
        right = truth["ann"][position]
        return (right if position % 2 == 0 else {"real": "synthetic", "synthetic": "real"}[right]), 1 + position % 5

    typed, urls, pages = {"ann": [], "ben": []}, [], {"ann": [], "ben": []}

    def answer(page, reader):
        position = len(typed[reader])
        said, confidence = scripted(reader, position)
        answer_in_page(page, folder, study, reader, position, said, confidence, keyboard=reader == "ann")
        typed[reader].append({"source": said, "confidence": confidence})

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        with study_server(folder) as server:
            links = links_of(folder)
            stranger, page = open_reader(browser, links["ann"].split("?")[0] + "?token=not-a-reader", urls)
            page.get_by_text("This link is not valid").wait_for()
            assert page.locator("#image-a img").count() == 0
            stranger.close()
            contexts = {reader: open_reader(browser, links[reader], urls) for reader in ("ann", "ben")}
            for _ in range(4):  # two readers at once, interleaved
                for reader, (_, page) in contexts.items():
                    answer(page, reader)
            contexts["ann"][0].close()  # ann closes her browser half-way and comes back
            contexts["ann"] = open_reader(browser, links["ann"], urls)
            contexts["ann"][1].locator("#status").get_by_text(f"case 5 of {total}").wait_for()
            for _ in range(3):
                for reader, (_, page) in contexts.items():
                    answer(page, reader)
            for reader, (_, page) in contexts.items():
                pages[reader].append(page.content())
            served = fetch_files(urls, links["ann"].split("?")[0])
            server.send_signal(signal.SIGKILL)  # the server dies mid-study
            server.wait()
        assert [len(v) for v in typed.values()] == [7, 7] and len(store_of(folder).answers()) == 14
        with study_server(folder):
            links = links_of(folder)  # the restarted server rewrote the links with its new port
            for reader, (context, page) in contexts.items():
                page.goto(links[reader])
                page.locator("#status").get_by_text(f"case 8 of {total}").wait_for()
            while any(len(v) < total for v in typed.values()):
                for reader, (_, page) in contexts.items():
                    if len(typed[reader]) < total:
                        answer(page, reader)
            for reader, (_, page) in contexts.items():
                pages[reader].append(page.content())
            served.update(fetch_files(urls, links["ann"].split("?")[0]))
            private = f"{links['ann'].split('?')[0]}gradio_api/file={folder / 'private' / 'key.json'}"
            with pytest.raises(urllib.error.HTTPError):
                urllib.request.urlopen(private)
        browser.close()

    answers = {reader: [a["answer"] for a in store_of(folder).answers() if a["reader"] == reader] for reader in typed}
    assert answers == typed, "an answer typed in the browser is missing or different in answers.sqlite"

    results = compute_results(folder)
    first = {reader: [i for i, e in enumerate(study["orders"][reader]) if not e["repeat"]] for reader in typed}
    for reader in typed:
        said = [typed[reader][i]["source"] for i in first[reader]]
        real_said = [s for s, i in zip(said, first[reader]) if truth[reader][i] == "real"]
        synthetic_said = [s for s, i in zip(said, first[reader]) if truth[reader][i] == "synthetic"]
        assert results["per_reader"][reader]["true_recognition_rate"]["value"] == pytest.approx(real_said.count("real") / len(real_said))
        assert results["per_reader"][reader]["false_recognition_rate"]["value"] == pytest.approx(synthetic_said.count("real") / len(synthetic_said))
    assert results["per_reader"]["ben"]["accuracy"]["value"] == pytest.approx(0.5)
    assert results["per_reader"]["ann"]["accuracy"]["value"] == pytest.approx(
        sum(typed["ann"][i]["source"] == truth["ann"][i] for i in first["ann"]) / len(first["ann"]))
    by_item = {r: dict(zip((study["orders"][r][i]["item"] for i in first[r]), ([typed[r][i]["source"] for i in first[r]]))) for r in typed}
    items = sorted(by_item["ann"])
    a, b = [by_item["ann"][i] for i in items], [by_item["ben"][i] for i in items]
    observed = sum(x == y for x, y in zip(a, b)) / len(items)
    expected = sum(a.count(c) / len(items) * b.count(c) / len(items) for c in ("real", "synthetic"))
    assert results["inter_reader"]["kappa"] == pytest.approx((observed - expected) / (1 - expected))

    assert len(served) >= len(set(c["image"] for c in study["cases"].values())), "not every case image was fetched by the pages"
    assert len({len(data) for url, data in served.items() if url.endswith(".png")}) == 1, "served case images differ in byte size"
    for url, data in served.items():
        assert leaks(url.encode()) == [] and str(real) not in url and str(synthetic) not in url
        if url.endswith(".png"):
            assert leaks(data) == [], url
            with Image.open(io.BytesIO(data)) as image:
                assert image.size == (64, 64) and image.mode == "L" and not image.text
    tokens = load_private(folder, "readers.json")
    for reader, contents in pages.items():
        other = "ben" if reader == "ann" else "ann"
        for content in contents:
            assert leaks(content.encode(), provenance=False) == [] and "token=" not in content
            assert tokens[other] not in content and tokens[reader] not in content and f"**{other}**" not in content and f">{other} " not in content


def test_rating_and_report_pairwise_pages_take_keys_refuse_incomplete_answers_and_record(tmp_path):
    from playwright.sync_api import sync_playwright

    from medfm.study.app import serve

    real, synthetic = write_real(tmp_path / "real", 2), write_synthetic(tmp_path / "synthetic", 2)
    generated = tmp_path / "generated"  # machine reports for the same radiographs
    generated.mkdir()
    rows = [json.loads(line) for line in (real / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        (generated / row["file_name"]).write_bytes((real / row["file_name"]).read_bytes())
    (generated / "metadata.jsonl").write_text("".join(json.dumps({**row, "text": "Machine: " + row["text"]}) + "\n" for row in rows))
    rating = create_study(tmp_path / "rating", real, synthetic, "rating", ["ann"], size=64)
    reports = create_study(tmp_path / "reports", real, generated, "pairwise", ["ann"], reports=True, size=64)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        app = serve(rating, port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            _, page = open_reader(browser, links_of(rating)["ann"], [])
            page.locator("#status").click()
            page.keyboard.press("Enter")  # nothing chosen yet: refused with the field's name, nothing recorded
            assert "realism: choose a score from 1 to 5" in page.locator(".toast-body").first.inner_text()
            page.keyboard.press("4")
            page.keyboard.press("Shift+2")
            page.locator("#findings label").first.click()
            page.locator("#comment textarea").press_sequentially("grade 1 of 5")  # digits typed in a text box are text, not shortcuts
            page.locator("#status").click()
            page.keyboard.press("Enter")
            page.locator("#status").get_by_text("case 2 of 4").wait_for()
        finally:
            app.close()
        assert store_of(rating).answers()[0]["answer"] == {"realism": 4, "plausibility": 2, "findings": [load_study(rating)["findings"][0]],
                                                           "comment": "grade 1 of 5"}
        app = serve(reports, port=free_port(), prevent_thread_lock=True, quiet=True)
        try:
            _, page = open_reader(browser, links_of(reports)["ann"], [])
            shown = [page.locator(f"#report-{side} textarea").input_value() for side in "ab"]
            assert sorted(shown, key=len)[1] == "Machine: " + sorted(shown, key=len)[0]
            page.locator("#status").click()
            page.keyboard.press("b")
            page.locator("#significant-a input").fill("2")
            page.locator("#categories-a label").nth(1).click()
            page.locator("#submit").click()
            page.locator("#status").get_by_text("case 2 of 2").wait_for()
        finally:
            app.close()
        browser.close()
    answer = store_of(reports).answers()[0]["answer"]
    assert answer["preference"] == "B" and answer["significant_errors_a"] == 2 and answer["error_categories_a"] == ["Omission of finding"]
