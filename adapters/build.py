"""Rebuild the small adapters shipped in adapters/ (listed in adapters/index.yaml) from the built-in bases and phantoms.

    python adapters/build.py                         # all adapters (about 4 + 60 minutes on one CPU core, then about 6 for the GRPO one)
    python adapters/build.py phantom-report          # one of them
    python adapters/build.py --max_train_steps 100   # flags after the names go to the recipe: a quicker, weaker build

Each adapter is trained with the demo recipe in recipes/configs/ through `accelerate launch recipes/train_lora.py`,
then trimmed to what the demo and a user need: the adapter weights, model card, training_config.yaml and the
last validation output (checkpoints, TensorBoard logs and an empty bad_rows.jsonl are removed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {"phantom-text-to-image": "recipes/configs/demo-text-to-image.yaml", "phantom-report": "recipes/configs/demo-report.yaml",
           "phantom-report-grpo": "recipes/configs/demo-report-grpo.yaml"}  # GRPO from phantom-report: built after it


def train(name: str, recipe_flags: list[str]) -> Path:
    """Run the recipe for `name` into adapters/<name> (a fresh folder), with extra recipe flags."""
    output_dir = REPO / "adapters" / name
    shutil.rmtree(output_dir, ignore_errors=True)
    command = [sys.executable, "-m", "accelerate.commands.launch", "recipes/train_lora.py", "--config", RECIPES[name],
               "--output_dir", f"adapters/{name}", *recipe_flags]
    print("+", " ".join(command[2:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    return output_dir


def trim(output_dir: Path) -> None:
    """Keep the adapter, model card, config and last validation; drop checkpoints, logs and an empty bad_rows.jsonl."""
    for path in [*output_dir.glob("checkpoint-*"), output_dir / "logs"]:
        shutil.rmtree(path, ignore_errors=True)
    bad_rows = output_dir / "bad_rows.jsonl"
    if bad_rows.is_file() and not bad_rows.read_text(encoding="utf-8").strip():
        bad_rows.unlink()
    validation = sorted((output_dir / "validation").glob("step-*"), key=lambda p: int(p.stem.split("-")[1]))
    for path in validation[:-1]:
        path.unlink()


def main(argv: list[str] | None = None) -> None:
    """`build.py [NAME ...] [RECIPE FLAGS ...]`: adapter names first, then flags passed to every recipe run."""
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        raise SystemExit(__doc__)
    split = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names, recipe_flags = argv[:split] or list(RECIPES), argv[split:]
    if unknown := sorted(set(names) - set(RECIPES)):
        raise SystemExit(f"build.py: unknown adapter(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    for name in names:
        output_dir = train(name, recipe_flags)
        trim(output_dir)
        size = sum(p.stat().st_size for p in output_dir.rglob("*") if p.is_file())
        print(f"{output_dir.relative_to(REPO)}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
