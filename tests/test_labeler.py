"""The rule-based CheXpert labeler on hand-written hard sentences (negation, uncertainty, lists, laterality)."""

import pytest

from medfm.data.phantom import make_phantom
from medfm.eval.labeler import label_report

# (report, {label: expected}); labels not listed are not checked.
HARD_SENTENCES = [
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": 0, "Pneumothorax": 0, "No Finding": 1}),
    ("No effusion, pneumothorax, or focal consolidation.", {"Pleural Effusion": 0, "Pneumothorax": 0, "Consolidation": 0}),
    ("There is no evidence of pneumothorax.", {"Pneumothorax": 0}),
    ("Small left pleural effusion.", {"Pleural Effusion": 1, "No Finding": None}),
    ("Moderate bilateral pleural effusions, right greater than left.", {"Pleural Effusion": 1}),
    ("No pneumothorax, but there is a small right effusion.", {"Pneumothorax": 0, "Pleural Effusion": 1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Cannot exclude early pneumonia.", {"Pneumonia": -1}),
    ("Right lower lobe opacity, which may represent atelectasis or pneumonia.",
     {"Lung Opacity": 1, "Atelectasis": -1, "Pneumonia": -1}),
    ("Findings are concerning for pneumonia.", {"Pneumonia": -1}),
    ("Possible small left apical pneumothorax.", {"Pneumothorax": -1}),
    ("Questionable small right pneumothorax.", {"Pneumothorax": -1}),
    ("Left pneumothorax has resolved.", {"Pneumothorax": 0}),
    ("Interval resolution of the right pleural effusion.", {"Pleural Effusion": 0}),
    ("Unchanged small left pleural effusion.", {"Pleural Effusion": 1}),
    ("No change in the moderate right pleural effusion.", {"Pleural Effusion": 1}),
    ("Stable cardiomegaly.", {"Cardiomegaly": 1}),
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("Normal heart size.", {"Cardiomegaly": 0}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": 1}),
    ("Cardiomediastinal silhouette is within normal limits.", {"Enlarged Cardiomediastinum": 0}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": 1}),
    ("Lungs are clear without focal consolidation.", {"Consolidation": 0, "No Finding": 1}),
    ("Mild pulmonary vascular congestion without frank edema.", {"Edema": 1}),
    ("No pulmonary edema.", {"Edema": 0}),
    ("Bibasilar atelectasis.", {"Atelectasis": 1, "Lung Opacity": 1}),
    ("1.2 cm nodule in the right upper lobe.", {"Lung Lesion": 1}),
    ("No suspicious pulmonary nodules.", {"Lung Lesion": 0}),
    ("Endotracheal tube terminates 4 cm above the carina.", {"Support Devices": 1, "No Finding": 1}),
    ("Right PICC line tip in the SVC. Lines and tubes in appropriate position.", {"Support Devices": 1}),
    ("Healed left rib fractures.", {"Fracture": 1}),
    ("No displaced rib fracture.", {"Fracture": 0}),
    ("Left lower lobe consolidation consistent with pneumonia.", {"Consolidation": 1, "Pneumonia": 1, "Lung Opacity": 1}),
    ("No pericardial effusion.", {"Pleural Effusion": None}),
    ("Pleural thickening at the left apex.", {"Pleural Other": 1}),
    ("No acute cardiopulmonary process.", {"No Finding": 1}),
    ("No focal consolidation to suggest pneumonia.", {"Consolidation": 0, "Pneumonia": 0}),
]


@pytest.mark.parametrize("report, expected", HARD_SENTENCES, ids=[r[0][:40] for r in HARD_SENTENCES])
def test_hard_sentences(report, expected):
    labels = label_report(report)
    assert {k: labels[k] for k in expected} == expected


def test_phantom_reports_agree_with_their_labels():
    """Phantom reports are written from their labels; the labeler should recover the clear-cut ones."""
    checked = agreed = 0
    for seed in range(300):
        _, record = make_phantom(seed, 16)
        labels = label_report(record["text"])
        for name in ("Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Lesion", "Support Devices", "Pneumonia"):
            if record[name] is not None:
                checked += 1
                agreed += labels[name] == record[name]
    assert agreed / checked > 0.99
