"""Logprobs in the two shapes OpenAI uses: completions' parallel lists, chat's content list."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvrun.server.wire import LogprobEntry

if TYPE_CHECKING:
    from kvrun.tokenizer import Tokenizer

__all__ = ["chat_logprobs", "completion_logprobs"]


def _text(entry: LogprobEntry, tokenizer: Tokenizer) -> str:
    return entry.decoded if entry.decoded is not None else tokenizer.token_to_str(entry.token_id)


def _chosen(position: Sequence[LogprobEntry], token_id: int) -> LogprobEntry:
    for entry in position:
        if entry.token_id == token_id:
            return entry
    # The engine always lists the sampled token; this guards a contract break loudly.
    raise AssertionError(f"token {token_id} missing from its logprobs entry")


def _top(position: Sequence[LogprobEntry], num: int) -> list[LogprobEntry]:
    return sorted((e for e in position if e.rank <= num), key=lambda e: e.rank)[:num]


def completion_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[Sequence[LogprobEntry] | None],
    num: int,
    tokenizer: Tokenizer,
    text_offset: int,
) -> dict[str, Any]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` for ``token_ids``.

    ``positions[i]`` is token i's entry (None for a prompt's first token). As in
    vLLM, ``top_logprobs[i]`` holds the top ``num`` candidates and the chosen token.
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for token_id, position in zip(token_ids, positions, strict=True):
        offsets.append(text_offset)
        if position is None:
            text = tokenizer.token_to_str(token_id)
            tokens.append(text)
            token_logprobs.append(None)
            top_logprobs.append(None)
        else:
            chosen = _chosen(position, token_id)
            text = _text(chosen, tokenizer)
            tokens.append(text)
            token_logprobs.append(chosen.logprob)
            top = {_text(e, tokenizer): e.logprob for e in _top(position, num)}
            top.setdefault(text, chosen.logprob)
            top_logprobs.append(top)
        text_offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def _chat_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}


def chat_logprobs(
    token_ids: Sequence[int],
    positions: Sequence[Sequence[LogprobEntry]],
    num: int,
    tokenizer: Tokenizer,
) -> list[dict[str, Any]]:
    """Chat's ``logprobs.content``: one item per token with its ``top_logprobs``.

    -inf (a token masked out) is reported as -9999.0, as OpenAI does, since JSON has no
    infinity.
    """
    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = _chosen(position, token_id)
        item = _chat_entry(_text(chosen, tokenizer), chosen.logprob)
        item["top_logprobs"] = [
            _chat_entry(_text(e, tokenizer), e.logprob) for e in _top(position, num)
        ]
        content.append(item)
    return content
