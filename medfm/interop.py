"""Adapters in other tools' formats: a kohya/A1111/ComfyUI LoRA file, and the base with the LoRA merged in."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from safetensors import safe_open
from safetensors.torch import save_file

from .lora import LORA_WEIGHTS_NAME
from .models.families import DIFFUSION_FAMILIES
from .paths import with_default_mode

PEFT_CONFIG_NAME = "adapter_config.json"


def adapter_kind(folder: str | Path) -> str:
    """'text-to-image' (diffusers LoRA file, or a PixArt-Σ PEFT folder trained by medfm) or 'report' (PEFT adapter) for an adapter folder."""
    folder = Path(folder)
    if (folder / LORA_WEIGHTS_NAME).is_file():
        return "text-to-image"
    if (folder / PEFT_CONFIG_NAME).is_file():
        config_file = folder / "training_config.yaml"
        task = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}).get("task") if config_file.is_file() else None
        return "text-to-image" if task == "text-to-image" else "report"
    raise FileNotFoundError(f"{folder} holds neither {LORA_WEIGHTS_NAME} (text-to-image) nor {PEFT_CONFIG_NAME} (report): not a medfm adapter folder")


def _lora_metadata(weights_file: Path) -> dict:
    """The per-component LoRA configs (rank, alpha, patterns) diffusers stores in the safetensors header."""
    with safe_open(str(weights_file), "pt") as f:
        text = (f.metadata() or {}).get("lora_adapter_metadata")
    if text is None:
        raise ValueError(f"{weights_file} has no LoRA metadata (lora_alpha, r): re-save it with medfm or diffusers >= 0.32")
    return json.loads(text)


def _kohya_name(prefixes: dict[str, str], component: str, module: str) -> str:
    """kohya-ss names a LoRA after the module path with '.' -> '_' (text encoders under `text_model`, as CLIP had in transformers 4)."""
    if component.startswith("text_encoder") and not module.startswith("text_model."):
        module = f"text_model.{module}"
    return prefixes[component] + module.replace(".", "_")


def _alpha(metadata: dict, component: str, module: str) -> float:
    patterns = metadata.get(f"{component}.alpha_pattern") or {}
    matches = [value for pattern, value in patterns.items() if module.endswith(pattern)]
    if metadata.get(f"{component}.rank_pattern") or metadata.get(f"{component}.use_rslora") or metadata.get(f"{component}.use_dora"):
        raise ValueError("kohya export supports plain LoRA with one rank per component (no rank_pattern, rsLoRA or DoRA)")
    return float(matches[0] if matches else metadata[f"{component}.lora_alpha"])


def _module_names(state_dict: dict, components) -> set[str]:
    """Module paths of a diffusers-format LoRA state dict, normalised through diffusers' own converters."""
    names = set()
    for component in components:
        own = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        if component.startswith("text_encoder"):
            own = convert_state_dict_to_peft(convert_state_dict_to_diffusers({k.removeprefix("text_model."): v for k, v in own.items()}))
        else:
            own = convert_unet_state_dict_to_peft(own)
        names |= {f"{component}." + k.rsplit(".lora_", 1)[0] for k in own}
    return names


def export_kohya(adapter_dir: str | Path, output_file: str | Path | None = None) -> Path:
    """Write the adapter as one kohya-ss safetensors file (`lora_unet_*`/`lora_te_*`, `.lora_down`/`.lora_up`/`.alpha`).

    That is the key layout A1111, ComfyUI and kohya's sd-scripts load (Flux: sd-scripts' BFL names, `family.kohya_layout`).
    The file is checked by reading it back through diffusers' own kohya converter: a module the kohya naming cannot express
    stops the export by name. Families with no kohya layout that diffusers reads back are refused, naming the folder's format.
    """
    from .generate import adapter_family

    adapter_dir = Path(adapter_dir)
    if adapter_kind(adapter_dir) != "text-to-image":
        raise ValueError(f"{adapter_dir} is a report (PEFT) adapter; kohya export is for text-to-image LoRA")
    family = adapter_family(adapter_dir)
    if not family.kohya_prefixes:
        with_format = ", ".join(f.display_name for f in DIFFUSION_FAMILIES.values() if f.kohya_prefixes)
        folder_format = "PEFT" if family.lora_loader == "peft" else "diffusers"
        raise ValueError(f"{adapter_dir}: {family.display_name} adapters have no kohya/ComfyUI LoRA layout that diffusers reads back, so medfm "
                         f"exports none (it does for {with_format}); the adapter folder ({folder_format} format) is the portable format: "
                         f"{family.loading_snippet('BASE', repr(str(adapter_dir)))}")
    weights_file = adapter_dir / LORA_WEIGHTS_NAME
    metadata = _lora_metadata(weights_file)
    state_dict = family.lora_state_dict(adapter_dir)
    if family.kohya_layout:
        return _save_kohya(_kohya_layout_file(adapter_dir, family, state_dict, metadata), adapter_dir, output_file, family, metadata)
    kohya: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        component, rest = key.split(".", 1)
        module, direction = _split_lora_key(rest)
        name = _kohya_name(family.kohya_prefixes, component, module)
        kohya[f"{name}.lora_{direction}.weight"] = tensor.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(_alpha(metadata, component, module))
    back = family.pipeline_class.lora_state_dict(dict(kohya))
    back = back[0] if isinstance(back, tuple) else back
    lost = _module_names(state_dict, family.kohya_prefixes) ^ _module_names(back, family.kohya_prefixes)
    if lost:
        raise ValueError(f"{adapter_dir}: the kohya naming cannot express these LoRA modules: {sorted(lost)[:5]}")
    return _save_kohya(kohya, adapter_dir, output_file, family, metadata)


def _save_kohya(kohya: dict, adapter_dir: Path, output_file, family, metadata: dict) -> Path:
    output_file = Path(output_file or adapter_dir / f"{adapter_dir.resolve().name}-kohya.safetensors")
    output_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(output_file), metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(metadata[f"{family.denoiser}.r"]),
                                                 "ss_network_alpha": str(metadata[f"{family.denoiser}.lora_alpha"]), "format": "pt"})
    with_default_mode(output_file)
    return output_file


def _kohya_layout_file(adapter_dir: Path, family, state_dict: dict, metadata: dict) -> dict[str, torch.Tensor]:
    """The kohya file of a family whose kohya names are another model's module names (`family.kohya_layout`, Flux's BFL names).

    LoRAs on the parts of one fused kohya linear (Flux's q, k, v) become one LoRA of rank parts x rank with a block-diagonal
    up matrix (absent parts zero): the same update, the layout sd-scripts writes when it trains q, k, v separately. The file
    is read back through diffusers' converter and every module's update (up @ down x alpha / rank) compared to the adapter's.
    """
    loras: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        component, rest = key.split(".", 1)
        module, direction = _split_lora_key(rest)
        loras.setdefault((component, module), {})[direction] = tensor
    fused: dict[str, tuple] = {}  # kohya name -> (parts or None, {part: (down, up, alpha / rank)})
    updates = {}  # diffusers module -> its LoRA's weight update
    for (component, module), lora in loras.items():
        found = next(((m, name, parts) for pattern, name, parts in family.kohya_layout if (m := re.fullmatch(pattern, module))), None)
        if found is None:
            raise ValueError(f"{adapter_dir}: the {family.display_name} kohya layout has no name for the LoRA module {module!r}; "
                             "train without it (--lora_layers) or share the adapter folder")
        match, name, parts = found
        scale = _alpha(metadata, component, module) / lora["down"].shape[0]
        updates[f"{component}.{module}"] = lora["up"] @ lora["down"] * scale
        entry = fused.setdefault(family.kohya_prefixes[component] + match.expand(name), (parts, {}))
        entry[1][match.group(match.lastindex) if parts else None] = (lora["down"], lora["up"], scale)
    kohya = {}
    for name, (parts, members) in fused.items():
        if parts is None:
            down, up, scale = members[None]
        else:
            down, up, scale = _block_diagonal(name, parts, members)
        kohya.update({f"{name}.lora_down.weight": down.contiguous(), f"{name}.lora_up.weight": up.contiguous(),
                      f"{name}.alpha": torch.tensor(scale * down.shape[0])})
    _check_read_back(adapter_dir, family, kohya, updates)
    return kohya


def _block_diagonal(name: str, parts: tuple, members: dict) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(down, up, alpha / rank) of one LoRA on a fused linear made of per-part LoRAs (one rank and alpha for all parts)."""
    shapes = {(down.shape[0], scale) for down, _, scale in members.values()}
    if len(shapes) > 1:
        raise ValueError(f"{name}: the fused parts {sorted(members)} have different ranks or alphas; kohya's fused layout needs one")
    (rank, scale), = shapes
    down0, up0, _ = next(iter(members.values()))
    unit = up0.shape[0] // dict(parts)[next(iter(members))]
    widths = [unit * width for _, width in parts]
    down = torch.zeros(rank * len(parts), down0.shape[1], dtype=down0.dtype)
    up = torch.zeros(sum(widths), rank * len(parts), dtype=up0.dtype)
    row = 0
    for i, ((part, _), width) in enumerate(zip(parts, widths)):
        if part in members:
            down[i * rank : (i + 1) * rank] = members[part][0]
            up[row : row + width, i * rank : (i + 1) * rank] = members[part][1]
        row += width
    return down, up, scale


def _check_read_back(adapter_dir: Path, family, kohya: dict, updates: dict[str, torch.Tensor]) -> None:
    """Read the kohya file back through diffusers' converter: each module's weight update must be the adapter's, and any module
    the fused layout adds (an absent part) must change nothing."""
    try:
        back = family.pipeline_class.lora_state_dict(dict(kohya))
    except (AssertionError, ValueError, KeyError) as error:
        raise ValueError(f"{adapter_dir}: diffusers cannot read this adapter back from the {family.display_name} kohya layout "
                         f"({type(error).__name__}: {error}; its reader may assume the released model's layer sizes); share the adapter folder") from error
    back = back[0] if isinstance(back, tuple) else back
    read = {key.rsplit(".lora_A.weight", 1)[0]: back[key.replace(".lora_A.", ".lora_B.")] @ tensor for key, tensor in back.items() if ".lora_A." in key}
    wrong = [m for m, update in updates.items() if m not in read or not torch.allclose(read[m], update, rtol=1e-4, atol=1e-6)]
    wrong += [m for m, update in read.items() if m not in updates and update.abs().max() > 0]
    if wrong:
        raise ValueError(f"{adapter_dir}: the kohya file does not read back as the adapter for these modules: {sorted(wrong)[:5]}")


def _split_lora_key(key: str) -> tuple[str, str]:
    """('down_blocks.0....to_q', 'down'|'up') from a diffusers LoRA key (`.lora.down.weight` or `.lora_linear_layer.up.weight`)."""
    for marker, direction in ((".lora.down.weight", "down"), (".lora.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
                              (".lora_linear_layer.up.weight", "up"), (".lora_A.weight", "down"), (".lora_B.weight", "up")):
        if key.endswith(marker):
            return key[: -len(marker)], direction
    raise ValueError(f"Unexpected LoRA key {key!r}")


def merge_adapter(adapter: str | Path, output_dir: str | Path, pretrained_model_name_or_path: str | None = None) -> Path:
    """Write the base with the LoRA fused in: a diffusers pipeline folder (text-to-image) or a transformers model folder (report).

    `adapter` is a folder or a Hub id; the base is the one the adapter was trained on unless given.
    """
    from .generate import adapter_family, load_report_model, load_text_to_image_pipeline
    from .hub import resolve_adapter

    folder = resolve_adapter(adapter)
    output_dir = Path(output_dir)
    if adapter_kind(folder) == "text-to-image":
        pipe, _ = load_text_to_image_pipeline(str(folder), pretrained_model_name_or_path, device="cpu")
        adapter_family(folder, pretrained_model_name_or_path).fuse_adapter(pipe)
        pipe.save_pretrained(output_dir)
    else:
        model, processor, _ = load_report_model(str(folder), pretrained_model_name_or_path, device="cpu")
        model.merge_and_unload().save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
    return output_dir
