"""medfm.study: blinded case creation, the SQLite store, statistics against hand-computed values, preference export."""

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from medfm.study.create import create_study
from medfm.study.designs import AnswerError, design_for
from medfm.study.export import export_preferences
from medfm.study.folder import load_private, load_study
from medfm.study.results import compute_results, write_results
from medfm.study.store import AnswerStore, store_of
from study_inputs import PATIENT_NAME, PROMPTS, leaks, png_chunks, write_real, write_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("study-inputs")
    return write_real(root / "real", 8), write_synthetic(root / "synthetic", 8)


def _sources(study_dir) -> dict[str, str]:
    key = load_private(study_dir, "key.json")
    study = load_study(study_dir)
    return {item: "/".join(sorted({key[c]["source"] for c in entry["cases"]})) for item, entry in study["items"].items()}


def test_orders_are_balanced_seeded_and_repeat_cases_later(inputs, tmp_path):
    real, synthetic = inputs
    folder = create_study(tmp_path / "s", real, synthetic, "turing", ["ann", "ben", "cy"], repeats=3, seed=7, size=64)
    study, sources, key = load_study(folder), _sources(folder), load_private(folder, "key.json")
    assert Counter(sources.values()) == {"real": 8, "synthetic": 8}
    for name, order in study["orders"].items():
        first = [e["item"] for e in order if not e["repeat"]]
        repeats = [e["item"] for e in order if e["repeat"]]
        assert sorted(first) == sorted(study["items"]) and len(repeats) == 3
        assert Counter(sources[i] for i in first[:10]) == {"real": 5, "synthetic": 5}  # balanced blocks: half-way stops stay balanced
        assert {sources[i] for i in repeats} == {"real", "synthetic"}
        for item in repeats:
            assert [e["item"] for e in order].index(item) < max(i for i, e in enumerate(order) if e["item"] == item and e["repeat"])
    orders = {name: [key[e["cases"][0]]["file_name"] for e in order] for name, order in study["orders"].items()}
    assert len({tuple(o) for o in orders.values()}) == 3, "each reader has their own order"
    again = create_study(tmp_path / "again", real, synthetic, "turing", ["ann", "ben", "cy"], repeats=3, seed=7, size=64)
    key2 = load_private(again, "key.json")
    assert {name: [key2[e["cases"][0]]["file_name"] for e in order] for name, order in load_study(again)["orders"].items()} == orders
    other = create_study(tmp_path / "other", real, synthetic, "turing", ["ann", "ben", "cy"], repeats=3, seed=8, size=64)
    key3 = load_private(other, "key.json")
    assert [key3[e["cases"][0]]["file_name"] for e in load_study(other)["orders"]["ann"]] != orders["ann"]


def test_cases_are_reencoded_alike_and_leak_nothing(inputs, tmp_path):
    real, synthetic = inputs
    folder = create_study(tmp_path / "s", real, synthetic, "turing", ["ann", "ben"], size=96)
    files = sorted((folder / "cases").iterdir())
    assert len(files) == 16
    assert len({f.stat().st_size for f in files}) == 1, "file sizes differ between cases"
    for path in files:
        data = path.read_bytes()
        assert png_chunks(data)[0] == "IHDR" and set(png_chunks(data)) == {"IHDR", "IDAT", "IEND"}
        assert leaks(data) == [] and leaks(path.name.encode()) == []
        with Image.open(path) as image:
            assert image.size == (96, 96) and image.mode == "L" and not image.text and not image.getexif()
    study_text = (folder / "study.json").read_text()
    assert leaks(study_text.encode()) == [] and '"source"' not in study_text and "real" not in study_text.replace('"reports"', "")
    tokens = load_private(folder, "readers.json")
    assert all(token not in study_text for token in tokens.values())
    links = (folder / "private" / "links.txt").read_text()
    assert all(f"?token={token}" in links for token in tokens.values()) and len(set(tokens.values())) == 2
    assert oct((folder / "private").stat().st_mode)[-3:] == "700"
    key = load_private(folder, "key.json")
    assert Counter(v["source"] for v in key.values()) == {"real": 8, "synthetic": 8}
    assert {Path(v["file_name"]).suffix for v in key.values() if v["source"] == "real"} == {".png", ".jpg", ".dcm"}
    assert PATIENT_NAME not in study_text


def test_rating_offers_the_findings_the_prompts_name(inputs, tmp_path):
    real, synthetic = inputs
    folder = create_study(tmp_path / "s", real, synthetic, "rating", ["ann"], size=32)
    assert load_study(folder)["findings"] == ["No Finding", "Cardiomegaly", "Pleural Effusion"]  # what the labeler finds positive in PROMPTS
    chosen = create_study(tmp_path / "t", real, synthetic, "rating", ["ann"], size=32, findings=["Edema"])
    assert load_study(chosen)["findings"] == ["Edema"]
    with pytest.raises(ValueError, match="unknown"):
        create_study(tmp_path / "u", real, synthetic, "rating", ["ann"], size=32, findings=["Pleural effusion"])


def test_answers_are_checked_against_the_design():
    turing = design_for("turing")
    assert turing.check({"source": "real", "confidence": "4", "extra": 1}) == {"source": "real", "confidence": 4}
    with pytest.raises(AnswerError, match="confidence: choose a score from 1 to 5"):
        turing.check({"source": "real", "confidence": 6})
    with pytest.raises(AnswerError, match="source"):
        turing.check({"confidence": 3})
    rating = design_for("rating")
    assert rating.check({"realism": 2, "plausibility": 5, "findings": ["Edema", "Cardiomegaly"]}, ["Cardiomegaly", "Edema"])["findings"] == \
        ["Cardiomegaly", "Edema"]
    with pytest.raises(AnswerError, match="unknown findings"):
        rating.check({"realism": 2, "plausibility": 5, "findings": ["Fracture"]}, ["Edema"])
    reports = design_for("pairwise", reports=True)
    with pytest.raises(AnswerError, match="significant errors a"):
        reports.check({"preference": "A", "significant_errors_a": -1})


KILLED_WRITER = """
import os, signal, sys
from medfm.study.store import AnswerStore
store = AnswerStore(sys.argv[1])
for i in range(20):
    store.save("ann", i, f"item{i}", [f"c{i}"], {"source": "real", "confidence": 1 + i % 5})
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_answers_survive_a_killed_process_and_concurrent_readers(tmp_path):
    path = tmp_path / "answers.sqlite"
    process = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)], env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True)
    assert process.returncode == -signal.SIGKILL
    store = AnswerStore(path)
    assert store.answered_positions("ann") == set(range(20))
    assert store.answers()[3]["answer"] == {"source": "real", "confidence": 4}
    assert store.save("ann", 3, "item3", ["c3"], {"source": "synthetic", "confidence": 5}) is False  # first answer stays
    assert store.answers()[3]["answer"]["source"] == "real"

    def reader(name):
        for i in range(25):
            AnswerStore(path).save(name, i, f"item{i}", [f"c{i}"], {"n": i})

    threads = [threading.Thread(target=reader, args=(name,)) for name in ("ben", "cy", "dee")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(store.answered_positions(name) == set(range(25)) for name in ("ben", "cy", "dee"))
    assert store.answers()[0]["reader"] == "ann" and len(store.answers()) == 95


def _answer_all(folder, choose) -> list[dict]:
    """Answer every position of every reader with `choose(reader, source, index_of_item, repeat)`; returns what was typed."""
    study, key, store = load_study(folder), load_private(folder, "key.json"), store_of(folder)
    items = sorted(study["items"])
    typed = []
    for reader, order in study["orders"].items():
        for position, entry in enumerate(order):
            answer = choose(reader, key[entry["cases"][0]]["source"], items.index(entry["item"]), entry["repeat"])
            store.save(reader, position, entry["item"], entry["cases"], answer)
            typed.append({"reader": reader, "truth": key[entry["cases"][0]]["source"], "item": entry["item"], "repeat": entry["repeat"], **answer})
    return typed


def _cohen_by_hand(a: list, b: list) -> float:
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    expected = sum((a.count(c) / n) * (b.count(c) / n) for c in set(a) | set(b))
    return (observed - expected) / (1 - expected)


def test_turing_results_equal_hand_computed_values(inputs, tmp_path):
    real, synthetic = inputs
    folder = create_study(tmp_path / "s", real, synthetic, "turing", ["ann", "ben"], repeats=4, seed=3, size=32)

    def choose(reader, source, index, repeat):  # scripted readers: ann misses real items 0-2, ben calls every third item synthetic
        if reader == "ann":
            said = "synthetic" if source == "real" and index % 8 < 3 else source
            said = ("real" if said == "synthetic" else "synthetic") if repeat and index % 2 else said
        else:
            said = "synthetic" if index % 3 == 0 else "real"
        return {"source": said, "confidence": 1 + index % 5}

    typed = _answer_all(folder, choose)
    results = compute_results(folder)
    first = [t for t in typed if not t["repeat"]]
    for reader in ("ann", "ben"):
        mine = [t for t in first if t["reader"] == reader]
        real_rows = [t for t in mine if t["truth"] == "real"]
        synthetic_rows = [t for t in mine if t["truth"] == "synthetic"]
        stats = results["per_reader"][reader]
        assert stats["true_recognition_rate"]["value"] == pytest.approx(sum(t["source"] == "real" for t in real_rows) / len(real_rows))
        assert stats["false_recognition_rate"]["value"] == pytest.approx(sum(t["source"] == "real" for t in synthetic_rows) / len(synthetic_rows))
        assert stats["accuracy"]["value"] == pytest.approx(sum(t["source"] == t["truth"] for t in mine) / len(mine))
        low, high = stats["accuracy"]["ci"]
        assert low < stats["accuracy"]["value"] < high
        repeat_pairs = [(next(f["source"] for f in mine if f["item"] == t["item"]), t["source"]) for t in typed if t["reader"] == reader and t["repeat"]]
        assert stats["intra_reader"]["agreement"] == pytest.approx(sum(a == b for a, b in repeat_pairs) / len(repeat_pairs))
    ann = results["per_reader"]["ann"]
    assert ann["false_recognition_rate"]["value"] == 0 and ann["true_recognition_rate"]["value"] < 1
    answers = {reader: {t["item"]: t["source"] for t in first if t["reader"] == reader} for reader in ("ann", "ben")}
    items = sorted(answers["ann"])
    by_hand = _cohen_by_hand([answers["ann"][i] for i in items], [answers["ben"][i] for i in items])
    assert results["inter_reader"]["statistic"] == "Cohen's kappa"
    assert results["inter_reader"]["kappa"] == pytest.approx(by_hand)
    low, high = results["inter_reader"]["ci"]
    assert low <= by_hand <= high
    counts = results["per_reader"]["all readers"]["confusion_matrix"]["counts"]
    assert counts == [[sum(t["truth"] == truth and t["source"] == said for t in first) for said in ("real", "synthetic")] for truth in ("real", "synthetic")]


def test_fleiss_kappa_for_three_readers_equals_hand_computed(inputs, tmp_path):
    real, synthetic = inputs
    folder = create_study(tmp_path / "s", real, synthetic, "turing", ["ann", "ben", "cy"], seed=1, size=32)
    pattern = {"ann": lambda s, i: s, "ben": lambda s, i: "real" if i % 4 == 0 else s, "cy": lambda s, i: "synthetic" if i % 3 == 0 else "real"}
    typed = _answer_all(folder, lambda reader, source, index, repeat: {"source": pattern[reader](source, index), "confidence": 3})
    table = {}
    for t in typed:
        table.setdefault(t["item"], []).append(t["source"])
    n, raters = len(table), 3
    per_item = [(sum(v.count(c) * (v.count(c) - 1) for c in ("real", "synthetic")) / (raters * (raters - 1))) for v in table.values()]
    shares = [sum(v.count(c) for v in table.values()) / (n * raters) for c in ("real", "synthetic")]
    p_bar, p_e = sum(per_item) / n, sum(p * p for p in shares)
    results = compute_results(folder)
    assert results["inter_reader"]["statistic"] == "Fleiss' kappa"
    assert results["inter_reader"]["kappa"] == pytest.approx((p_bar - p_e) / (1 - p_e))


def test_rating_results_html_and_best_vs_worst_export(tmp_path):
    real = write_real(tmp_path / "real", 4)
    synthetic = write_synthetic(tmp_path / "synthetic", 8, per_prompt=2)
    folder = create_study(tmp_path / "s", real, synthetic, "rating", ["ann", "ben"], size=32)
    key = load_private(folder, "key.json")

    def choose(reader, source, index, repeat):
        realism = 5 if source == "real" else 1 + index % 4
        return {"realism": realism, "plausibility": realism, "findings": ["Pleural Effusion"] if index % 2 else [], "comment": "ok"}

    typed = _answer_all(folder, choose)
    results = write_results(folder, seed=0)
    real_scores = [t["realism"] for t in typed if t["truth"] == "real"]
    synthetic_scores = [t["realism"] for t in typed if t["truth"] == "synthetic"]
    pooled = results["per_reader"]["all readers"]
    assert pooled["realism"]["real"]["mean"] == pytest.approx(sum(real_scores) / len(real_scores))
    assert pooled["realism"]["synthetic"]["mean"] == pytest.approx(sum(synthetic_scores) / len(synthetic_scores))
    ci = pooled["realism"]["synthetic"]["ci"]
    assert ci[0] <= pooled["realism"]["synthetic"]["mean"] <= ci[1]
    effusion = pooled["findings_vs_prompt_labels"]["per_finding"]["Pleural Effusion"]
    items = sorted(load_study(folder)["items"])
    labelled = [("Pleural Effusion" in key[t["item"]]["labels"]) for t in typed]
    marked = [items.index(t["item"]) % 2 == 1 for t in typed]
    assert effusion["kappa"] == pytest.approx(_cohen_by_hand(labelled, marked))
    page = (folder / "results" / "index.html").read_text()
    assert "data:image/png;base64," in page and "Realism and plausibility by source" in page
    assert (folder / "results" / "answers.csv").read_text().count("\n") == len(typed) + 1

    counts = export_preferences(folder, tmp_path / "out" / "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "out" / "pairs.jsonl").read_text().splitlines()]
    assert counts["pairs"] == len(rows) > 0
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"} and row["prompt"] in PROMPTS
        assert (tmp_path / "out" / row["chosen"]).is_file() and (tmp_path / "out" / row["rejected"]).is_file()
        assert not Path(row["chosen"]).is_absolute() and leaks(row["chosen"].encode()) == []


def test_pairwise_image_and_report_exports(tmp_path):
    synthetic = write_synthetic(tmp_path / "synthetic", 6, per_prompt=2)
    folder = create_study(tmp_path / "s", None, synthetic, "pairwise", ["ann"], size=32)
    study, key = load_study(folder), load_private(folder, "key.json")
    assert len(study["items"]) == 3 and all(item["prompt"] in PROMPTS for item in study["items"].values())
    typed = _answer_all(folder, lambda reader, source, index, repeat: {"preference": "equal" if index == 0 else "A", "comment": ""})
    assert len(typed) == 3
    counts = export_preferences(folder, tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert counts == {**counts, "pairs": 2, "ties_skipped": 1}
    shown_first = {study["cases"][e["cases"][0]]["image"].split("/")[-1] for e in study["orders"]["ann"]}
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert Path(row["chosen"]).name in shown_first and Path(row["rejected"]).name not in shown_first
        assert (tmp_path / row["chosen"]).read_bytes() != (tmp_path / row["rejected"]).read_bytes()
        assert key[next(c for c, v in study["cases"].items() if v["image"].endswith(Path(row["chosen"]).name))]["prompt"] == row["prompt"]

    real = write_real(tmp_path / "reports-real", 3)
    generated = tmp_path / "reports-generated"
    generated.mkdir()
    for row in map(json.loads, (real / "metadata.jsonl").read_text().splitlines()):
        (generated / row["file_name"]).write_bytes((real / row["file_name"]).read_bytes())
        with open(generated / "metadata.jsonl", "a") as f:
            f.write(json.dumps({"file_name": row["file_name"], "text": "Machine report: " + row["text"]}) + "\n")
    reports = create_study(tmp_path / "r", real, generated, "pairwise", ["ann"], reports=True, size=32)
    study = load_study(reports)
    assert len(study["items"]) == 3 and len(list((reports / "cases").iterdir())) == 3  # one image per radiograph, two reports
    _answer_all(reports, lambda reader, source, index, repeat: {"preference": "B", "significant_errors_a": 1, "insignificant_errors_a": 0,
                                                                "significant_errors_b": 0, "insignificant_errors_b": 2})
    export_preferences(reports, tmp_path / "report-pairs.jsonl", instruction="Write the report.")
    rows = [json.loads(line) for line in (tmp_path / "report-pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert set(row) == {"images", "prompt", "chosen", "rejected"} and row["prompt"] == "Write the report."
        assert (tmp_path / row["images"][0]).is_file() and row["chosen"] != row["rejected"]
    results = compute_results(reports)
    errors = results["per_reader"]["ann"]["significant_errors_per_report"]
    assert errors["real"]["mean"] + errors["synthetic"]["mean"] == pytest.approx(1.0)


def test_turing_study_cannot_be_exported_and_cli_errors_are_messages(inputs, tmp_path, capsys):
    from medfm.cli import main

    real, synthetic = inputs
    main(["study", "create", str(tmp_path / "s"), "--real", str(real), "--synthetic", str(synthetic), "--design", "turing", "--readers", "ann",
          "--size", "32", "--num_cases", "3"])
    assert "private/links.txt" in capsys.readouterr().out
    assert len(load_study(tmp_path / "s")["items"]) == 6
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main(["study", "create", str(tmp_path / "s"), "--real", str(real), "--synthetic", str(synthetic), "--design", "turing", "--readers", "ann"])
    with pytest.raises(SystemExit, match="not preferences"):
        main(["study", "export", str(tmp_path / "s"), "--pairs", str(tmp_path / "p.jsonl")])
    with pytest.raises(SystemExit, match="not a study folder"):
        main(["study", "results", str(tmp_path)])
    main(["study", "results", str(tmp_path / "s")])
    assert "ann (0/6 answered)" in capsys.readouterr().out


def test_serve_command_reaches_the_app_with_its_host_and_port(monkeypatch):
    import medfm.study.app
    from medfm.cli import main

    calls = []
    monkeypatch.setattr(medfm.study.app, "serve", lambda *args: calls.append(args))
    main(["study", "serve", "my-study", "--port", "7999"])
    main(["study", "serve", "my-study", "--host", "0.0.0.0"])
    assert calls == [("my-study", None, 7999), ("my-study", "0.0.0.0", None)]
