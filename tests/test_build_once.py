"""medfm.paths.build_once: folders built once, atomically, safe when two processes build the same one."""

from medfm.paths import build_once


def test_a_copy_another_process_finished_first_is_kept_not_deleted_under_its_readers(tmp_path):
    target = tmp_path / "phantoms"

    def build(folder):
        (folder / "metadata.jsonl").write_text("mine")
        target.mkdir()  # meanwhile another process finished the same folder
        (target / "metadata.jsonl").write_text("theirs")

    assert build_once(target, "metadata.jsonl", build) == target
    assert (target / "metadata.jsonl").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["phantoms"]  # this process's staging copy is gone


def test_a_leftover_without_its_marker_is_rebuilt_and_a_finished_one_is_reused(tmp_path):
    target = tmp_path / "phantoms"
    target.mkdir()
    (target / "half-written.png").write_text("")
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "metadata.jsonl").write_text("built")

    build_once(target, "metadata.jsonl", build)
    build_once(target, "metadata.jsonl", build)
    assert len(calls) == 1 and sorted(p.name for p in target.iterdir()) == ["metadata.jsonl"]
