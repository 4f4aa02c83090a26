"""Write a tiny Qwen2 chat model to a directory, for tests and offline examples.

The model has random weights but the real Qwen2 architecture, and its tokenizer
is a byte-level BPE with Qwen2.5's ChatML special tokens and chat template, so it
loads through ``%qwen_load PATH`` exactly like ``Qwen/Qwen2.5-7B-Instruct`` does.
Any Unicode text (Chinese included) round-trips, usually as several tokens per
character, which is what the streaming tests need.

    python -m qwen_magic.tiny /tmp/tiny-qwen [--endless]
"""

import argparse
from importlib import resources
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

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


def chat_template() -> str:
    """Qwen2.5-Instruct's own chat template (ChatML, with its default system prompt)."""
    return resources.files("qwen_magic").joinpath("chatml_template.jinja").read_text(encoding="utf-8")


def build_tokenizer(vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_input_names=["input_ids", "attention_mask"],  # as Qwen2's tokenizer: no token_type_ids
    )
    tokenizer.chat_template = chat_template()
    return tokenizer


def write_tiny_model(path, *, seed: int = 0, endless: bool = False, context_length: int = 4096, **shape) -> Path:
    """Save a tiny random Qwen2ForCausalLM and its tokenizer under ``path``.

    ``endless=True`` zeroes the output rows of the end-of-turn tokens, so greedy
    decoding never picks them and a reply always runs to ``max_new_tokens``
    (for interrupt and length tests). ``shape`` overrides Qwen2Config fields, e.g.
    ``hidden_size=128`` so that 4-bit layers take bitsandbytes' batch-1 kernels.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
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
    config = Qwen2Config(**{**fields, **shape})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        # Larger weights than the default init, so greedy picks differ from token to token.
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5)
        if endless:
            model.lm_head.weight[end_ids] = 0.0
    # Qwen2.5-7B-Instruct's own generation defaults, which the classic recipe inherits.
    model.generation_config = GenerationConfig(
        eos_token_id=end_ids, pad_token_id=end_ids[1], do_sample=True,
        temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="directory to write the model to")
    parser.add_argument("--endless", action="store_true", help="never end a reply before max_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_tiny_model(args.path, seed=args.seed, endless=args.endless))


if __name__ == "__main__":
    main()
