"""Write a tiny Qwen chat model to a directory, for tests and offline examples.

The model has random weights but a real Qwen architecture (Qwen2 by default; Qwen3,
Qwen3-MoE, the hybrid Qwen3.5 and Qwen3-Next with ``family=``), and its tokenizer
is a byte-level BPE with Qwen's ChatML special tokens and the family's chat
template style (Qwen2.5's; Qwen3's with ``enable_thinking``; Qwen3.5's, whose
generation prompt opens the think block), so it loads through ``%qwen_load PATH``
exactly like ``Qwen/Qwen2.5-7B-Instruct`` or ``Qwen/Qwen3-8B`` does. Any Unicode
text (Chinese included) round-trips, usually as several tokens per character,
which is what the streaming tests need.

    python -m qwen_magic.tiny /tmp/tiny-qwen [--endless] [--family qwen3_5_text]

The vision-language families (``qwen2_5_vl``, ``qwen3_vl``) add a tiny vision encoder
of the real patch and merge sizes, and save a processor (Qwen2-VL's image processor,
the tokenizer with the vision tokens, a chat template that renders image parts).
"""

import argparse
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens in Qwen3's tokenizer, but not "special": decoding keeps them

_HYBRID = dict(  # Gated DeltaNet layers: three linear-attention layers for each full-attention one
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    num_hidden_layers=4, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
    linear_num_key_heads=2, linear_num_value_heads=4, head_dim=8,
)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config class, model class, template style, fields beyond the common ones)
FAMILIES = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "chatml", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "qwen3", dict(head_dim=8)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "qwen3", dict(head_dim=8, **_MOE)),
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", "qwen3.5", _HYBRID),
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", "qwen3.5", dict(_HYBRID, shared_expert_intermediate_size=32, **_MOE)),
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", "qwen3", dict(_HYBRID, shared_expert_intermediate_size=32, **_MOE)),
}


# vision-language family -> (config class, model class, vision config fields, default system prompt)
VL_FAMILIES = {
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration",
                   dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                        temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
                   "You are a helpful assistant."),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration",
                 dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                      temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0]),
                 None),
    "qwen3_5": ("Qwen3_5Config", "Qwen3_5ForConditionalGeneration",  # the multimodal Qwen3.5 checkpoints (hybrid text model)
                dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16, spatial_merge_size=2,
                     temporal_patch_size=2, num_position_embeddings=64),
                None),
}


def available_families() -> list:
    """The families the installed transformers has (Qwen3.5 needs transformers 5)."""
    import transformers

    return [name for name, (config, model, _, _) in FAMILIES.items() if hasattr(transformers, config) and hasattr(transformers, model)]


def available_vl_families() -> list:
    import transformers

    return [name for name, (config, model, _, _) in VL_FAMILIES.items() if hasattr(transformers, config) and hasattr(transformers, model)]

# Enough text to learn merges for the test prompts (English, Chinese, code).
_CORPUS = [
    "Hello! How are you today? I am a helpful assistant.",
    "介绍广州这座城市。广州是广东省的省会,美食很有名。",
    "它有什么好吃的美食吗?早茶、虾饺、烧卖、肠粉和白切鸡。",
    "请将以下文本分类为 [体育, 科技, 政治, 娱乐] 中的一个类别。",
    "文本:苹果公司发布了新一代iPhone,搭载了更强大的A系列芯片。请只输出类别名称。",
    "def add(a, b):\n    return a + b\n\nprint({'key': [1, 2, 3]})",
    "The quick brown fox jumps over the lazy dog. 0123456789",
    "Traceback (most recent call last): ValueError: invalid literal",
]


def chat_template(style: str = "chatml") -> str:
    """Qwen2.5-Instruct's own chat template (ChatML, with its default system prompt), or
    Qwen3's (``enable_thinking``, earlier reasoning dropped), or Qwen3.5's (Qwen3's whose
    generation prompt opens the think block, so the reply starts inside the thinking)."""
    if style == "chatml":
        return resources.files("qwen_magic").joinpath("chatml_template.jinja").read_text(encoding="utf-8")
    template = resources.files("qwen_magic").joinpath("qwen3_template.jinja").read_text(encoding="utf-8")
    return ("{%- set opens_think = true %}\n" + template) if style == "qwen3.5" else template


def vl_chat_template(default_system=None) -> str:
    """The Qwen2.5-VL / Qwen3-VL chat template: image parts become ``<|vision_start|><|image_pad|><|vision_end|>``."""
    template = resources.files("qwen_magic").joinpath("vl_template.jinja").read_text(encoding="utf-8")
    return (f"{{%- set default_system = {default_system!r} %}}\n" + template) if default_system else template


def build_tokenizer(vocab_size: int = 400, style: str = "chatml"):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if style == "chatml" else SPECIAL_TOKENS + THINK_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    # A vision processor insists on Qwen2's tokenizer class (transformers 4.x checks); it wraps the same BPE.
    wrapper = PreTrainedTokenizerFast
    if style == "vl":
        from transformers import Qwen2TokenizerFast as wrapper
    tokenizer = wrapper(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_input_names=["input_ids", "attention_mask"],  # as Qwen2's tokenizer: no token_type_ids
    )
    if style != "chatml":
        # As Qwen3's tokenizer: <think> and </think> are single tokens that decoding keeps.
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(token, special=False, normalized=False) for token in THINK_TOKENS])
    tokenizer.chat_template = chat_template(style) if style != "vl" else None
    if style == "vl":
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"] + VISION_TOKENS})
    return tokenizer


def write_tiny_vl_model(path, *, family: str = "qwen2_5_vl", seed: int = 0, context_length: int = 4096, **shape) -> Path:
    """Save a tiny random vision-language model of ``family`` (see VL_FAMILIES) with its processor under ``path``.

    ``shape`` overrides text config fields (``hidden_size=256`` for bitsandbytes' kernels).
    """
    import torch
    import transformers
    from transformers import GenerationConfig, Qwen2VLImageProcessor

    config_name, model_name, vision_fields, default_system = VL_FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(style="vl")
    template = vl_chat_template(default_system)
    tokenizer.chat_template = template
    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=context_length, eos_token_id=end_ids[0], pad_token_id=end_ids[1],
                bos_token_id=None, tie_word_embeddings=False)
    if family == "qwen2_5_vl":
        text["rope_scaling"] = {"type": "mrope", "mrope_section": [1, 1, 2]}  # head_dim 8: sections add up to 4
    elif family == "qwen3_vl":
        text.update(head_dim=8, rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    else:
        text.update(_HYBRID, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                              "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    text.update(shape)
    vision = dict(vision_fields, out_hidden_size=text["hidden_size"])
    config = getattr(transformers, config_name)(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=True,
                                               temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    model.save_pretrained(path)
    patch, merge = vision_fields["patch_size"], vision_fields["spatial_merge_size"]
    image_processor = Qwen2VLImageProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                            min_pixels=4 * (patch * merge) ** 2, max_pixels=16384 * (patch * merge) ** 2)
    processor_class = getattr(transformers, "Qwen2_5_VLProcessor" if family == "qwen2_5_vl" else "Qwen3VLProcessor")
    if family != "qwen2_5_vl":
        from transformers import Qwen3VLVideoProcessor

        video = Qwen3VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    else:
        from transformers import Qwen2VLVideoProcessor

        video = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=video, chat_template=template)
    processor.save_pretrained(path)
    return path


def write_tiny_model(path, *, family: str = "qwen2", seed: int = 0, endless: bool = False, context_length: int = 4096, **shape) -> Path:
    """Save a tiny random model of ``family`` (see FAMILIES) and its tokenizer under ``path``.

    ``endless=True`` zeroes the output rows of the end-of-turn tokens, so greedy
    decoding never picks them and a reply always runs to ``max_new_tokens``
    (for interrupt and length tests). ``shape`` overrides config fields, e.g.
    ``hidden_size=128`` so that 4-bit layers take bitsandbytes' batch-1 kernels.
    """
    import torch
    import transformers
    from transformers import GenerationConfig

    config_name, model_name, style, family_fields = FAMILIES[family]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(style=style)
    end_ids = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    fields = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        tie_word_embeddings=False,
        eos_token_id=end_ids[0],
        pad_token_id=end_ids[1],
        bos_token_id=None,
    )
    if "moe_intermediate_size" in family_fields:
        fields.pop("intermediate_size")
        if family == "qwen3_next":
            fields["intermediate_size"] = 64
    config = getattr(transformers, config_name)(**{**fields, **family_fields, **shape})
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():
        # Larger weights than the default init, so greedy picks differ from token to token.
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
        if endless:
            model.lm_head.weight[end_ids] = 0.0
    # The real checkpoints' own generation defaults, which the classic recipe inherits:
    # Qwen2.5-7B-Instruct's, or Qwen3's (its thinking-mode sampling, no repetition penalty).
    sampling = dict(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05) if style == "chatml" else dict(temperature=0.6, top_p=0.95, top_k=20)
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=True, **sampling)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the model to")
    parser.add_argument("--endless", action="store_true", help="never end a reply before max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES) + sorted(VL_FAMILIES), default="qwen2", help="architecture and chat template style")
    args = parser.parse_args(argv)
    if args.family in VL_FAMILIES:
        print(write_tiny_vl_model(args.path, family=args.family, seed=args.seed))
    else:
        print(write_tiny_model(args.path, family=args.family, seed=args.seed, endless=args.endless))


if __name__ == "__main__":
    main()
