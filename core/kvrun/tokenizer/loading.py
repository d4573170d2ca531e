"""Building a :class:`Tokenizer` from a checkpoint's files.

A Hugging Face directory with ``tokenizer.json`` loads straight into the
``tokenizers`` library, with tokenizer_config.json applied the way transformers 5
applies it (special tokens, chat templates; BOS/EOS come from tokenizer.json's
post-processor, as transformers 5 ignores ``add_bos_token`` when that file exists).
Directories with only legacy files (vocab.json + merges.txt, tokenizer.model) are
converted once with transformers, which knows every legacy format; encoding then
runs on the converted fast tokenizer like any other. A GGUF's byte-level BPE
vocabulary is rebuilt directly (see gguf_vocab); other GGUF vocabularies
(sentencepiece) are converted by transformers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokenizers
from tokenizers import AddedToken, processors

from kvrun.errors import ModelLoadError
from kvrun.tokenizer.core import SPECIAL_TOKEN_NAMES, Tokenizer
from kvrun.tokenizer.gguf_vocab import byte_level_from_gguf

if TYPE_CHECKING:
    from kvrun.loader.checkpoint import Checkpoint

__all__ = ["load_tokenizer", "load_tokenizer_from_dir"]

_CHAT_TEMPLATE_FILE = "chat_template.jinja"
_CHAT_TEMPLATE_DIR = "additional_chat_templates"
_GGUF_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}
# llama.cpp ends generation on any of these.
_GGUF_EOS_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    """The tokenizer of ``checkpoint``: from its GGUF metadata or its directory's files."""
    if checkpoint.format == "gguf":
        return _from_gguf(checkpoint)
    return load_tokenizer_from_dir(
        checkpoint.directory,
        source=checkpoint.source,
        hf_config=checkpoint.hf_config,
        generation_config=checkpoint.generation_config,
    )


def load_tokenizer_from_dir(
    directory: str | Path,
    *,
    source: str | None = None,
    hf_config: Mapping[str, Any] | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> Tokenizer:
    """The tokenizer in a Hugging Face directory; the configs add their eos ids."""
    directory = Path(directory)
    source = source if source is not None else str(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"tokenizer {source!r}: {directory} is not a directory")
    config = _json(directory / "tokenizer_config.json", source)
    fast = directory / "tokenizer.json"
    if fast.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(fast))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ModelLoadError(f"tokenizer {source!r}: cannot read {fast}: {exc}") from exc
    else:
        backend = _convert_legacy(directory, source)
    special = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
    _add_declared_tokens(backend, config, special)
    # transformers 5 lets tokenizer.json's post-processor decide BOS/EOS and ignores
    # tokenizer_config's add_bos_token/add_eos_token then; converted tokenizers already
    # carry the flags. Only a missing post-processor gets the plain template.
    if backend.post_processor is None:
        backend.post_processor = _bos_eos_processor(backend, special, add_bos=False, add_eos=False)
    eos_ids = set(_ids(backend, special["eos_token"]))
    for extra in (hf_config or {}, generation_config or {}):
        eos_ids.update(_as_ids(extra.get("eos_token_id")))
    return Tokenizer(
        backend,
        special_tokens=special,
        eos_token_ids=eos_ids,
        chat_templates=_dir_templates(directory, config),
        source=source,
    )


def _from_gguf(checkpoint: Checkpoint) -> Tokenizer:
    metadata = checkpoint.gguf_metadata
    path = checkpoint.weight_files[0]
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise ModelLoadError(
            f"model {checkpoint.source!r}: {path} holds no tokenizer (no tokenizer.ggml.model "
            "and tokenizer.ggml.tokens metadata)"
        )
    special = {
        name: tokens[metadata[key]] if metadata.get(key) is not None else None
        for name, key in _GGUF_SPECIAL_IDS.items()
    }
    if kind == "gpt2":
        backend = byte_level_from_gguf(metadata)
        backend.post_processor = _bos_eos_processor(
            backend,
            special,
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        )
    else:
        backend = _convert_legacy(path.parent, checkpoint.source, gguf_file=path.name)
    templates = {
        ("default" if key == "tokenizer.chat_template" else key.rsplit(".", 1)[1]): str(value)
        for key, value in metadata.items()
        if key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template.")
    }
    return Tokenizer(
        backend,
        special_tokens=special,
        eos_token_ids=[int(metadata[k]) for k in _GGUF_EOS_KEYS if metadata.get(k) is not None],
        chat_templates=templates,
        source=checkpoint.source,
    )


def _convert_legacy(
    directory: Path, source: str, gguf_file: str | None = None
) -> tokenizers.Tokenizer:
    """A fast tokenizer converted by transformers from files tokenizers cannot read."""
    try:
        from transformers import AutoTokenizer

        kwargs = {} if gguf_file is None else {"gguf_file": gguf_file}
        converted = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    except Exception as exc:  # transformers raises many types for one unreadable tokenizer
        what = gguf_file or "tokenizer.json, tokenizer_config.json, vocab.json/merges.txt"
        raise ModelLoadError(
            f"tokenizer {source!r}: no usable tokenizer in {directory} (looked for {what}): {exc}"
        ) from exc
    backend = getattr(converted, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(
            f"tokenizer {source!r}: transformers loaded {type(converted).__name__}, which has "
            "no fast (tokenizers) form; kvrun needs a tokenizer.json or a convertible vocabulary"
        )
    # a private copy: transformers keeps using its own
    return tokenizers.Tokenizer.from_str(backend.to_str())


def _json(path: Path, source: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"tokenizer {source!r}: cannot read {path}: {exc}") from exc
    return value if isinstance(value, dict) else {}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _add_declared_tokens(
    backend: tokenizers.Tokenizer, config: Mapping[str, Any], special: Mapping[str, str | None]
) -> None:
    """Add tokens tokenizer_config.json declares but tokenizer.json lacks, as transformers does."""
    declared = config.get("added_tokens_decoder")
    entries = list(declared.values()) if isinstance(declared, Mapping) else []
    missing = []
    for entry in entries:
        text = _token_text(entry)
        if text is not None and backend.token_to_id(text) is None:
            missing.append(
                AddedToken(text, special=bool(entry.get("special", True)), normalized=False)
            )
    for text in special.values():
        if text is not None and backend.token_to_id(text) is None:
            missing.append(AddedToken(text, special=True, normalized=False))
    for token in missing:
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _bos_eos_processor(
    backend: tokenizers.Tokenizer,
    special: Mapping[str, str | None],
    *,
    add_bos: bool,
    add_eos: bool,
) -> processors.TemplateProcessing:
    """BOS/EOS around each sequence as the flags ask (a flag whose token is unset is off)."""
    bos, eos = special["bos_token"], special["eos_token"]
    bos_id = None if bos is None else backend.token_to_id(bos)
    eos_id = None if eos is None else backend.token_to_id(eos)
    pieces: list[tuple[str, int]] = []
    single, pair = ["$A:0"], ["$A:0", "$B:1"]
    if add_bos and bos is not None and bos_id is not None:
        single.insert(0, f"{bos}:0")
        pair = [f"{bos}:0", "$A:0", f"{bos}:1", "$B:1"]
        pieces.append((bos, bos_id))
    if add_eos and eos is not None and eos_id is not None:
        single.append(f"{eos}:0")
        pair.insert(pair.index("$A:0") + 1, f"{eos}:0")
        pair.append(f"{eos}:1")
        pieces.append((eos, eos_id))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=pieces)


def _ids(backend: tokenizers.Tokenizer, text: str | None) -> list[int]:
    token_id = None if text is None else backend.token_to_id(text)
    return [] if token_id is None else [token_id]


def _as_ids(value: Any) -> Iterable[int]:
    """config eos_token_id: an int, a list of ints, or None."""
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _dir_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Template name -> source; template files take priority over tokenizer_config.json."""
    templates: dict[str, str] = {}
    single = directory / _CHAT_TEMPLATE_FILE
    if single.is_file():
        templates["default"] = single.read_text(encoding="utf-8")
    extra = directory / _CHAT_TEMPLATE_DIR
    if extra.is_dir():
        for path in sorted(extra.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {
            str(item["name"]): str(item["template"])
            for item in value
            if isinstance(item, Mapping) and "name" in item and "template" in item
        }
    return {}
