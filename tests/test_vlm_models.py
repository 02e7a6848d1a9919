"""Each VLM family on its tiny built-in: load, a training step, LoRA targets, generation, adapter round trip."""

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from PIL import Image
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, LlamaConfig

from medfm.models.vlm import (
    BUILTIN_TINY_VLMS,
    VLM_FAMILIES,
    answer_prefix,
    build_prompt,
    build_tiny_vlm,
    family_of,
    load_vlm,
    materialize_builtin_vlm,
    resolve_vlm,
)

FAMILY_BUILTINS = {family: name for name, family in BUILTIN_TINY_VLMS.items()}
LANGUAGE_MODEL = {"llava": "language_model", "qwen2_vl": "language_model", "paligemma": "language_model", "idefics3": "text_model",
                  "gemma3": "language_model", "qwen3_vl": "language_model", "smolvlm": "text_model"}
VISION_TOWER = {"llava": "vision_tower", "qwen2_vl": "visual", "paligemma": "vision_tower", "idefics3": "vision_model",
                "gemma3": "vision_tower", "qwen3_vl": "visual", "smolvlm": "vision_model"}
REPORT = "FINDINGS: Heart size is normal.\nIMPRESSION: No acute process; 3 cm nodule."
# what the chat template puts before the answer
ANSWER_PREFIX = {"llava": " ", "qwen2_vl": "", "paligemma": "", "idefics3": " ", "gemma3": "", "qwen3_vl": "", "smolvlm": " "}

each_family = pytest.mark.parametrize("family", list(VLM_FAMILIES))


@pytest.fixture(scope="module")
def base():
    """Each built-in, materialised and loaded once with the Auto classes: family -> (folder, model, processor)."""
    loaded = {}

    def get(family):
        if family not in loaded:
            folder = materialize_builtin_vlm(FAMILY_BUILTINS[family])
            model = AutoModelForImageTextToText.from_pretrained(folder).eval()
            loaded[family] = folder, model, AutoProcessor.from_pretrained(folder)
        return loaded[family]

    return get


def radiograph(seed=0, size=(40, 36)):
    return Image.fromarray((np.random.default_rng(seed).random(size) * 255).astype(np.uint8)).convert("RGB")


def prompt_inputs(processor, family, num_images=1):
    prompt = build_prompt(processor, VLM_FAMILIES[family], "Describe the chest X-ray.", num_images=num_images)
    images = [[radiograph(seed) for seed in range(num_images)]]
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    inputs.pop("labels", None)  # PaliGemma's processor returns all -100 labels without a suffix
    return inputs


def training_batch(processor, family):
    """Prompt tokens + report tokens + eos, labels only on the report, per-token tensors extended as documented."""
    inputs = prompt_inputs(processor, family)
    tokenizer = processor.tokenizer
    answer = tokenizer(ANSWER_PREFIX[family] + REPORT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    answer = torch.cat([answer, torch.tensor([[tokenizer.eos_token_id]])], dim=1)
    prompt_ids = inputs["input_ids"]
    batch = dict(inputs)
    batch["input_ids"] = torch.cat([prompt_ids, answer], dim=1)
    batch["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(answer)], dim=1)
    batch["labels"] = torch.cat([torch.full_like(prompt_ids, -100), answer], dim=1)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL, Qwen3-VL: 0 = text, 1 = image (M-RoPE positions)
        batch["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(answer)], dim=1)
    if "token_type_ids" in inputs:  # PaliGemma: 0 = bidirectional prefix, 1 = causal suffix; Gemma 3: 1 = image (bidirectional), 0 = text
        report_type = VLM_FAMILIES[family].report_token_type_id
        batch["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.full_like(answer, report_type)], dim=1)
    return batch


@each_family
def test_builtin_loads_with_auto_classes(base, family):
    folder, model, processor = base(family)
    assert resolve_vlm(FAMILY_BUILTINS[family]) == str(folder)
    assert family_of(model) is VLM_FAMILIES[family] and family_of(model.config) is VLM_FAMILIES[family]
    assert sum(p.numel() for p in model.parameters()) < 5_000_000
    assert model.config.get_text_config().vocab_size >= len(processor.tokenizer)
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id


@each_family
def test_tokenizer_round_trips_report_text(base, family):
    tokenizer = base(family)[2].tokenizer
    text = REPORT + "  Café, 12°; ÉTÉ."
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


@each_family
def test_prompt_ends_where_the_answer_starts(base, family):
    processor = base(family)[2]
    prompt = build_prompt(processor, VLM_FAMILIES[family], "Describe.")
    if family == "paligemma":  # prefix form; the processor adds <bos> after the images and the closing newline
        assert prompt == "<image>Describe."
        return
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    assistant = {"role": "assistant", "content": [{"type": "text", "text": "Normal."}]}
    conversation = processor.apply_chat_template([user, assistant], tokenize=False)
    assert conversation.startswith(prompt) and conversation[len(prompt) :].startswith(ANSWER_PREFIX[family] + "Normal.")
    assert answer_prefix(processor, VLM_FAMILIES[family]) == ANSWER_PREFIX[family]


@each_family
def test_forward_backward_on_report_tokens(base, family):
    _, model, processor = base(family)
    loss = model(**training_batch(processor, family)).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    assert grads and all(torch.isfinite(g).all() for g in grads)


@each_family
def test_report_tokens_cannot_see_the_future(base, family):
    """With the extended tensors, changing the last report token changes no earlier logits (no label leakage)."""
    _, model, processor = base(family)
    batch = training_batch(processor, family)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][0, -2] = processor.tokenizer.convert_tokens_to_ids("a</w>")
    with torch.no_grad():
        before, after = model(**batch).logits, model(**changed).logits
    assert torch.equal(before[0, :-2], after[0, :-2]) and not torch.equal(before[0, -2:], after[0, -2:])


def test_gemma3_image_tokens_attend_both_ways_report_tokens_causally(base):
    """MedGemma's attention: the processor marks the image soft tokens (type 1), which see each other both ways; the rest is causal."""
    folder, _, processor = base("gemma3")
    model = AutoModelForImageTextToText.from_pretrained(folder, attn_implementation="eager").eval()
    batch = training_batch(processor, "gemma3")
    image = batch["input_ids"][0] == model.config.image_token_id
    assert image.sum() == model.config.mm_tokens_per_image and torch.equal(batch["token_type_ids"][0].bool(), image)
    with torch.no_grad():
        attentions = model(**batch, output_attentions=True).attentions
    first, last = image.nonzero()[[0, -1], 0].tolist()
    report = (batch["labels"][0] != -100).nonzero()[:, 0]
    for layer in attentions:
        assert (layer[0, :, first, last] > 0).all()  # the first image token sees the last
        assert (layer[0, :, report[0], report[1]] == 0).all()  # a report token does not see the next one


@each_family
def test_two_views_in_one_prompt(base, family):
    _, model, processor = base(family)
    vlm = VLM_FAMILIES[family]
    if not vlm.supports_multiple_images:
        with pytest.raises(ValueError, match="one image per prompt"):
            build_prompt(processor, vlm, "Describe.", num_images=2)
        return
    inputs = prompt_inputs(processor, family, num_images=2)  # frontal + lateral
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@each_family
def test_lora_patterns_split_language_model_and_vision_tower(base, family):
    folder = base(family)[0]
    vlm = VLM_FAMILIES[family]
    text_targets = lora_targets(folder, vlm.language_model_pattern)
    num_layers = AutoConfig.from_pretrained(folder).get_text_config().num_hidden_layers
    assert len(text_targets) == 7 * num_layers  # q, k, v, o, gate, up, down in every decoder layer
    assert all(f".{LANGUAGE_MODEL[family]}." in name and VISION_TOWER[family] not in name for name in text_targets)

    vision_targets = lora_targets(folder, vlm.vision_tower_pattern)
    assert vision_targets and all(f".{VISION_TOWER[family]}." in name for name in vision_targets)


@each_family
def test_every_projector_module_is_in_the_model(base, family):
    """`--train_projector` names modules by suffix; each must exist (Qwen3-VL: the merger and its three DeepStack mergers)."""
    model = base(family)[1]
    names = [name for name, _ in model.named_modules()]
    for projector in VLM_FAMILIES[family].projector_modules:
        assert [name for name in names if name.endswith(projector)], projector


def test_qwen3_vl_config_fields_fit_together(base):
    config = base("qwen3_vl")[1].config
    text, vision = config.text_config, config.vision_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2  # M-RoPE sections: t, h, w rotary pairs
    assert len(vision.deepstack_visual_indexes) == 3 <= text.num_hidden_layers  # one decoder layer per DeepStack level
    assert vision.out_hidden_size == text.hidden_size  # the mergers project into the decoder's width


def lora_targets(folder, pattern):
    """Names of the modules LoRA wraps when `pattern` is the target."""
    return lora_module_names(get_peft_model(AutoModelForImageTextToText.from_pretrained(folder), LoraConfig(r=2, target_modules=pattern)))


def lora_module_names(peft_model):
    return [name for name, module in peft_model.named_modules() if isinstance(module, LoraLayer)]


@each_family
def test_generate_and_decode(base, family):
    _, model, processor = base(family)
    inputs = prompt_inputs(processor, family)
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert new_tokens.shape[1] > 0
    (text,) = processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert isinstance(text, str)


@each_family
def test_adapter_round_trip_gives_identical_generations(base, family, tmp_path):
    folder, _, processor = base(family)
    vlm = VLM_FAMILIES[family]
    config = LoraConfig(
        r=4, target_modules=vlm.language_model_pattern, modules_to_save=list(vlm.projector_modules), init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(0)
    adapted = get_peft_model(AutoModelForImageTextToText.from_pretrained(folder), config).eval()
    projector = [p for name, p in adapted.named_parameters() if ".modules_to_save." in name]
    assert projector and all(p.requires_grad for p in projector)
    inputs = prompt_inputs(processor, family)
    expected = adapted.generate(**inputs, max_new_tokens=5, do_sample=False)
    adapted.save_pretrained(tmp_path / "adapter")

    reloaded = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(folder), tmp_path / "adapter").eval()
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=5, do_sample=False), expected)


def test_tiny_weights_are_fixed_by_seed():
    first, second, other = (build_tiny_vlm("idefics3", seed)[0].state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_load_vlm_resolves_builtins():
    model, processor, vlm = load_vlm("builtin:tiny-llava")
    assert vlm is VLM_FAMILIES["llava"] and processor.tokenizer.eos_token_id == model.generation_config.eos_token_id


def test_load_in_4bit_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"--load_in_4bit \(QLoRA\) needs a CUDA GPU"):
        load_vlm("builtin:tiny-llava", load_in_4bit=True)


def test_family_of_unknown_type_names_supported_ones():
    with pytest.raises(ValueError, match="llama.*supported: gemma3, idefics3, llava, paligemma, qwen2_5_vl, qwen2_vl, qwen3_vl, smolvlm"):
        family_of(LlamaConfig())


def test_unknown_builtin_and_family_are_refused():
    with pytest.raises(ValueError, match="builtin:tiny-llava"):
        resolve_vlm("builtin:tiny-gpt")
    with pytest.raises(ValueError, match="llava, qwen2_vl, paligemma, idefics3"):
        build_tiny_vlm("blip2")


def tiny_qwen2_5_vl():
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=8, fullatt_block_indexes=[1])
    return AutoConfig.for_model("qwen2_5_vl", text_config=text, vision_config=vision)


def tiny_smolvlm():
    text = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return AutoConfig.for_model("smolvlm", text_config=text, vision_config=vision)


@pytest.mark.parametrize(("build_config", "family"), [(tiny_qwen2_5_vl, "qwen2_vl"), (tiny_smolvlm, "smolvlm")])
def test_sibling_model_types_share_a_family_and_its_patterns(build_config, family):
    model = AutoModelForImageTextToText.from_config(build_config())
    vlm = family_of(model)
    assert vlm.name == family
    text_targets = lora_module_names(get_peft_model(model, LoraConfig(r=2, target_modules=vlm.language_model_pattern)))
    assert len(text_targets) == 7 * 2 and all(f".{LANGUAGE_MODEL[family]}." in name for name in text_targets)
    assert not any(VISION_TOWER[family] in name for name in text_targets)
    model = AutoModelForImageTextToText.from_config(build_config())
    vision_targets = lora_module_names(get_peft_model(model, LoraConfig(r=2, target_modules=vlm.vision_tower_pattern)))
    assert vision_targets and all(f".{VISION_TOWER[family]}." in name for name in vision_targets)
    assert any(name.endswith(vlm.projector_modules) for name, _ in model.named_modules())
