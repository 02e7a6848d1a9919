"""Vision-language bases for report generation: LLaVA, Qwen2-VL, PaliGemma, Idefics3, Gemma 3, Qwen3-VL, SmolVLM2; tiny ones built offline."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaConfig,
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaProcessor,
    PaliGemmaConfig,
    PaliGemmaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig

from ..paths import build_once, medfm_home
from .shipped import load_shipped_weights, shipped_fingerprint, unpinned_name
from .tokenizers import CLIP_BPE_FILE, bytes_to_unicode

TINY_VLM_VERSION = "2"
SHIPPED_TINY_VLM = "tiny-llava"  # the built-in VLM with pretrained weights; the other families are random, for tests
_TINY_VOCAB_MERGES = 4000
_TINY_IMAGE_SIZE, _TINY_PATCH_SIZE = 64, 8  # 64 px: big enough to show the phantoms' findings
_TINY_PATCHES = (_TINY_IMAGE_SIZE // _TINY_PATCH_SIZE) ** 2

BUILTIN_TINY_VLMS = {
    "builtin:tiny-llava": "llava",
    "builtin:tiny-qwen2-vl": "qwen2_vl",
    "builtin:tiny-paligemma": "paligemma",
    "builtin:tiny-idefics3": "idefics3",
    "builtin:tiny-gemma3": "gemma3",
    "builtin:tiny-qwen3-vl": "qwen3_vl",
    "builtin:tiny-smolvlm2": "smolvlm",
}


@dataclass(frozen=True)
class VLMFamily:
    """What training needs to know about one architecture: where LoRA goes and how prompts look."""

    name: str
    model_types: tuple[str, ...]
    language_model_pattern: str
    vision_tower_pattern: str
    projector_modules: tuple[str, ...]
    supports_multiple_images: bool
    has_chat_template: bool
    report_token_type_id: int = 0  # `token_type_ids` of report tokens: PaliGemma 1 (causal suffix); Gemma 3 0 (text; 1 = image, bidirectional)


def _decoder_layers(language_model: str) -> str:
    """Regex for the attention and MLP projections of a Llama/Qwen/Gemma-style decoder."""
    return rf".*\.{language_model}\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def _vit_layers(vision_tower: str) -> str:
    """Regex for the attention and MLP linears of a CLIP/SigLIP-style vision encoder."""
    return rf".*\.{vision_tower}\..*encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"


# The ViT-to-decoder projectors of Qwen3-VL's DeepStack: three in every released Qwen3-VL (peft wants the list's items by name).
_QWEN3_VL_DEEPSTACK_MERGERS = tuple(f"deepstack_merger_list.{i}" for i in range(3))

VLM_FAMILIES = {
    family.name: family
    for family in (
        VLMFamily("llava", ("llava",), _decoder_layers("language_model"), _vit_layers("vision_tower"),
                  ("multi_modal_projector",), supports_multiple_images=True, has_chat_template=True),
        VLMFamily("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), _decoder_layers("language_model"),
                  r".*\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2|gate_proj|up_proj|down_proj))",
                  ("merger",), supports_multiple_images=True, has_chat_template=True),
        VLMFamily("paligemma", ("paligemma",), _decoder_layers("language_model"), _vit_layers("vision_tower"),
                  ("multi_modal_projector",), supports_multiple_images=False, has_chat_template=False, report_token_type_id=1),
        VLMFamily("idefics3", ("idefics3",), _decoder_layers("text_model"), _vit_layers("vision_model"),
                  ("connector",), supports_multiple_images=True, has_chat_template=True),
        VLMFamily("gemma3", ("gemma3",), _decoder_layers("language_model"), _vit_layers("vision_tower"),
                  ("multi_modal_projector",), supports_multiple_images=True, has_chat_template=True),
        VLMFamily("qwen3_vl", ("qwen3_vl",), _decoder_layers("language_model"),
                  r".*\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))",
                  ("merger", *_QWEN3_VL_DEEPSTACK_MERGERS), supports_multiple_images=True, has_chat_template=True),
        VLMFamily("smolvlm", ("smolvlm",), _decoder_layers("text_model"), _vit_layers("vision_model"),
                  ("connector",), supports_multiple_images=True, has_chat_template=True),
    )
}


def family_of(config_or_model: PreTrainedConfig | PreTrainedModel) -> VLMFamily:
    """The family of a model or its config, by `model_type`."""
    model_type = getattr(config_or_model, "config", config_or_model).model_type
    for family in VLM_FAMILIES.values():
        if model_type in family.model_types:
            return family
    supported = sorted(t for family in VLM_FAMILIES.values() for t in family.model_types)
    raise ValueError(f"Unsupported vision-language model type {model_type!r}; supported: {', '.join(supported)}")


def _byte_level_bpe() -> Tokenizer:
    """Byte-level BPE from CLIP's first merges: every text round-trips; a space joins the word after it."""
    with gzip.open(resources.files("open_clip") / CLIP_BPE_FILE, "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : _TINY_VOCAB_MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    pieces = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    space = bytes_to_unicode()[ord(" ")]
    tokens = pieces + [space + piece for piece in pieces]
    bpe = models.BPE(
        vocab={token: i for i, token in enumerate(tokens)},
        merges=merges + [(space, piece) for piece in pieces],
        end_of_word_suffix="</w>",
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("</w>", ""), decoders.ByteLevel()])
    return tokenizer


def _tiny_tokenizer(special_tokens: list[str] | dict[str, str], **named_tokens) -> PreTrainedTokenizerFast:
    """The tiny BPE with a family's special tokens (a dict also names them: `tokenizer.boi_token`); `named_tokens` are
    bos/eos/pad/unk_token and add_bos_token."""
    return PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(), extra_special_tokens=special_tokens, **named_tokens)


def _ids(tokenizer: PreTrainedTokenizerFast, **tokens: str) -> dict[str, int]:
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in tokens.items()}


def _special_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}


def _decoder_config(config_class, tokenizer: PreTrainedTokenizerFast, **kwargs):
    """A decoder (2 layers, 64 wide unless `kwargs` say otherwise) whose vocab covers the tokenizer with its added tokens."""
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return config_class(vocab_size=len(tokenizer), max_position_embeddings=1024, **_special_ids(tokenizer), **{**sizes, **kwargs})


def _vit_config(config_class, **kwargs):
    """A ViT (2 layers, 32 wide unless `kwargs` say otherwise) on 64 px images in 8 px patches."""
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return config_class(image_size=_TINY_IMAGE_SIZE, patch_size=_TINY_PATCH_SIZE, **{**sizes, **kwargs})


_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_GEMMA3_CHAT_TEMPLATE = (  # Gemma's turns; the assistant is "model"; an image is `<start_of_image>`, which the processor expands
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<start_of_image>{% elif content['type'] == 'text' %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_QWEN3_VL_CHAT_TEMPLATE = (  # ChatML as Qwen2-VL, but no default system turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_SMOLVLM_CHAT_TEMPLATE = (  # Idefics3's "User:<image>...<end_of_utterance>" turns, opened by `<|im_start|>`, with videos
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] in ('image', 'video') %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
_IMAGE_GRID_TOKENS = [f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)]  # Idefics3/SmolVLM crop positions
_QWEN_VL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_QWEN_VL_PIXELS = {  # about 64x64 px (4,096 pixels) in 8 px patches, merged 2x2: about 16 image tokens
    "size": {"shortest_edge": _TINY_IMAGE_SIZE**2, "longest_edge": _TINY_IMAGE_SIZE**2},
    "patch_size": _TINY_PATCH_SIZE, "temporal_patch_size": 2, "merge_size": 2,
}


def _tiny_llava() -> tuple[LlavaConfig, LlavaProcessor]:
    """llava-1.5 shape: CLIP ViT (CLS dropped) -> 2-layer MLP projector -> Llama; one `<image>` becomes 64 tokens."""
    tokenizer = _tiny_tokenizer(
        ["<image>"], bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True
    )
    image_processor = CLIPImageProcessor(size={"shortest_edge": _TINY_IMAGE_SIZE}, crop_size=_TINY_IMAGE_SIZE)
    processor = LlavaProcessor(
        image_processor, tokenizer, patch_size=_TINY_PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    # Larger than the other tiny families: this one is pretrained on phantoms and shipped (medfm/bases/tiny-llava.safetensors).
    config = LlavaConfig(
        vision_config=_vit_config(CLIPVisionConfig, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        text_config=_decoder_config(LlamaConfig, tokenizer, hidden_size=128, intermediate_size=384, num_hidden_layers=4),
        image_token_index=processor.image_token_id, image_seq_length=_TINY_PATCHES,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    return config, processor


def _tiny_qwen2_vl() -> tuple[Qwen2VLConfig, Qwen2VLProcessor]:
    """Qwen2-VL shape: 32x32 px -> 4x4 patches -> 2x2 merge -> 4 `<|image_pad|>` tokens with M-RoPE positions."""
    tokenizer = _tiny_tokenizer(_QWEN_VL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    processor = Qwen2VLProcessor(
        Qwen2VLImageProcessor(**_QWEN_VL_PIXELS), tokenizer, Qwen2VLVideoProcessor(**_QWEN_VL_PIXELS), chat_template=_QWEN2_VL_CHAT_TEMPLATE,
    )
    text_config = _decoder_config(
        Qwen2VLTextConfig, tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    )
    vision_config = Qwen2VLVisionConfig(
        depth=2, embed_dim=32, hidden_size=text_config.hidden_size, num_heads=2, mlp_ratio=2,
        patch_size=_TINY_PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2,
    )
    config = Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config,
        **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    )
    return config, processor


def _tiny_paligemma() -> tuple[PaliGemmaConfig, PaliGemmaProcessor]:
    """PaliGemma shape: SigLIP ViT -> linear -> Gemma; the prefix `<image>`*16 `<bos>` prompt `\\n` attends both ways."""
    tokenizer = _tiny_tokenizer(["<image>"], bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    image_processor = SiglipImageProcessor(size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE})
    image_processor.image_seq_length = _TINY_PATCHES
    processor = PaliGemmaProcessor(image_processor, tokenizer)  # adds 1152 <locXXXX>/<segXXX> tokens
    text_config = _decoder_config(GemmaConfig, processor.tokenizer, head_dim=16)
    config = PaliGemmaConfig(
        vision_config=_vit_config(SiglipVisionConfig, vision_use_head=False), text_config=text_config,
        image_token_index=processor.image_token_id, projection_dim=text_config.hidden_size,
        hidden_size=text_config.hidden_size, vocab_size=text_config.vocab_size,
    )
    return config, processor


def _tiny_idefics3() -> tuple[Idefics3Config, Idefics3Processor]:
    """Idefics3 shape: SigLIP-like ViT -> pixel shuffle (x2) -> linear -> Llama; one `<image>` is 4 tokens, unsplit."""
    tokenizer = _tiny_tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *_IMAGE_GRID_TOKENS],
        bos_token="<|begin_of_text|>", eos_token="<end_of_utterance>", pad_token="<|end_of_text|>",
    )
    size = {"longest_edge": _TINY_IMAGE_SIZE}
    image_processor = Idefics3ImageProcessor(size=size, max_image_size=size, do_image_splitting=False)
    scale_factor = 2
    processor = Idefics3Processor(
        image_processor, tokenizer, image_seq_len=_TINY_PATCHES // scale_factor**2,
        chat_template=_IDEFICS3_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=_vit_config(Idefics3VisionConfig), text_config=_decoder_config(LlamaConfig, tokenizer),
        image_token_id=processor.image_token_id, scale_factor=scale_factor, pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


def _tiny_gemma3() -> tuple[Gemma3Config, Gemma3Processor]:
    """Gemma 3 (MedGemma 4B) shape: SigLIP ViT -> 2x2 average pool -> RMSNorm + linear -> Gemma 3 with a sliding-window and a
    global layer; `<start_of_image>` becomes `<start_of_image>` + 16 `<image_soft_token>` + `<end_of_image>`, which attend both ways."""
    tokenizer = _tiny_tokenizer(
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", add_bos_token=True,
    )
    tokenizer.add_tokens(["<start_of_turn>", "<end_of_turn>"], special_tokens=True)
    mm_tokens_per_image = _TINY_PATCHES // 4
    processor = Gemma3Processor(
        Gemma3ImageProcessor(size={"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}), tokenizer,
        image_seq_length=mm_tokens_per_image, chat_template=_GEMMA3_CHAT_TEMPLATE,
    )
    text_config = _decoder_config(
        Gemma3TextConfig, tokenizer, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"],
    )
    config = Gemma3Config(
        text_config=text_config, vision_config=_vit_config(SiglipVisionConfig, vision_use_head=False), mm_tokens_per_image=mm_tokens_per_image,
        **_ids(tokenizer, image_token_index="<image_soft_token>", boi_token_index="<start_of_image>", eoi_token_index="<end_of_image>"),
    )
    return config, processor


def _tiny_qwen3_vl() -> tuple[Qwen3VLConfig, Qwen3VLProcessor]:
    """Qwen3-VL shape: ViT with learned 8x8 position grid -> 2x2 merge -> Qwen3 (q/k norms, interleaved M-RoPE); DeepStack adds
    the merged features of three ViT blocks to the image tokens of the first three decoder layers."""
    tokenizer = _tiny_tokenizer(_QWEN_VL_TOKENS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    processor = Qwen3VLProcessor(
        Qwen2VLImageProcessor(**_QWEN_VL_PIXELS), tokenizer, Qwen3VLVideoProcessor(**_QWEN_VL_PIXELS), chat_template=_QWEN3_VL_CHAT_TEMPLATE,
    )
    text_config = _decoder_config(  # mrope_section sums to head_dim / 2
        Qwen3VLTextConfig, tokenizer, head_dim=16, num_hidden_layers=3,
        rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
    )
    vision_config = Qwen3VLVisionConfig(
        depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text_config.hidden_size, patch_size=_TINY_PATCH_SIZE,
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=_TINY_PATCHES, deepstack_visual_indexes=[0, 1, 2],
    )
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config,
        **_ids(tokenizer, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
               vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>"),
    )
    return config, processor


def _tiny_smolvlm() -> tuple[SmolVLMConfig, SmolVLMProcessor]:
    """SmolVLM2 shape: Idefics3's, but images are split: the longest edge goes to 128 px, cut into 64 px crops (up to 2x2, each
    `<row_r_col_c>` + 16 `<image>`) plus a `<global-img>` view; videos are frames with timestamps."""
    tokenizer = _tiny_tokenizer(
        ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", "<video>", *_IMAGE_GRID_TOKENS],
        bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
    )
    crop = {"longest_edge": _TINY_IMAGE_SIZE}
    image_processor = SmolVLMImageProcessor(size={"longest_edge": 2 * _TINY_IMAGE_SIZE}, max_image_size=crop, do_image_splitting=True)
    scale_factor = 2
    processor = SmolVLMProcessor(
        image_processor, tokenizer, SmolVLMVideoProcessor(size=crop, max_image_size=crop),
        image_seq_len=_TINY_PATCHES // scale_factor**2, chat_template=_SMOLVLM_CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        vision_config=_vit_config(SmolVLMVisionConfig), text_config=_decoder_config(LlamaConfig, tokenizer),
        image_token_id=processor.image_token_id, scale_factor=scale_factor, pad_token_id=tokenizer.pad_token_id,
    )
    return config, processor


_TINY_BUILDERS: dict[str, Callable[[], tuple[PreTrainedConfig, ProcessorMixin]]] = {
    "llava": _tiny_llava, "qwen2_vl": _tiny_qwen2_vl, "paligemma": _tiny_paligemma, "idefics3": _tiny_idefics3,
    "gemma3": _tiny_gemma3, "qwen3_vl": _tiny_qwen3_vl, "smolvlm": _tiny_smolvlm,
}


def build_tiny_vlm(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A VLM of the family's architecture with well under 5M parameters, from configs (random weights, fixed by seed)."""
    if family not in _TINY_BUILDERS:
        raise ValueError(f"Unknown VLM family {family!r}; choose one of {', '.join(_TINY_BUILDERS)}")
    config, processor = _TINY_BUILDERS[family]()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config.update(**_special_ids(processor.tokenizer))
    return model, processor


def materialize_builtin_vlm(name: str) -> Path:
    """Write the built-in VLM once as a normal model + processor folder under medfm_home() and return its path."""
    if name not in BUILTIN_TINY_VLMS:
        raise ValueError(f"Unknown built-in VLM {name!r}; the built-ins are {', '.join(BUILTIN_TINY_VLMS)}")

    short_name = name.removeprefix("builtin:")
    pretrained = short_name == SHIPPED_TINY_VLM

    def build(folder: Path) -> None:
        model, processor = build_tiny_vlm(BUILTIN_TINY_VLMS[name])
        if pretrained:
            load_shipped_weights({"model": model}, SHIPPED_TINY_VLM, TINY_VLM_VERSION)
        model.save_pretrained(folder)
        processor.save_pretrained(folder)

    suffix = f"-{shipped_fingerprint(SHIPPED_TINY_VLM)}" if pretrained else ""
    target = medfm_home() / "bases" / f"{short_name}-v{TINY_VLM_VERSION}{suffix}"
    return build_once(target, "config.json", build)


def resolve_vlm(name_or_path: str) -> str:
    """The Hub id or folder to load: built-in names (optionally pinned to their weights, `builtin:tiny-llava@<sha>`) become their local folder."""
    if name_or_path.startswith("builtin:"):
        shipped = SHIPPED_TINY_VLM if name_or_path.partition("@")[0] == f"builtin:{SHIPPED_TINY_VLM}" else None
        return str(materialize_builtin_vlm(unpinned_name(name_or_path, shipped)))
    return name_or_path


def load_vlm(
    name_or_path: str, revision: str | None = None, torch_dtype: torch.dtype | str | None = None, load_in_4bit: bool = False
) -> tuple[PreTrainedModel, ProcessorMixin, VLMFamily]:
    """Model, processor and family of a supported VLM; `load_in_4bit` quantises it to NF4 for QLoRA (CUDA only)."""
    if load_in_4bit and not torch.cuda.is_available():
        raise RuntimeError("--load_in_4bit (QLoRA) needs a CUDA GPU; drop the flag to train in bf16/fp32")
    path = resolve_vlm(name_or_path)
    family = family_of(AutoConfig.from_pretrained(path, revision=revision))
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if load_in_4bit else None
    )
    model = AutoModelForImageTextToText.from_pretrained(path, revision=revision, dtype=torch_dtype, quantization_config=quantization)
    processor = AutoProcessor.from_pretrained(path, revision=revision)
    return model, processor, family


def build_prompt(processor: ProcessorMixin, family: VLMFamily, instruction: str, num_images: int = 1) -> str:
    """The processor text for `num_images` images and an instruction, ending where the answer starts.

    PaliGemma has no chat template: its prefix is `<image>`s + instruction, and the processor adds `<bos>` after
    the images and the closing `\\n`.
    """
    if num_images > 1 and not family.supports_multiple_images:
        raise ValueError(f"{family.name} takes one image per prompt, got {num_images}")
    if not family.has_chat_template:
        return processor.image_token * num_images + instruction
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": instruction}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )


def answer_prefix(processor: ProcessorMixin, family: VLMFamily) -> str:
    """Text between the prompt and the answer in a full conversation (" " after LLaVA's "ASSISTANT:", else "")."""
    if not family.has_chat_template:
        return ""
    marker = "\x00answer\x00"
    user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}
    prompt = processor.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
    conversation = processor.apply_chat_template([user, {"role": "assistant", "content": [{"type": "text", "text": marker}]}], tokenize=False)
    if not conversation.startswith(prompt) or marker not in conversation:
        raise ValueError(f"{family.name}: the chat template does not continue the generation prompt with the answer")
    return conversation[len(prompt) : conversation.index(marker)]
