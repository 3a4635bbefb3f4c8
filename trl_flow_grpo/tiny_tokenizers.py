"""Tokenizers built entirely in code (no download): tiny byte-level BPE (CLIP), Unigram (T5) and byte-level Qwen2.

Shared by the test fixtures (`trl_flow_grpo.testing`) and the toy shapes model (`trl_flow_grpo.toy.pretrain`),
neither of which should import the other.
"""

from __future__ import annotations

from transformers import CLIPTokenizer, Qwen2Tokenizer, T5Tokenizer

__all__ = [
    "CLIP_MAX_LENGTH",
    "QWEN2_SPECIAL_TOKENS",
    "TINY_WORDS",
    "make_tiny_clip_tokenizer",
    "make_tiny_qwen2_tokenizer",
    "make_tiny_t5_tokenizer",
]

CLIP_MAX_LENGTH = 77
"""SD3 pads CLIP prompts to `tokenizer.model_max_length`; the text encoders have 77 positions."""

# Words that get their own token (CLIP: a chain of BPE merges; T5: a whole-word Unigram piece). Anything else is
# spelled out character by character, so every prompt is representable.
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "in", "on", "with", "photo", "image", "picture", "painting", "drawing",
    "red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown",
    "circle", "square", "triangle", "cat", "dog", "bird", "car", "house", "tree", "apple", "person",
    "one", "two", "three", "four", "five", "small", "large", "big", "left", "right", "next", "to",
)  # fmt: skip


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character map used by byte-level BPE."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def make_tiny_clip_tokenizer(model_max_length: int = CLIP_MAX_LENGTH) -> CLIPTokenizer:
    """Build a small byte-level BPE [`~transformers.CLIPTokenizer`] entirely in code.

    The vocabulary is laid out like OpenAI CLIP's: the 256 byte symbols, the same symbols with the `</w>`
    end-of-word suffix, the merged symbols of [`TINY_WORDS`], then `<|startoftext|>` and `<|endoftext|>` (which is
    also the pad and unknown token). Every input can be encoded without unknown tokens.

    Args:
        model_max_length: Padding/truncation length. SD3 pads CLIP prompts to this length, so it must match the
            text encoders' `max_position_embeddings` (77 for the real model and for [`make_tiny_sd3_pipeline`]).

    Returns:
        The tokenizer, with `bos_token_id = len(vocab) - 2` and `eos_token_id = pad_token_id = len(vocab) - 1`.
    """
    byte_symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in byte_symbols + [s + "</w>" for s in byte_symbols]:
        vocab[symbol] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((left, right))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def make_tiny_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """Build a small Unigram [`~transformers.T5Tokenizer`] entirely in code.

    Ids 0, 1, 2 are `<pad>`, `</s>`, `<unk>` as in T5. Each word of [`TINY_WORDS`] is a single `▁word` piece; other
    text falls back to `▁` plus one piece per printable ASCII character. There are no `<extra_id_*>` sentinels.

    Args:
        model_max_length: Maximum sequence length recorded on the tokenizer (SD3 passes its own `max_length`).
    """
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + word, -3.0) for word in TINY_WORDS]
    vocab += [(chr(c), -4.0) for c in range(ord("!"), ord("~") + 1)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


QWEN2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


def make_tiny_qwen2_tokenizer() -> Qwen2Tokenizer:
    """A byte-level [`~transformers.Qwen2Tokenizer`] built in code: one token per byte (GPT-2's printable mapping, no
    merges), `<|endoftext|>` (padding) and Qwen2.5-VL's chat and vision special tokens (`QWEN2_SPECIAL_TOKENS`)."""
    symbols = _bytes_to_unicode()
    vocab = {symbols[byte]: index for index, byte in enumerate(range(256))}
    for token in ("<|endoftext|>", *QWEN2_SPECIAL_TOKENS):
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN2_SPECIAL_TOKENS)})
    return tokenizer
