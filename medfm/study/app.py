"""The reader-study Gradio app: each reader opens their own link (?token=...), answers their blinded order, and can stop and resume.

Every answer is committed to answers.sqlite before the next case is shown. The page shows a reader their own progress
only; images are the study's re-encoded case files, served under their opaque ids.
"""

from __future__ import annotations

import hmac
import json
import os
import socket
import time
from pathlib import Path

import gradio as gr

from .designs import LIKERT, REPORT_ERROR_CATEGORIES, AnswerError, design_for
from .folder import load_private, load_study, write_links
from .store import store_of

INVALID_LINK = "This link is not valid for this study. Use the link the organiser sent you (it ends with `?token=...`)."
# Keys per design: key -> (elem_id of a radio, value to pick); Enter submits. Shift+1..5 sets the second Likert scale.
SHORTCUTS = {
    "turing": {"r": ("source", "real"), "s": ("source", "synthetic"), **{str(n): ("confidence", str(n)) for n in LIKERT}},
    "rating": {**{str(n): ("realism", str(n)) for n in LIKERT}, **{f"shift+{n}": ("plausibility", str(n)) for n in LIKERT}},
    "pairwise": {"a": ("preference", "A"), "b": ("preference", "B"), "e": ("preference", "equal")},
}
SHORTCUT_HELP = {
    "turing": "Keys: **R** real, **S** synthetic, **1–5** confidence, **Enter** submit.",
    "rating": "Keys: **1–5** realism, **Shift+1–5** anatomical plausibility, **Enter** submit (outside the comment box).",
    "pairwise": "Keys: **A** / **B** which is better, **E** equal, **Enter** submit (outside the text boxes).",
}


def shortcut_script(design: str) -> str:
    """A <script> for the page head: a key picks a radio option (by its value) and Enter presses Submit; typing in a text box is left alone."""
    keys = json.dumps(SHORTCUTS[design])
    return f"""<script>
document.addEventListener("keydown", (event) => {{
  const target = event.target;
  if (target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && !["radio", "checkbox"].includes(target.type)))) return;
  if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
  if (event.key === "Enter") {{ document.querySelector("#submit")?.click(); event.preventDefault(); return; }}
  const digit = event.code && event.code.startsWith("Digit") ? event.code.slice(5) : null;
  const name = event.shiftKey && digit ? "shift+" + digit : (digit || event.key.toLowerCase());
  const shortcut = ({keys})[name];
  if (!shortcut) return;
  const input = document.querySelector(`#${{shortcut[0]}} input[type=radio][value="${{shortcut[1]}}"]`);
  if (input) {{ input.click(); event.preventDefault(); }}
}});
</script>"""


class StudyApp:
    """What the app's events do, over one study folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self.study = load_study(self.folder)
        self.design = design_for(self.study["design"], self.study["reports"])
        self.tokens = load_private(self.folder, "readers.json")
        self.store = store_of(self.folder)

    def reader_of(self, token: str | None) -> str | None:
        """The reader whose token this is (compared in constant time), or None."""
        found = None
        for name, expected in self.tokens.items():
            if token and hmac.compare_digest(token.encode(), expected.encode()):
                found = name
        return found

    def next_position(self, reader: str) -> int | None:
        answered = self.store.answered_positions(reader)
        return next((p for p in range(len(self.study["orders"][reader])) if p not in answered), None)

    def case_view(self, reader: str, position: int | None) -> dict:
        """What the page shows at `position` of the reader's order: images, reports, prompt, progress."""
        order = self.study["orders"][reader]
        if position is None:
            return {"status": f"All {len(order)} cases answered. Thank you, {reader}: you can close this page.", "done": True}
        entry = order[position]
        cases = [self.study["cases"][c] for c in entry["cases"]]
        prompt = self.study["items"][entry["item"]]["prompt"]
        return {"status": f"**{reader}** — case {position + 1} of {len(order)}", "done": False,
                "images": [str(self.folder / c["image"]) for c in cases], "reports": [c["report"] for c in cases],
                "prompt": f"**Prompt:** {prompt}" if prompt else ""}

    def answer(self, reader: str, position: int, values: dict, seconds: float | None) -> None:
        """Check and record one answer (AnswerError when it does not fit the design)."""
        entry = self.study["orders"][reader][position]
        checked = self.design.check(values, self.study["findings"])
        self.store.save(reader, position, entry["item"], entry["cases"], checked, seconds)


def _inputs(design: str, reports: bool, findings: list[str]) -> dict[str, gr.components.Component]:
    """The answer components of a design, keyed by the answer field each one fills."""
    likert = [(str(n), str(n)) for n in LIKERT]
    if design == "turing":
        return {"source": gr.Radio([("Real (R)", "real"), ("Synthetic (S)", "synthetic")], label="Real or synthetic?", elem_id="source"),
                "confidence": gr.Radio(likert, label="Confidence: 1 guess … 5 certain (keys 1–5)", elem_id="confidence")}
    if design == "rating":
        real = "a radiologist's report" if reports else "a real radiograph"
        plausible = "Clinical plausibility of the report for this radiograph" if reports else "Anatomical plausibility"
        return {"realism": gr.Radio(likert, label=f"Realism: 1 clearly artificial … 5 indistinguishable from {real} (keys 1–5)", elem_id="realism"),
                "plausibility": gr.Radio(likert, label=f"{plausible}: 1 impossible … 5 fully plausible (Shift+1–5)", elem_id="plausibility"),
                "findings": gr.CheckboxGroup(findings, label="Findings present", elem_id="findings"),
                "comment": gr.Textbox(label="Comment (optional)", lines=2, elem_id="comment")}
    fields = {"preference": gr.Radio([("A is better (A)", "A"), ("B is better (B)", "B"), ("Equal (E)", "equal")], label="Which is better?",
                                     elem_id="preference")}
    if reports:
        for side in ("a", "b"):
            with gr.Row():
                fields[f"significant_errors_{side}"] = gr.Number(0, precision=0, minimum=0, label=f"Report {side.upper()}: clinically significant errors",
                                                                 elem_id=f"significant-{side}")
                fields[f"insignificant_errors_{side}"] = gr.Number(0, precision=0, minimum=0, label=f"Report {side.upper()}: insignificant errors",
                                                                   elem_id=f"insignificant-{side}")
            fields[f"error_categories_{side}"] = gr.CheckboxGroup(list(REPORT_ERROR_CATEGORIES), label=f"Report {side.upper()}: kinds of error",
                                                                  elem_id=f"categories-{side}")
    fields["comment"] = gr.Textbox(label="Comment (optional)", lines=2, elem_id="comment")
    return fields


def _cleared(component: gr.components.Component):
    """The empty value of an answer component, shown with each new case."""
    if isinstance(component, gr.Number):
        return 0
    return [] if isinstance(component, gr.CheckboxGroup) else None if isinstance(component, gr.Radio) else ""


def build_app(folder: str | Path) -> gr.Blocks:
    """The Blocks of the study app (queued; several readers at once, each on their own session state)."""
    state = StudyApp(folder)
    study = state.study
    pairwise, reports = study["design"] == "pairwise", study["reports"]
    with gr.Blocks(title="medfm reader study", analytics_enabled=False) as app:
        reader, position, shown_at = gr.State(None), gr.State(None), gr.State(None)
        status = gr.Markdown(elem_id="status")
        with gr.Column(visible=False) as form:
            gr.Markdown(f"{state.design.description}  \n{SHORTCUT_HELP[study['design']]}")
            prompt = gr.Markdown(elem_id="prompt")
            with gr.Row():
                image_a = gr.Image(type="filepath", interactive=False, label="A" if pairwise and not reports else "Radiograph", elem_id="image-a",
                                   buttons=["fullscreen"], height=512)
                image_b = gr.Image(type="filepath", interactive=False, label="B", elem_id="image-b", buttons=["fullscreen"], height=512,
                                   visible=pairwise and not reports)
            with gr.Row(visible=reports):
                report_a = gr.Textbox(label="Report A" if pairwise else "Report", interactive=False, lines=6, elem_id="report-a")
                report_b = gr.Textbox(label="Report B", interactive=False, lines=6, elem_id="report-b", visible=pairwise)
            inputs = _inputs(study["design"], reports, study["findings"])
            submit = gr.Button("Submit (Enter)", variant="primary", elem_id="submit")
        fields = list(inputs)
        outputs = [reader, position, shown_at, status, form, prompt, image_a, image_b, report_a, report_b, *inputs.values()]

        def show(name: str | None, at: int | None) -> list:
            view = state.case_view(name, at) if name else {"status": INVALID_LINK, "done": True}
            if view["done"]:
                return [name, None, None, view["status"], gr.Column(visible=False), "", None, None, "", "", *map(_cleared, inputs.values())]
            images, texts = view["images"] + [None], view["reports"] + [""]
            return [name, at, time.monotonic(), view["status"], gr.Column(visible=True), view["prompt"], images[0],
                    images[1] if pairwise and not reports else None, texts[0] or "", texts[1] or "", *map(_cleared, inputs.values())]

        def start(request: gr.Request) -> list:
            name = state.reader_of(request.query_params.get("token"))
            return show(name, state.next_position(name) if name else None)

        def submit_answer(name, at, started, *values) -> list:
            if name is None or at is None:
                raise gr.Error(INVALID_LINK, print_exception=False)
            try:
                state.answer(name, at, dict(zip(fields, values)), time.monotonic() - started if started else None)
            except AnswerError as err:
                raise gr.Error(str(err), title="Answer incomplete", print_exception=False) from None
            return show(name, state.next_position(name))

        app.load(start, None, outputs, api_visibility="private", show_progress="hidden")
        submit.click(submit_answer, [reader, position, shown_at, *inputs.values()], outputs, api_visibility="private", show_progress="hidden",
                     trigger_mode="once")  # a double Enter submits once; a refused answer leaves the form as it was
    app.study_folder = state.folder
    return app.queue(default_concurrency_limit=8)


def serve(folder: str | Path, host: str | None = None, port: int | None = None, **kwargs) -> gr.Blocks:
    """Serve a study: on 127.0.0.1 unless `host` says otherwise; rewrites private/links.txt with the address it serves at."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(folder)
    study = load_study(folder)
    host = host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    block = not kwargs.pop("prevent_thread_lock", False)
    app.launch(server_name=host, server_port=port, show_error=True, allowed_paths=[str(app.study_folder / "cases")],
               blocked_paths=[str(app.study_folder / "private"), str(app.study_folder / "answers.sqlite")],
               head=shortcut_script(study["design"]), footer_links=[], prevent_thread_lock=True, **kwargs)
    shown_host = socket.gethostname() if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{app.server_port}"
    links = write_links(app.study_folder / "private", load_private(folder, "readers.json"), url)
    print(f"Serving the study at {url}; each reader's link is in {links} (send each reader only their own line)", flush=True)
    if block:
        app.block_thread()
    return app
