from medfm.data.reports import clean_report, select_section, split_sections, truncate_to_tokens
from medfm.models.tokenizers import clip_tokenizer

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)
 INDICATION:  ___F with cough and fever.
 FINDINGS:  There is a new ___ right lower lobe opacity.  No pleural effusion or pneumothorax.
 The heart size is normal.
 IMPRESSION:  Right lower lobe pneumonia."""


def test_placeholders_and_whitespace_are_cleaned():
    assert clean_report("The XXXX are clear.  Heart  size is ___ normal . ") == "The are clear. Heart size is normal."
    assert clean_report(None) == ""


def test_sections_are_split_by_header():
    sections = split_sections(MIMIC_STYLE)
    assert sections["impression"] == "Right lower lobe pneumonia."
    assert sections["findings"].startswith("There is a new ___ right lower lobe opacity.")
    assert "indication" in sections and "examination" in sections


def test_section_choice_and_fallback():
    assert select_section(MIMIC_STYLE, "impression") == "Right lower lobe pneumonia."
    assert select_section(MIMIC_STYLE, "findings") == "There is a new right lower lobe opacity. No pleural effusion or pneumothorax. The heart size is normal."
    assert select_section(MIMIC_STYLE, "both").endswith("normal. Right lower lobe pneumonia.")
    assert select_section("FINDINGS: Lungs are clear.", "impression") == "Lungs are clear."
    assert select_section("No acute process.", "findings") == "No acute process."  # no headers: all body


def test_truncation_keeps_whole_sentences_within_the_clip_limit():
    tokenizer = clip_tokenizer()
    count = lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)  # noqa: E731
    sentences = [f"Finding number {i} is a moderate right pleural effusion with adjacent atelectasis." for i in range(12)]
    text, truncated = truncate_to_tokens(" ".join(sentences), count, 75)
    assert truncated and count(text) <= 75
    assert text.endswith("atelectasis.") and text.count(".") == len(text.split(". "))
    assert sentences[0] in text


def test_a_single_overlong_sentence_is_cut_at_a_word_boundary():
    words = " ".join(f"opacity{i}" for i in range(100))
    text, truncated = truncate_to_tokens(words, lambda t: len(t.split()), 10)
    assert truncated and text == " ".join(f"opacity{i}" for i in range(10))


def test_short_text_is_untouched():
    assert truncate_to_tokens("No acute process.", lambda t: 3, 75) == ("No acute process.", False)
