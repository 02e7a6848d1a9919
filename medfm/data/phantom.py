"""Digital chest-radiograph phantoms with known findings and matching free-text reports.

Built for offline demos and tests: each phantom is a PA/AP chest radiograph drawn from anatomy
(body outline, lungs, heart and mediastinum, diaphragm, ribs, clavicles, spine) with patient-to-patient
variation in size, pose, exposure and noise, plus findings drawn where they appear on real films.
Reports describe what was drawn, in varied radiology language, with negations, hedging and laterality;
labels use the 14 CheXpert observations (1 positive, 0 negative, -1 uncertain, None not mentioned).
Everything is a pure function of the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from ..paths import build_once, medfm_home

PHANTOM_VERSION = "2"

CHEXPERT_LABELS = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

# How often each finding appears in a phantom population.
FINDING_RATES = {
    "cardiomegaly": 0.25,
    "effusion": 0.25,
    "pneumothorax": 0.15,
    "consolidation": 0.2,
    "nodule": 0.12,
    "devices": 0.2,
}
SIDES = ("right", "left")


@dataclass
class PhantomCase:
    """What one phantom shows: anatomy parameters and findings (the ground truth behind its report)."""

    seed: int
    view: str
    cardiomegaly: bool = False
    effusion: dict | None = None  # {"sides": [...], "size": "small|moderate|large"}
    pneumothorax: dict | None = None  # {"side": ..., "size": "small|large"}
    consolidation: dict | None = None  # {"side": ..., "zone": "upper|lower"}
    nodule: dict | None = None  # {"side": ..., "zone": ..., "size_cm": float}
    devices: list[str] = field(default_factory=list)  # "ett", "central_line", "pacemaker", "ng_tube"
    hedged: set[str] = field(default_factory=set)  # findings reported with uncertainty

    @property
    def is_normal(self) -> bool:
        return not (self.cardiomegaly or self.effusion or self.pneumothorax or self.consolidation or self.nodule)


def sample_case(seed: int, left_out: tuple[str, ...] = ()) -> PhantomCase:
    """Draw which findings a phantom has, deterministically from `seed`.

    Findings named in `left_out` (keys of FINDING_RATES) are never drawn; everything else about the case is
    unchanged, so the same seed gives the same patient with or without them.
    """
    unknown = set(left_out) - set(FINDING_RATES)
    if unknown:
        raise ValueError(f"Unknown phantom finding(s) {sorted(unknown)}; choose from {sorted(FINDING_RATES)}")
    rng = np.random.default_rng([seed, 0])
    case = PhantomCase(seed=seed, view=str(rng.choice(["PA", "AP"], p=[0.7, 0.3])))
    has = {name: rng.random() < rate for name, rate in FINDING_RATES.items()}
    case.cardiomegaly = has["cardiomegaly"]
    if has["effusion"]:
        sides = [str(rng.choice(SIDES))] if rng.random() < 0.7 else list(SIDES)
        case.effusion = {"sides": sides, "size": str(rng.choice(["small", "moderate", "large"], p=[0.4, 0.4, 0.2]))}
    if has["pneumothorax"]:
        case.pneumothorax = {"side": str(rng.choice(SIDES)), "size": str(rng.choice(["small", "large"], p=[0.5, 0.5]))}
    if has["consolidation"]:
        case.consolidation = {"side": str(rng.choice(SIDES)), "zone": str(rng.choice(["upper", "lower"], p=[0.35, 0.65]))}
    if has["nodule"]:
        size = round(float(rng.uniform(0.8, 2.5)), 1)
        case.nodule = {"side": str(rng.choice(SIDES)), "zone": str(rng.choice(["upper", "mid", "lower"])), "size_cm": size}
    if has["devices"]:
        kinds = ["ett", "central_line", "pacemaker", "ng_tube"]
        count = int(rng.integers(1, 3))
        case.devices = sorted(str(k) for k in rng.choice(kinds, size=count, replace=False))
    # Subtle findings are sometimes reported with hedging, as radiologists do.
    for name in ("effusion", "consolidation", "pneumothorax"):
        finding = getattr(case, name)
        if finding and finding.get("size", "small") == "small" and rng.random() < 0.3:
            case.hedged.add(name)
    for name in left_out:  # removed after drawing, so the random stream (and the rest of the case) is unchanged
        setattr(case, name, [] if name == "devices" else False if name == "cardiomegaly" else None)
        case.hedged.discard(name)
    return case


# ----------------------------------------------------------------------------------------------------------
# Image


def _smoothstep(x: np.ndarray, edge: float) -> np.ndarray:
    """0 inside (x << 0), 1 outside (x >> 0), with a soft edge of width `edge`."""
    return 1.0 / (1.0 + np.exp(-x / max(edge, 1e-6)))


def _ellipse(xx, yy, cx, cy, rx, ry) -> np.ndarray:
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """A soft line profile (1 on the line, falling to 0 at `half_width`)."""
    return np.exp(-((distance / half_width) ** 2))


def render_phantom(case: PhantomCase, size: int = 256) -> np.ndarray:
    """Render `case` as a float32 radiograph in [0, 1] (bright = dense), shape (size, size)."""
    rng = np.random.default_rng([case.seed, 1])
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    xx, yy = np.meshgrid(lin, lin)
    # Patient pose and habitus.
    scale = rng.uniform(0.9, 1.05)
    shift_x, shift_y = rng.uniform(-0.05, 0.05, size=2)
    xx = (xx - shift_x) / scale
    yy = (yy - shift_y) / scale
    edge = 1.5 / size

    # Soft tissue of the torso, neck and shoulders.
    half_width = rng.uniform(0.84, 0.94)
    body = 1 - _smoothstep((np.abs(xx) / half_width) ** 4 + (np.abs(yy - 0.2) / 1.05) ** 4 - 1, 0.05)
    shoulders = 1 - _smoothstep(_ellipse(xx, yy, 0, -0.72, 1.05, 0.24) - 1, 0.08)
    neck = 1 - _smoothstep(np.abs(xx) - 0.22, 0.02)
    tissue = np.clip(np.maximum(body, shoulders * (yy > -0.95)) + neck * (yy < -0.6), 0, 1)
    density = 0.55 * tissue

    # Lungs: two fields whose lower border is the diaphragmatic dome; right hemidiaphragm sits higher.
    lung_masks = {}
    for side, sign in (("right", -1), ("left", 1)):  # patient's right is on the image left
        cx = sign * rng.uniform(0.36, 0.42)
        rx, ry = rng.uniform(0.28, 0.33), rng.uniform(0.62, 0.7)
        dome_base = 0.5 + (0.0 if side == "right" else 0.05) + rng.uniform(-0.04, 0.04)
        dome = dome_base - 0.14 * np.cos(np.clip((xx - cx) / rx, -1.5, 1.5) * np.pi / 2.5)
        # Narrow apex, broad base: the lung widens towards the diaphragm.
        taper = np.clip(0.55 + 0.45 * (yy + 0.75) / 1.1, 0.35, 1.0)
        field_ = 1 - _smoothstep(_ellipse(xx, yy, cx, -0.05, rx * taper, ry) - 1, 0.02)
        below_dome = _smoothstep(yy - dome, edge * 2)
        lung_masks[side] = field_ * (1 - below_dome)
    lungs = np.maximum(lung_masks["right"], lung_masks["left"])
    texture = gaussian_filter(rng.standard_normal((size, size)), size / 80) * 0.6
    vessels = gaussian_filter(rng.standard_normal((size, size)), size / 160)
    hilum_distance = np.minimum(np.hypot(xx + 0.18, yy + 0.02), np.hypot(xx - 0.18, yy))
    markings = (0.05 * texture + 0.08 * np.clip(vessels, 0, None)) * np.exp(-hilum_distance * 1.6)
    density = density - 0.38 * lungs + markings * lungs

    # Mediastinum, heart, spine.
    mediastinum = 1 - _smoothstep(np.abs(xx - 0.01) - 0.1 - 0.04 * (yy + 1), 0.02)
    mediastinum *= (yy > -0.75) * (yy < 0.55)
    heart_rx = rng.uniform(0.21, 0.25) * (1.45 if case.cardiomegaly else 1.0)
    heart = 1 - _smoothstep(_ellipse(xx, yy, 0.07 + (0.05 if case.cardiomegaly else 0), 0.28, heart_rx, 0.24) - 1, 0.03)
    density = np.maximum(density, 0.5 * mediastinum * tissue)
    density = np.maximum(density, 0.56 * heart * tissue)
    spine = 1 - _smoothstep(np.abs(xx) - 0.06, 0.01)
    vertebrae = 0.5 + 0.5 * np.cos(yy * np.pi * 11)
    density += (0.06 + 0.04 * vertebrae) * spine * tissue

    # Posterior ribs arc down from the spine; clavicles slope up to the shoulders.
    ribs = np.zeros_like(xx)
    for side, sign in (("right", -1), ("left", 1)):
        lateral = np.clip(sign * xx, 0, None)
        for k in range(10):
            y0 = -0.72 + k * 0.13 + rng.uniform(-0.01, 0.01)
            curve = y0 - 0.25 * lateral + 0.9 * (lateral - 0.45) ** 2
            ribs += _band(yy - curve, 0.022) * (lateral > 0.06) * (lateral < 0.88)
    ribs = np.clip(ribs, 0, 1) * tissue
    clavicles = sum(_band(yy - (-0.68 - 0.25 * (sign * xx - 0.1)), 0.03) * ((sign * xx) > 0.08) * ((sign * xx) < 0.7) for sign in (-1, 1))
    density += 0.07 * ribs + 0.15 * np.clip(clavicles, 0, 1) * tissue

    density = _draw_findings(case, density, lung_masks, xx, yy, rng, size)

    # Exposure, detector response and noise differ per patient and view.
    density = gaussian_filter(density, 0.6)
    exposure = rng.uniform(0.85, 1.15) * (0.92 if case.view == "AP" else 1.0)
    image = 1 - np.exp(-2.2 * np.clip(density, 0, None) * exposure)
    image = image ** rng.uniform(0.8, 1.25)
    image += rng.normal(0, rng.uniform(0.008, 0.025), image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _draw_findings(case, density, lungs, xx, yy, rng, size):
    def lung_center(side):
        mask = lungs[side] > 0.5
        return float(xx[mask].mean()), float(yy[mask].mean())

    if case.effusion:
        height = {"small": 0.12, "moderate": 0.3, "large": 0.55}[case.effusion["size"]]
        for side in case.effusion["sides"]:
            cx, _ = lung_center(side)
            rows = np.where(lungs[side].max(axis=1) > 0.5)[0]
            floor = np.interp(rows.max(), np.arange(size), yy[:, 0])
            # Meniscus: fluid climbs higher laterally, blunting the costophrenic angle.
            lateral = np.abs(xx - cx * 0.6) / 0.5
            level = floor - height - 0.12 * lateral**2
            fluid = _smoothstep(yy - level, 0.03) * lungs[side]
            density = np.maximum(density, 0.5 * fluid)
    if case.pneumothorax:
        side = case.pneumothorax["side"]
        sign = -1 if side == "right" else 1
        depth = 0.1 if case.pneumothorax["size"] == "small" else 0.22
        # Air between the collapsed lung edge and the chest wall at the apex and lateral margin.
        outer = _ellipse(xx, yy, sign * 0.39, -0.05, 0.31, 0.67)
        line = np.sqrt(np.clip(outer, 0, None)) - (1 - depth)
        apical = np.clip((0.25 - yy) / 0.6, 0, 1)
        pleural_space = (line > 0) * lungs[side] * apical
        density = np.where(pleural_space > 0.5, 0.1, density)  # no lung markings beyond the pleural line
        density += 0.12 * _band(line, 0.012) * lungs[side] * apical
    if case.consolidation:
        side = case.consolidation["side"]
        cx, cy = lung_center(side)
        cy += -0.25 if case.consolidation["zone"] == "upper" else 0.25
        blob = gaussian_filter(rng.standard_normal(density.shape), size / 40)
        region = 1 - _smoothstep(_ellipse(xx, yy, cx, cy, 0.2, 0.17) - 1, 0.08)
        patchy = np.clip(region * (0.6 + 3 * blob), 0, 1)
        density += 0.3 * patchy * lungs[side]
    if case.nodule:
        side = case.nodule["side"]
        cx, cy = lung_center(side)
        cy += {"upper": -0.3, "mid": 0.0, "lower": 0.25}[case.nodule["zone"]]
        cx += rng.uniform(-0.06, 0.06)
        radius = 0.012 * case.nodule["size_cm"]
        nodule = 1 - _smoothstep(np.hypot(xx - cx, yy - cy) - radius, 0.006)
        density += 0.28 * nodule
    for device in case.devices:
        density += _draw_device(device, xx, yy, rng)
    return density


def _draw_device(device, xx, yy, rng):
    metal = 0.9
    if device == "ett":  # tube down the trachea, tip a few cm above the carina
        tip = rng.uniform(-0.45, -0.3)
        return metal * _band(xx - 0.0, 0.012) * (yy < tip) * 0.5
    if device == "ng_tube":  # midline down past the diaphragm into the stomach
        path = 0.02 + 0.04 * np.clip(yy - 0.5, 0, None) * 6
        return metal * 0.5 * _band(xx - path, 0.008) * (yy < 0.85)
    if device == "central_line":  # from the right subclavian vein into the SVC
        t = np.clip((xx + 0.55) / 0.5, 0, 1)
        curve = -0.62 + 0.35 * t**2
        segment = (xx > -0.55) * (xx < -0.03)
        return metal * 0.6 * _band(yy - curve, 0.01) * segment
    if device == "pacemaker":  # generator box in the left upper chest with a lead to the right heart
        box = (np.abs(xx - 0.55) < 0.09) * (np.abs(yy + 0.55) < 0.06)
        t = np.clip((0.55 - xx) / 0.6, 0, 1)
        lead_y = -0.55 + 0.9 * t
        lead = _band(yy - lead_y, 0.01) * (xx < 0.55) * (xx > -0.05)
        return metal * (box * 1.2 + 0.5 * lead)
    raise ValueError(f"Unknown device {device!r}")


# ----------------------------------------------------------------------------------------------------------
# Report


DEVICE_SENTENCES = {
    "ett": ["Endotracheal tube terminates {d} cm above the carina.", "ET tube in standard position, tip {d} cm above the carina."],
    "central_line": ["Right subclavian central venous catheter tip in the SVC.", "Right-sided central line terminates in the superior vena cava."],
    "pacemaker": ["Left chest wall pacemaker with lead in the right ventricle.", "Left-sided pacing device, lead tip projects over the right ventricle."],
    "ng_tube": ["Enteric tube courses below the diaphragm, tip in the stomach.", "Nasogastric tube tip is in the stomach."],
}


def write_report(case: PhantomCase) -> tuple[dict[str, str], float | None]:
    """Findings and impression sections describing `case`, phrased variably from its seed, and the Pneumonia label
    that phrasing implies (pneumonia is an interpretation the report may or may not make)."""
    rng = np.random.default_rng([case.seed, 2])

    def pick(options):
        return str(options[int(rng.integers(len(options)))])

    findings, impression = [], []
    pneumonia = -1.0 if "consolidation" in case.hedged else None
    for device in case.devices:
        findings.append(pick(DEVICE_SENTENCES[device]).format(d=int(rng.integers(3, 6))))
    if case.devices:
        impression.append(pick(["Support devices as described.", "Lines and tubes in appropriate position."]))

    if case.consolidation:
        c = case.consolidation
        where = f"{c['side']} {c['zone']} lobe"
        if "consolidation" in case.hedged:
            findings.append(pick([f"Subtle opacity in the {where}, possibly early pneumonia.", f"Ill-defined {where} opacity; pneumonia cannot be excluded."]))
            impression.append(f"Possible {c['side']} {c['zone']} lobe pneumonia.")
        else:
            finding = pick([f"Focal consolidation in the {where}.", f"Airspace consolidation in the {where}, concerning for pneumonia.",
                            f"Dense {where} opacity consistent with consolidation."])
            findings.append(finding)
            impression.append(pick([f"{c['side'].capitalize()} {c['zone']} lobe consolidation.", f"{c['side'].capitalize()} {c['zone']} lobe pneumonia."]))
            pneumonia = 1.0 if impression[-1].endswith("pneumonia.") else -1.0 if "concerning for pneumonia" in finding else None
    if case.nodule:
        n = case.nodule
        findings.append(f"{n['size_cm']} cm nodule in the {n['side']} {n['zone']} lung zone.")
        impression.append(pick([f"{n['size_cm']} cm {n['side']} pulmonary nodule; recommend CT for further evaluation.",
                                f"{n['side'].capitalize()} lung nodule."]))
    if not (case.consolidation or case.nodule):
        findings.append(pick(["The lungs are clear.", "Lungs are clear without focal consolidation.", "No focal airspace opacity."]))

    if case.effusion:
        e = case.effusion
        sides = "bilateral" if len(e["sides"]) == 2 else e["sides"][0]
        plural = "effusions" if len(e["sides"]) == 2 else "effusion"
        if "effusion" in case.hedged:
            angles = "both costophrenic angles" if sides == "bilateral" else f"the {sides} costophrenic angle"
            article = "" if plural == "effusions" else "a "
            findings.append(pick([f"Blunting of {angles} may reflect {article}small {plural}.", f"Possible small {sides} pleural {plural}."]))
            impression.append(f"Possible small {sides} pleural {plural}.")
        else:
            verb = "There is a" if plural == "effusion" else "There are"
            findings.append(pick([f"{e['size'].capitalize()} {sides} pleural {plural}.", f"{verb} {e['size']} {sides} pleural {plural}."]))
            impression.append(f"{e['size'].capitalize()} {sides} pleural {plural}.")
    if case.pneumothorax:
        p = case.pneumothorax
        if "pneumothorax" in case.hedged:
            findings.append(f"Questionable small {p['side']} apical pneumothorax.")
            impression.append(f"Possible small {p['side']} pneumothorax; consider repeat imaging.")
        else:
            findings.append(pick([f"{p['size'].capitalize()} {p['side']} pneumothorax.",
                                  f"There is a {p['size']} {p['side']}-sided pneumothorax with visible pleural line."]))
            impression.append(f"{p['size'].capitalize()} {p['side']} pneumothorax.")
    negatives = []
    if not case.effusion:
        negatives.append("pleural effusion")
    if not case.pneumothorax:
        negatives.append("pneumothorax")
    if negatives:
        findings.append(pick([f"No {' or '.join(negatives)}.", f"There is no {' or '.join(negatives)}.", f"No evidence of {' or '.join(negatives)}."]))

    if case.cardiomegaly:
        findings.append(pick(["The heart is enlarged.", "Cardiomegaly.", "Moderate enlargement of the cardiac silhouette."]))
        impression.append(pick(["Cardiomegaly.", "Enlarged heart."]))
    else:
        findings.append(pick(["Heart size is normal.", "Cardiomediastinal silhouette is within normal limits.", "Normal heart size."]))
    findings.append(pick(["No acute osseous abnormality.", "Osseous structures are intact.", ""]))

    if case.is_normal:
        impression.insert(0, pick(["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.", "Normal chest radiograph."]))
    if not case.pneumothorax and (case.devices or case.effusion) and rng.random() < 0.5:
        impression.append("No pneumothorax.")
    return {"findings": " ".join(s for s in findings if s), "impression": " ".join(impression)}, pneumonia


def chexpert_labels(case: PhantomCase, pneumonia: float | None = None) -> dict[str, float | None]:
    """The 14 CheXpert labels a careful reader would assign to `case`'s report."""
    labels: dict[str, float | None] = dict.fromkeys(CHEXPERT_LABELS)

    def mark(name, finding_key):
        labels[name] = -1.0 if finding_key in case.hedged else 1.0

    labels["Cardiomegaly"] = 1.0 if case.cardiomegaly else 0.0
    labels["Pleural Effusion"] = 0.0
    labels["Pneumothorax"] = 0.0
    if case.effusion:
        mark("Pleural Effusion", "effusion")
    if case.pneumothorax:
        mark("Pneumothorax", "pneumothorax")
    if case.consolidation:
        if "consolidation" in case.hedged:  # "subtle/ill-defined opacity ... possible pneumonia": no consolidation named
            labels["Lung Opacity"] = 1.0
        else:
            labels["Consolidation"] = labels["Lung Opacity"] = 1.0
        labels["Pneumonia"] = pneumonia
    if case.nodule:
        labels["Lung Lesion"] = 1.0
    if case.devices:
        labels["Support Devices"] = 1.0
    if case.is_normal:
        labels["No Finding"] = 1.0
    return labels


def make_phantom(seed: int, size: int = 256, left_out: tuple[str, ...] = ()) -> tuple[np.ndarray, dict]:
    """One phantom: the image and its record (report sections, full text, labels, view, seed)."""
    case = sample_case(seed, left_out)
    sections, pneumonia = write_report(case)
    record = {
        "text": f"FINDINGS: {sections['findings']} IMPRESSION: {sections['impression']}",
        **sections,
        "view": case.view,
        "seed": seed,
        "phantom_version": PHANTOM_VERSION,
        **chexpert_labels(case, pneumonia),
    }
    return render_phantom(case, size), record


def write_phantom_dataset(output_dir: str | Path, num_images: int, seed: int = 0, size: int = 256, left_out: tuple[str, ...] = ()) -> Path:
    """Write `num_images` phantoms as an imagefolder dataset (PNG files + metadata.jsonl), without the `left_out` findings."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(num_images), desc="Drawing phantoms", unit="img"):
        image, record = make_phantom(seed * 1_000_003 + i, size, left_out)
        file_name = f"phantom_{i:05d}.png"
        Image.fromarray(np.round(image * 255).astype(np.uint8), mode="L").save(output_dir / file_name)
        rows.append({"file_name": file_name, **record})
    with open(output_dir / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return output_dir


def builtin_phantom_dir(num_images: int, seed: int = 0, size: int = 256) -> Path:
    """The built-in phantom dataset, written once under medfm_home() and reused."""
    target = medfm_home() / "data" / f"phantoms-v{PHANTOM_VERSION}-n{num_images}-seed{seed}-{size}px"
    return build_once(target, "metadata.jsonl", lambda folder: write_phantom_dataset(folder, num_images, seed, size))
