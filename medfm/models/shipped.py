"""Pretrained weights of the tiny built-in bases, shipped inside the package as versioned safetensors files.

A shipped file records the base architecture version, the phantom generator version and the finding left out
of pretraining; loading it into a different architecture or next to a different phantom generator is an error,
never a silent mismatch. `recipes/pretrain_tiny_bases.py` writes these files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from ..data.phantom import PHANTOM_VERSION

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "bases"
PRETRAIN_COMMAND = "python recipes/pretrain_tiny_bases.py {task}"
LEFT_OUT_OF_PRETRAINING = "effusion"  # a key of medfm.data.phantom.FINDING_RATES: never drawn nor reported positively in pretraining


def shipped_path(name: str) -> Path:
    return SHIPPED_DIR / f"{name}.safetensors"


def shipped_fingerprint(name: str) -> str:
    """A short content hash of a shipped file, so cached folders built from an older file are never reused."""
    return hashlib.sha256(shipped_path(name).read_bytes()).hexdigest()[:12]


def pinned_name(builtin: str) -> str:
    """`builtin:<name>@<fingerprint>`: a built-in base name that also says which shipped weights it means (adapters record it)."""
    return f"{builtin}@{shipped_fingerprint(builtin.removeprefix('builtin:'))}"


def recorded_base_name(name_or_path: str, resolved: str) -> str:
    """The base an adapter records (training_config.yaml, model card, adapter_config.json): a built-in name, pinned to the
    shipped weights where there are some (it resolves on any machine, and refuses other weights); else what was loaded."""
    if not name_or_path.startswith("builtin:"):
        return resolved
    builtin = name_or_path.partition("@")[0]
    return pinned_name(builtin) if shipped_path(builtin.removeprefix("builtin:")).exists() else builtin


def unpinned_name(name: str, shipped: str | None) -> str:
    """`builtin:<name>[@<fingerprint>]` -> `builtin:<name>`, after checking that a pinned fingerprint is the shipped file's."""
    builtin, _, pin = name.partition("@")
    if pin and (shipped is None or pin != shipped_fingerprint(shipped)):
        have = f"ships {shipped_fingerprint(shipped)} ({shipped_path(shipped)})" if shipped else "ships no pretrained weights for it"
        raise ValueError(f"{name!r} means the {builtin} weights {pin}, but this medfm {have}: whatever was trained on it (an adapter's "
                         "training_config.yaml names it) was trained on other weights. Retrain it (`python adapters/build.py` for the "
                         "shipped adapters) or install the medfm version it was trained with.")
    return builtin


def save_shipped_weights(modules: dict[str, torch.nn.Module], name: str, base_version: str, left_out: str, task: str, **extra: str) -> Path:
    """Write the modules' weights (fp16, keys prefixed by module name) with the versions they were trained for."""
    tensors = {f"{prefix}.{key}": value.detach().to(torch.float16).contiguous() for prefix, module in modules.items()
               for key, value in module.state_dict().items() if value.is_floating_point()}
    metadata = {"base_version": base_version, "phantom_version": PHANTOM_VERSION, "left_out": left_out, "task": task, **extra}
    path = shipped_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata=metadata)
    return path


def shipped_metadata(name: str) -> dict[str, str]:
    with safe_open(shipped_path(name), framework="pt") as f:
        return f.metadata() or {}


def load_shipped_weights(modules: dict[str, torch.nn.Module], name: str, base_version: str) -> dict[str, str]:
    """Load a shipped file into freshly built fp32 modules after checking it matches this medfm; returns its metadata."""
    path = shipped_path(name)
    if not path.exists():
        raise FileNotFoundError(f"The pretrained weights of the built-in base are missing: {path}. Reinstall medfm, or rebuild them "
                                f"with `{PRETRAIN_COMMAND.format(task='<task>')}`.")
    metadata = shipped_metadata(name)
    expected = {"base_version": base_version, "phantom_version": PHANTOM_VERSION}
    found = {key: metadata.get(key) for key in expected}
    if found != expected:
        raise RuntimeError(f"{path} was pretrained for {found} but this medfm builds {expected}; rebuild it with "
                           f"`{PRETRAIN_COMMAND.format(task=metadata.get('task', '<task>'))}`.")
    tensors = load_file(path)
    for prefix, module in modules.items():
        own = {key[len(prefix) + 1:]: value for key, value in tensors.items() if key.startswith(prefix + ".")}
        state = module.state_dict()
        missing = [key for key, value in state.items() if value.is_floating_point() and key not in own]
        if missing or set(own) - set(state):
            raise RuntimeError(f"{path} does not fit the {prefix} architecture (missing {missing[:3]}, unexpected "
                               f"{sorted(set(own) - set(state))[:3]}); rebuild it with `{PRETRAIN_COMMAND.format(task=metadata.get('task'))}`.")
        module.load_state_dict({key: own[key].to(state[key].dtype) if key in own else state[key] for key in state})
    return metadata
