"""Tokenizers: encoding, decoding, chat templates and streaming detokenization.

tokenizer = load_tokenizer(checkpoint)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
ids = tokenizer.encode(prompt, add_special_tokens=False)
"""

from kvrun.tokenizer.chat_template import ChatTemplateError
from kvrun.tokenizer.core import SPECIAL_TOKEN_NAMES, Tokenizer
from kvrun.tokenizer.detokenizer import IncrementalDetokenizer
from kvrun.tokenizer.loading import load_tokenizer, load_tokenizer_from_dir

__all__ = [
    "SPECIAL_TOKEN_NAMES",
    "ChatTemplateError",
    "IncrementalDetokenizer",
    "Tokenizer",
    "load_tokenizer",
    "load_tokenizer_from_dir",
]
