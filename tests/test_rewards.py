"""Rewards on hand-written report pairs: clinical agreement, negation, length, composition, user functions by dotted path."""

import sys
import textwrap

import pytest

from medfm.config import parse_train_config
from medfm.eval.labeler import label_reports
from medfm.eval.report_metrics import chexpert_f1, label_matrix
from medfm.rewards import Reward, clinical, clinical_micro, length, reward_function, rougel

REFERENCE = "Moderate right pleural effusion. Enlarged heart. Left lower lobe consolidation."


def test_a_report_naming_the_findings_beats_one_that_misses_them():
    naming = "Right pleural effusion. The heart is enlarged. Consolidation in the left lower lobe."
    missing = "Left lower lobe consolidation. No other abnormality."
    nothing = "No acute cardiopulmonary process."
    scores = clinical([naming, missing, nothing], [REFERENCE] * 3)
    assert scores[0] == pytest.approx(1.0)
    assert scores[0] > scores[1] > scores[2]
    total = Reward({"clinical": 1.0, "length": 0.2, "rougel": 0.3})([naming, missing, nothing], [REFERENCE] * 3).total
    assert total[0] > total[1] > total[2]


def test_a_negated_finding_is_not_rewarded_as_present():
    reference = "Small left pleural effusion."
    negated = clinical(["No pleural effusion."], [reference])[0]
    stated = clinical(["Small left pleural effusion."], [reference])[0]
    assert stated == 1.0 and negated == 0.0
    # and naming a finding the reference negates costs the report
    assert clinical(["Large pneumothorax."], ["No pneumothorax."])[0] < clinical(["No pneumothorax."], ["No pneumothorax."])[0]


def test_uncertain_mentions_count_as_medfm_eval_reports_counts_them():
    possible = "Possible left lower lobe pneumonia."
    assert clinical([possible], ["Left lower lobe pneumonia."])[0] < 1.0  # default: uncertain is negative
    assert clinical([possible], ["Left lower lobe pneumonia."], uncertain="positive")[0] == 1.0


def test_clinical_micro_is_each_reports_share_of_the_benchmarks_micro_f1():
    references = [REFERENCE, "Left lung nodule.", "Possible right lower lobe pneumonia.", "No acute cardiopulmonary process.", "Large left pneumothorax."]
    completions = ["Right pleural effusion. Enlarged heart.", "No acute cardiopulmonary process.", "Right lower lobe consolidation.",
                   "No acute cardiopulmonary process.", "Large left pneumothorax."]
    scores = clinical_micro(completions, references)

    def micro_f1(rows):  # the number the evaluation prints (torchmetrics through medfm.eval.report_metrics)
        matrices = [label_matrix(label_reports([texts[i] for i in rows]), "negative") for texts in (references, completions)]
        return chexpert_f1(*matrices)["chexpert_f1_micro_14"]

    everything = micro_f1(range(5))
    for i, score in enumerate(scores):
        assert score == pytest.approx(5 * (everything - micro_f1([j for j in range(5) if j != i])), abs=1e-6)
    assert scores[4] > 0 > scores[1]  # a found finding raises the batch's micro-F1, a missed one lowers it


def test_clinical_micro_charges_a_hedge_less_than_a_wrong_committed_finding():
    """Where per-report F1 gives both 0, micro-F1 counts one missed label for the hedge and three errors for the wrong word."""
    context = ["Enlarged heart.", "Large left pneumothorax.", "Moderate right pleural effusion."]  # the batch's other reports, one missed
    context_written = ["Enlarged heart.", "No acute cardiopulmonary process.", "Moderate right pleural effusion."]
    reference = "Left lower lobe pneumonia."
    hedged, wrong = "Possible left lower lobe pneumonia.", "Left lower lobe consolidation."
    assert clinical([hedged, wrong], [reference] * 2) == [0.0, 0.0]
    micro_hedged, micro_wrong, micro_right = (clinical_micro([report, *context_written], [reference, *context])[0] for report in (hedged, wrong, reference))
    assert micro_right > 0 > micro_hedged > micro_wrong


def test_length_keeps_reports_near_the_reference_length():
    reference = "one two three four five six seven eight nine ten"
    scores = length(["one two three four five six seven eight nine ten", "one two three four five", "one", " ".join(["word"] * 40)],
                    [reference] * 4)
    assert scores[0] == 1.0 and scores[1] == pytest.approx(0.5) and scores[2] == pytest.approx(0.1) and scores[3] == 0.0


def test_weights_compose_and_each_term_is_returned():
    completions = ["Enlarged heart.", "No acute process."]
    scores = Reward({"clinical": 1.0, "length": 0.5, "rougel": 2.0})(completions, ["Enlarged heart. Small left pleural effusion."] * 2)
    assert set(scores.terms) == {"clinical", "length", "rougel"}
    for i in range(2):
        expected = scores.terms["clinical"][i] + 0.5 * scores.terms["length"][i] + 2.0 * scores.terms["rougel"][i]
        assert scores.total[i] == pytest.approx(expected, rel=1e-6)
    assert scores.terms["rougel"] == pytest.approx(rougel(completions, ["Enlarged heart. Small left pleural effusion."] * 2))


def test_a_user_reward_function_by_dotted_path_gets_the_documented_arguments(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        CALLS = []

        def mentions_heart(completions, references, images):
            CALLS.append((completions, references, images))
            return [float("heart" in c.lower()) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    images = [["image-a"], ["image-b"]]
    scores = Reward({"my_rewards:mentions_heart": 2.0})(["Enlarged heart.", "Clear lungs."], ["Enlarged heart.", "Clear lungs."], images)
    assert scores.total == [2.0, 0.0]
    assert sys.modules["my_rewards"].CALLS == [(["Enlarged heart.", "Clear lungs."], ["Enlarged heart.", "Clear lungs."], images)]


def test_bad_reward_terms_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="Unknown reward term 'clinicl'"):
        reward_function("clinicl")
    with pytest.raises(ValueError, match="cannot import 'nope' from module 'medfm.rewards'"):
        reward_function("medfm.rewards:nope")
    (tmp_path / "short_rewards.py").write_text("def one(completions, references, images):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        Reward({"short_rewards:one": 1.0})(["a", "b"], ["a", "b"])


def test_radeval_terms_name_what_to_install_and_never_download(monkeypatch):
    monkeypatch.setitem(sys.modules, "medfm.eval.clinical", None)  # as on a machine without RadEval's part of medfm
    with pytest.raises(ImportError, match="radeval"):
        reward_function("radgraph")


def test_reward_weights_from_flags_and_method_only_keys():
    config = parse_train_config(["--task", "report", "--method", "grpo", "--reward", "clinical=1", "length=0.25", "my_module:fn=0.5"])
    assert config.reward == {"clinical": 1.0, "length": 0.25, "my_module:fn": 0.5}
    assert config.num_generations == 8 and config.beta == 0.04  # grpo's defaults filled in
    sft = parse_train_config(["--task", "report"])
    assert sft.reward is None and sft.num_generations is None and sft.beta is None  # keys sft does not read stay empty
    with pytest.raises(ValueError, match="num_generations is read only by --task report --method grpo"):
        parse_train_config(["--task", "report", "--method", "dpo", "--num_generations", "4"], exit_on_error=False)
    with pytest.raises(ValueError, match="for task 'report'"):
        parse_train_config(["--method", "grpo"], exit_on_error=False)
