"""The :class:`Tokenizer`: a ``tokenizers.Tokenizer`` plus what serving needs around it."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
import tokenizers

from kvrun.tokenizer.chat_template import (
    ChatTemplateError,
    compile_chat_template,
    render_chat_template,
)

__all__ = ["COMPILED_TEMPLATES", "SPECIAL_TOKEN_NAMES", "Tokenizer"]

# Compiled chat templates kept per tokenizer (the model's own and recent request ones).
COMPILED_TEMPLATES = 32

# The named special tokens chat templates see as variables (bos_token, ...), as in transformers.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and chat-format text for one model.

    Thread-safety: encode/decode may run concurrently (the Rust tokenizer is not
    mutated after construction).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        eos_token_ids: Iterable[int],
        chat_templates: Mapping[str, str],
        source: str,
    ) -> None:
        """``special_tokens``: name in SPECIAL_TOKEN_NAMES -> token text (None if unset);
        ``eos_token_ids``: every id that ends generation; ``chat_templates``: template
        name -> Jinja source ("default" is used when none is named)."""
        self._backend = backend
        self._special = {name: special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES}
        self._eos_ids = frozenset(int(i) for i in eos_token_ids)
        self._templates = dict(chat_templates)
        # Compiled templates, least recently used first: a bounded cache, because
        # templates may come from requests.
        self._compiled: dict[str, jinja2.Template] = {}
        self._compiled_lock = threading.Lock()
        self.source = source  # the checkpoint this tokenizer came from, for messages

    # ids -----------------------------------------------------------------------------
    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate it)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids this tokenizer can produce, added tokens included."""
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def _token_id(self, name: str) -> int | None:
        text = self._special[name]
        return None if text is None else self._backend.token_to_id(text)

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own end-of-sequence id (one of :attr:`eos_token_ids`)."""
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._token_id("pad_token")

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: the tokenizer's eos, config.json's and
        generation_config.json's eos_token_id (GGUF: eos, eot and eom ids)."""
        return self._eos_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens that are set, e.g. {"eos_token": "<|im_end|>"}."""
        return {k: v for k, v in self._special.items() if v is not None}

    @property
    def all_special_ids(self) -> frozenset[int]:
        """Ids of the added tokens marked special (what skip_special_tokens drops)."""
        decoder = self._backend.get_added_tokens_decoder()
        return frozenset(i for i, tok in decoder.items() if tok.special)

    # text ----------------------------------------------------------------------------
    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest vocabulary entry, in characters: no token stands for more text, so
        a text longer than N times this cannot fit in N tokens (up to normalisation)."""
        return max((len(t) for t in self._backend.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds BOS/EOS where the model does."""
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; incomplete UTF-8 at the end shows as U+FFFD."""
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str | None]:
        """Vocabulary entries (e.g. "Ġhello") of ``ids``; None for an id out of range."""
        return [self._backend.id_to_token(int(i)) for i in ids]

    def token_to_str(self, token_id: int) -> str:
        """Display text of one token (special tokens kept), for logprob listings."""
        return self.decode([token_id], skip_special_tokens=False)

    # chat ----------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        """The default chat template source, or None when the model has none."""
        return self._templates.get("default")

    @property
    def chat_template_names(self) -> tuple[str, ...]:
        return tuple(sorted(self._templates))

    def _select_template(self, chat_template: str | None, tools: object) -> str:
        if chat_template is not None:
            # a name of one of the model's templates, or a template source
            return self._templates.get(chat_template, chat_template)
        if tools is not None and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if self._templates:
            raise ChatTemplateError(
                f"model {self.source!r} has several chat templates and none is the default; "
                f"pass one of {', '.join(sorted(self._templates))} as chat_template"
            )
        raise ChatTemplateError(
            f"model {self.source!r} has no chat template; pass one with chat_template "
            "(e.g. --chat-template) or send plain completions"
        )

    def apply_chat_template(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: Sequence[Any] | None = None,
        *,
        documents: Sequence[Any] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render ``messages`` with the model's (or the given) chat template.

        ``chat_template`` is a template name or Jinja source; ``kwargs`` become template
        variables (e.g. enable_thinking) and override the special-token variables.
        Raises ChatTemplateError for a template that fails or refuses the conversation.
        """
        source = self._select_template(chat_template, tools)
        with self._compiled_lock:  # renders run on server threads at once
            template = self._compiled.pop(source, None)
        if template is None:
            template = compile_chat_template(source)
        with self._compiled_lock:
            self._compiled[source] = template  # the most recently used last
            while len(self._compiled) > COMPILED_TEMPLATES:
                del self._compiled[next(iter(self._compiled))]  # the least recently used
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            documents=documents,
            variables={**self.special_tokens, **kwargs},
        )
