"""Media content parts of chat messages: checked, then fetched and decoded.

One parser for the server's ``/v1/chat/completions`` (:mod:`kvrun.server.chat_media` puts
its results on the wire) and the offline ``LLM.chat``. Accepted parts (OpenAI's, plus
vLLM's ``audio_url``)::

    {"type": "image_url", "image_url": {"url": URL, "detail": "auto" | "low" | "high"}}
    {"type": "video_url", "video_url": {"url": URL}}
    {"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav" | "mp3" | ...}}
    {"type": "audio_url", "audio_url": {"url": URL}}

and offline only (``objects=True``), vLLM's ``{"type": "image_pil", "image_pil":
PIL.Image}``. URL: http(s), ``data:<type>;base64,...`` or ``file://``, each through the
guarded fetcher (:func:`kvrun.multimodal.fetch.fetch_media` and its
:class:`~kvrun.multimodal.fetch.MediaPolicy`: ``file://`` only under the allowed local
path, http(s) only to public addresses or allowed domains). ``detail`` is accepted and
changes nothing (as in vLLM). ``image_embeds`` parts are refused. A part whose kind the
model does not take is refused before anything is fetched.

The chat template sees a message with media as a list of parts in the shape Hugging
Face processors' templates expect: ``{"type": "text", "text": ...}`` and
``{"type": "image"}`` / ``{"type": "video"}`` / ``{"type": "audio"}`` in the order
given; a message with text parts only is one string.

Every refusal is a :class:`ContentPartError` (a RequestError) whose ``param`` is the
part (``messages[i].content[j]``) or ``messages`` for the per-prompt counts.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvrun.errors import RequestError
from kvrun.multimodal.fetch import MediaFetchError, MediaKind, MediaPolicy, fetch_media

__all__ = [
    "DEFAULT_MEDIA_PER_PROMPT",
    "KINDS",
    "ContentPartError",
    "MediaPart",
    "check_media_counts",
    "load_parts",
    "load_parts_blocking",
    "message_dicts",
    "multi_modal_data",
    "template_content",
]

# The media of one kind one prompt may carry unless --limit-mm-per-prompt says otherwise.
DEFAULT_MEDIA_PER_PROMPT = 8
KINDS: tuple[MediaKind, ...] = ("image", "video", "audio")
_URL_PARTS: Mapping[str, MediaKind] = {
    "image_url": "image",
    "video_url": "video",
    "audio_url": "audio",
}
_AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
_ACCEPTED_TYPES = "text, image_url, video_url, input_audio, audio_url"


class ContentPartError(RequestError):
    """A content part (or the messages' media together) that cannot be used."""


@dataclass(frozen=True)
class MediaPart:
    kind: MediaKind
    part_type: str  # the part's "type", as the client sent it
    where: str  # "messages[i].content[j]"
    url: str  # input_audio's data arrives here as a data: URL; "" for an object
    value: Any = None  # an object given offline (image_pil: a PIL image), used as it is


def _refuse(where: str, message: str) -> ContentPartError:
    return ContentPartError(f"{where}: {message}", param=where)


def _media_part(part: Mapping[str, Any], kind: MediaKind, where: str) -> MediaPart:
    part_type = str(part["type"])
    body = part.get(part_type)
    if part_type == "image_pil":
        from PIL import Image

        if not isinstance(body, Image.Image):
            raise _refuse(where, 'an image_pil part needs {"image_pil": PIL.Image.Image}')
        return MediaPart(kind, part_type, where, "", body)
    if part_type == "input_audio":
        if not isinstance(body, Mapping) or not isinstance(body.get("data"), str):
            raise _refuse(where, 'an input_audio part needs {"data": BASE64, "format": ...}')
        audio_format = body.get("format")
        if audio_format not in _AUDIO_FORMATS:
            raise _refuse(
                where,
                f"input_audio format {audio_format!r} is not accepted; accepted: "
                + ", ".join(_AUDIO_FORMATS),
            )
        return MediaPart(kind, part_type, where, f"data:audio/{audio_format};base64,{body['data']}")
    if not isinstance(body, Mapping) or not isinstance(body.get("url"), str):
        raise _refuse(where, f'a {part_type} part needs {{"{part_type}": {{"url": URL}}}}')
    if part_type == "image_url" and body.get("detail", "auto") not in ("auto", "low", "high"):
        raise _refuse(where, "image_url.detail must be auto, low or high")
    return MediaPart(kind, part_type, where, body["url"])


def template_content(
    content: Sequence[Any],
    index: int,
    accepted: frozenset[str] | Sequence[str],
    model: str,
    *,
    objects: bool = False,
) -> tuple[str | list[dict[str, Any]], list[MediaPart]]:
    """Message ``index``'s content parts as the template sees them, and its media parts.

    ``objects``: also take ``image_pil`` parts (the offline API's in-memory images).
    Raises ContentPartError for a malformed part, an unknown type, ``image_embeds``, or a
    medium the model does not accept.
    """
    out: list[dict[str, Any]] = []
    media: list[MediaPart] = []
    for j, part in enumerate(content):
        where = f"messages[{index}].content[{j}]"
        part_type = part.get("type") if isinstance(part, Mapping) else None
        if part_type == "text":
            if not isinstance(part.get("text"), str):
                raise _refuse(where, "a text part needs a string 'text'")
            out.append({"type": "text", "text": part["text"]})
            continue
        if part_type == "image_embeds":
            raise _refuse(
                where,
                "image_embeds parts are not supported; send the image itself (image_url)",
            )
        kind = _URL_PARTS.get(part_type) if isinstance(part_type, str) else None
        if part_type == "input_audio":
            kind = "audio"
        if part_type == "image_pil" and objects:
            kind = "image"
        if kind is None:
            types = _ACCEPTED_TYPES + (", image_pil" if objects else "")
            raise _refuse(where, f"a part of type {part_type!r} is not accepted; accepted: {types}")
        if kind not in accepted:
            takes = ", ".join(sorted(accepted)) if accepted else "text only"
            raise _refuse(
                where,
                f"{part_type} parts are refused: model {model!r} does not accept {kind} "
                f"inputs (it takes {takes})",
            )
        assert isinstance(part, Mapping)
        media.append(_media_part(part, kind, where))
        out.append({"type": kind})
    if not media:
        return "\n".join(p["text"] for p in out), []
    return out, media


def check_media_counts(parts: Sequence[MediaPart], limits: Mapping[str, int]) -> None:
    """At most ``limits[kind]`` items of each kind (``--limit-mm-per-prompt``)."""
    for kind in KINDS:
        count = sum(p.kind == kind for p in parts)
        limit = limits.get(kind, DEFAULT_MEDIA_PER_PROMPT)
        if count > limit:
            raise ContentPartError(
                f"the messages carry {count} {kind} items; at most {limit} per prompt are "
                "accepted (--limit-mm-per-prompt)",
                param="messages",
            )


async def _load_one(part: MediaPart, policy: MediaPolicy) -> Any:
    """The decoded item: a PIL image, a uint8 [T, H, W, 3] video, or (samples, rate).
    A missing decoder (Pillow, PyAV) is an ImportError for the caller to report."""
    from kvrun.multimodal import media

    if part.value is not None:
        return part.value
    try:
        data = await fetch_media(part.url, part.kind, policy)
        if part.kind == "image":
            return (await asyncio.to_thread(media.decode_image, data)).image
        if part.kind == "video":
            return (await asyncio.to_thread(media.decode_video, data)).frames
        audio = await asyncio.to_thread(media.decode_audio, data)
        return audio.samples, audio.sample_rate
    except (MediaFetchError, media.MediaDecodeError) as exc:
        raise _refuse(part.where, f"the {part.part_type} could not be used: {exc}") from None


async def load_parts(
    parts: Sequence[MediaPart], policy: MediaPolicy, limits: Mapping[str, int]
) -> list[Any]:
    """Fetch and decode every part at once (the CPU work in worker threads), in order;
    the first failure cancels the rest and is a ContentPartError naming its part."""
    check_media_counts(parts, limits)
    tasks = [asyncio.ensure_future(_load_one(p, policy)) for p in parts]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def message_dicts(
    messages: Sequence[Mapping[str, Any]],
    accepted: frozenset[str] | Sequence[str],
    model: str,
    *,
    objects: bool = False,
) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    """Messages for the chat template (a list of content parts becomes the template's
    shape, :func:`template_content`) and their media parts, in order."""
    out: list[dict[str, Any]] = []
    media: list[MediaPart] = []
    for i, message in enumerate(messages):
        data = dict(message)
        content = data.get("content")
        if isinstance(content, list | tuple):
            data["content"], parts = template_content(content, i, accepted, model, objects=objects)
            media.extend(parts)
        out.append(data)
    return out, media


def multi_modal_data(parts: Sequence[MediaPart], items: Sequence[Any]) -> dict[str, list[Any]]:
    """The engine's ``multi_modal_data`` for decoded ``items``: each kind's, in order."""
    data: dict[str, list[Any]] = {}
    for part, item in zip(parts, items, strict=True):
        data.setdefault(part.kind, []).append(item)
    return data


def load_parts_blocking(
    parts: Sequence[MediaPart], policy: MediaPolicy, limits: Mapping[str, int]
) -> list[Any]:
    """:func:`load_parts` for a caller without an event loop (the offline ``LLM.chat``);
    inside a running loop's thread it runs on a loop of its own in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load_parts(parts, policy, limits))
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, load_parts(parts, policy, limits)).result()
