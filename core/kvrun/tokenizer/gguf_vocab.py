"""A ``tokenizers.Tokenizer`` rebuilt from the vocabulary a GGUF file stores as metadata.

A GGUF carries no tokenizer.json: it lists the tokens, their types, the BPE merges
and the name of the pre-tokenizer llama.cpp should use (``tokenizer.ggml.pre``).
For byte-level BPE (``tokenizer.ggml.model`` = "gpt2") we build the tokenizer the
way transformers does for the same file, because transformers is our oracle:
control tokens become special added tokens, user-defined ones plain added tokens,
and the text is split with the regex the vocabulary was trained with where we know
it, else with GPT-2's.

SmolLM2's "smollm" pre-tokenizer also isolates digits; its vocabulary has no
multi-digit tokens, so GPT-2's regex yields the same ids (the tests check digits).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

__all__ = ["SPLIT_REGEXES", "byte_level_from_gguf", "byte_to_unicode"]

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL = 3
_USER_DEFINED = 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> split regex; any other value splits as GPT-2 does.
SPLIT_REGEXES: Mapping[str, str] = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte: printable Latin-1 bytes stand for
    themselves, the other 68 take code points from U+0100 upwards in byte order."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    }
    spelling: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + shifted)
            shifted += 1
    return spelling


def byte_level_from_gguf(metadata: Mapping[str, Any]) -> Tokenizer:
    """Byte-level BPE from ``tokenizer.ggml.*`` metadata, with no post-processor set."""
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    tokens: Sequence[str] = metadata["tokenizer.ggml.tokens"]
    # A token outside the byte alphabet is raw text (a llama.cpp quirk); respell it.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): index
        for index, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in metadata.get("tokenizer.ggml.merges", ())]
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    split = SPLIT_REGEXES.get(str(metadata.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    types: Sequence[int] = metadata.get("tokenizer.ggml.token_type") or ()
    # A control token spelled outside the byte alphabet is mislabelled text: skip it.
    control = [
        AddedToken(tok, normalized=False, special=True)
        for tok, kind in zip(tokens, types, strict=False)
        if kind == _CONTROL and set(tok) <= alphabet
    ]
    if control:
        backend.add_special_tokens(control)
    user = [
        AddedToken(tok, normalized=False, special=False)
        for tok, kind in zip(tokens, types, strict=False)
        if kind == _USER_DEFINED and tok in vocab
    ]
    if user:
        backend.add_tokens(user)
    return backend
