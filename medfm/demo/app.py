"""The medfm Gradio app: "Prompt → radiograph" and "Radiograph → report" tabs over the adapters of an index file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import gradio as gr

from ..data.studies import to_pil_rgb
from .index import AdapterEntry, load_index
from .inference import generate_radiographs, mentioned_labels, write_report
from .inputs import MAX_PROMPT_CHARS, InputError, check_prompt, read_upload

BANNER = (
    "### ⚠️ Research use only — not for diagnosis\n"
    "Radiographs made here are **synthetic** and reports are **machine-written**: they are not real patients, carry no "
    "diagnostic meaning and must not inform any clinical decision. Do not upload images with patient identifiers."
)
FINDING_CHIPS = ("Large right pleural effusion.", "Small left pleural effusion.", "Moderate bilateral pleural effusions.", "Large left pneumothorax.",
                 "Right lower lobe consolidation.", "Left lung nodule.", "Cardiomegaly.", "Support devices as described.",
                 "No acute cardiopulmonary process.")
MAX_UPLOAD = "200mb"


def _refuse(err: Exception) -> gr.Error:
    """The message of a refused input as an error shown in the page (no traceback printed or shown)."""
    return gr.Error(str(err), title="Cannot use this input", print_exception=False)


def _add_finding(prompt: str, finding: str) -> str:
    return f"{prompt.strip()} {finding}".strip()


def _describe(entries: list[AdapterEntry], adapter: str) -> str:
    entry = next((e for e in entries if e.adapter == adapter), None)
    return f"{entry.description}  \n`{entry.adapter}`" if entry else ""


def _downloads(paths: list[Path], folder: Path, label: str) -> list[str]:
    """Copies named by what made them (the PNG bytes, and so the provenance text chunks, unchanged) for the download list."""
    folder.mkdir(exist_ok=True)
    return [str(shutil.copyfile(path, folder / f"medfm-{label}-{path.stem}.png")) for path in paths]


def _adapter_choice(entries: list[AdapterEntry], task: str) -> gr.Dropdown:
    choices = [(e.name, e.adapter) for e in entries if e.task == task]
    return gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="Adapter", elem_id=f"{task}-adapter",
                       info=None if choices else f"The index lists no {task} adapter.")


def _text_to_image_tab(entries: list[AdapterEntry], output_root: Path) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            adapter = _adapter_choice(entries, "text-to-image")
            about = gr.Markdown(_describe(entries, adapter.value))
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="prompt", max_length=None,
                                placeholder=f"A finding or a report impression (at most {MAX_PROMPT_CHARS:,} characters), e.g. Large right pleural effusion.")
            gr.Markdown("Findings (click to add):")
            with gr.Row():
                chips = [gr.Button(finding, size="sm", variant="secondary", min_width=60) for finding in FINDING_CHIPS]
            negative_prompt = gr.Textbox(label="Negative prompt", placeholder="What the image should not show (optional)")
            with gr.Row():
                steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                guidance = gr.Slider(0.0, 20.0, value=7.5, step=0.5, label="Guidance scale")
            with gr.Row():
                seed = gr.Number(0, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
                num_images = gr.Slider(1, 4, value=2, step=1, label="Number of images")
            compare = gr.Checkbox(True, label="Compare: also generate with the base model alone (same prompt and seed)")
            run = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Column(scale=3):
            with gr.Row():
                adapted = gr.Gallery(label="Base + adapter", columns=2, elem_id="gallery", buttons=["download", "fullscreen"])
                base_only = gr.Gallery(label="Base alone", columns=2, elem_id="base-gallery", buttons=["download", "fullscreen"])
            files = gr.File(label="Download: PNGs carrying prompt, seed, base, adapter and synthetic: true in their text chunks",
                            file_count="multiple", elem_id="downloads")

    def generate(adapter, prompt, negative_prompt, steps, guidance, seed, num_images, compare, progress=gr.Progress(track_tqdm=True)):
        try:
            prompt = check_prompt(prompt)
        except InputError as err:
            raise _refuse(err) from None
        if not adapter:
            raise _refuse(ValueError("Choose an adapter first."))
        progress(0, desc="Loading the pipeline (once per adapter)")
        folder = Path(tempfile.mkdtemp(dir=output_root))
        with_adapter, base = generate_radiographs(adapter, prompt, folder, negative_prompt, int(steps), float(guidance), int(seed or 0),
                                                  int(num_images), compare)
        downloads = _downloads(with_adapter, folder / "download", "adapter") + _downloads(base, folder / "download", "base")
        return [str(p) for p in with_adapter], [str(p) for p in base], downloads

    adapter.change(lambda a: _describe(entries, a), adapter, about, queue=False)
    for chip, finding in zip(chips, FINDING_CHIPS):
        chip.click(lambda p, f=finding: _add_finding(p, f), prompt, prompt, queue=False)
    run.click(generate, [adapter, prompt, negative_prompt, steps, guidance, seed, num_images, compare], [adapted, base_only, files],
              concurrency_id="model", api_name="generate")


def _report_tab(entries: list[AdapterEntry]) -> None:
    with gr.Row():
        with gr.Column():
            adapter = _adapter_choice(entries, "report")
            about = gr.Markdown(_describe(entries, adapter.value))
            upload = gr.File(label="Chest radiograph: PNG, JPEG, TIFF or DICOM (read as in training: VOI LUT/window, MONOCHROME1, 16-bit)",
                             elem_id="upload")
            indication = gr.Textbox(label="Indication (optional)", placeholder="e.g. Shortness of breath.")
            max_new_tokens = gr.Slider(16, 512, value=128, step=16, label="Max new tokens")
            compare = gr.Checkbox(True, label="Compare: also write the report with the base model alone")
            run = gr.Button("Write report", variant="primary", elem_id="write-report")
        with gr.Column():
            seen = gr.Image(label="What the model sees", type="pil", interactive=False, height=320)
            report = gr.Textbox(label="Base + adapter", lines=6, elem_id="report", buttons=["copy"])
            base_report = gr.Textbox(label="Base alone", lines=3, elem_id="base-report", buttons=["copy"])
            labels = gr.Dataframe(headers=["Observation", "Label"], label="CheXpert labels medfm's rule-based labeler finds in the report",
                                  interactive=False, elem_id="labels")

    def write(adapter, upload, indication, max_new_tokens, compare, progress=gr.Progress()):
        if not upload:
            raise _refuse(ValueError("Upload a chest radiograph first (PNG, JPEG, TIFF or DICOM)."))
        if not adapter:
            raise _refuse(ValueError("Choose an adapter first."))
        try:
            image = to_pil_rgb(read_upload(upload))
        except InputError as err:
            raise _refuse(err) from None
        progress(0.3, desc="Writing the report (the model loads on first use)")
        text = write_report(adapter, image, indication, int(max_new_tokens))
        base_text = write_report(adapter, image, indication, int(max_new_tokens), base_only=True) if compare else ""
        return image, text, mentioned_labels(text), base_text

    adapter.change(lambda a: _describe(entries, a), adapter, about, queue=False)
    run.click(write, [adapter, upload, indication, max_new_tokens, compare], [seen, report, labels, base_report], concurrency_id="model",
              api_name="report")


def build_demo(index: str | Path | None = None) -> gr.Blocks:
    """The demo's Blocks (queued: one model call at a time, so two visitors never collide) over the adapters of `index`."""
    entries = load_index(index)
    with gr.Blocks(title="medfm demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        demo.output_dir = tempfile.TemporaryDirectory(prefix="medfm-demo-")  # generated PNGs; removed with the app
        gr.Markdown(BANNER, elem_id="banner")
        with gr.Tab("Prompt → radiograph", id="text-to-image"):
            _text_to_image_tab(entries, Path(demo.output_dir.name))
        with gr.Tab("Radiograph → report", id="report", elem_id="report-tab"):
            _report_tab(entries)
    return demo.queue(default_concurrency_limit=1, max_size=64)


def launch(index: str | Path | None = None, server_name: str | None = None, server_port: int | None = None, **kwargs) -> gr.Blocks:
    """Serve the demo: on 127.0.0.1 unless `server_name` or $GRADIO_SERVER_NAME (set by Hugging Face Spaces) say otherwise."""
    demo = build_demo(index)
    demo.launch(server_name=server_name or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=server_port,
                show_error=True, max_file_size=MAX_UPLOAD, **kwargs)
    return demo
