"""Media content parts (image_url, video_url, input_audio) through `kvrun serve`.

The default (text-only) model refuses every media part with a 400 naming the part and
the modality. A random Qwen2-VL checkpoint (kvrun.testing.checkpoints) takes images:
fetched from a media server on 127.0.0.1 the test starts (allow-listed explicitly), from
data: URLs and from file:// under --allowed-local-media-path; its greedy answer equals
transformers' on the same image. Refusals (a bad data: URL, a host not allowed, a
file outside the directory, a slow server) are 400s and the server keeps serving.
Addresses other than loopback are never named here: tests/test_media_fetch.py covers
them inside a network namespace.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from kvrun.testing.checkpoints import build_random_qwen2_vl_checkpoint
from tests.server.conftest import Server, launch
from tests.support.media_server import MediaServer, media_server, mp4_bytes, png_bytes

# Qwen2-VL's chat template (as its Hugging Face repository ships it): a message's
# content parts, {"type": "image"} placeholders included.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_TOKENS = 8
FETCH_TIMEOUT_S = 2


def _image_message(part: dict[str, Any], text: str = "Describe it.") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


def _image_url(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def _post(server: Server, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
    with server.http(timeout) as http:
        return http.post("/v1/chat/completions", json=body)


def _error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


# --- a text-only model -------------------------------------------------------------


@pytest.mark.parametrize(
    ("part", "kind"),
    [
        (_image_url("http://127.0.0.1:9/never-fetched.png"), "image"),
        ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "video"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ],
)
def test_text_model_refuses_media_parts(
    server: Server, model_name: str, part: Any, kind: str
) -> None:
    body = {"model": model_name, "messages": _image_message(part), "max_tokens": 2}
    error = _error(_post(server, body))
    assert error["param"] == "messages[0].content[0]"
    assert f"model {model_name!r} does not accept {kind} inputs" in error["message"]
    assert part["type"] in error["message"]


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "image_embeds parts are not supported"),
        ({"type": "hologram"}, "a part of type 'hologram' is not accepted"),
        ({"type": "text", "text": 3}, "a text part needs a string"),
    ],
)
def test_unknown_parts_are_refused(server: Server, part: Any, reason: str) -> None:
    error = _error(_post(server, {"messages": _image_message(part), "max_tokens": 2}))
    assert reason in error["message"] and error["param"] == "messages[0].content[0]"


def test_text_model_refuses_mm_processor_kwargs(server: Server) -> None:
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 2,
        "mm_processor_kwargs": {"max_pixels": 1000},
    }
    error = _error(_post(server, body))
    assert error["param"] == "mm_processor_kwargs" and "takes text only" in error["message"]


def test_text_parts_still_work(server: Server) -> None:
    parts = [{"type": "text", "text": "Say hi."}, {"type": "text", "text": "Briefly."}]
    response = _post(server, {"messages": [{"role": "user", "content": parts}], "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]


# --- a Qwen2-VL model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    out = build_random_qwen2_vl_checkpoint(
        tmp_path_factory.mktemp("qwen2-vl") / "model", tokenizer_dir=smollm2_hf_dir
    )
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    return out


@pytest.fixture(scope="module")
def media() -> Iterator[MediaServer]:
    with media_server() as s:
        yield s


@pytest.fixture(scope="module")
def local_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("local-media")
    (root / "cat.png").write_bytes(png_bytes())
    return root


@pytest.fixture(scope="module")
def vl_server(
    tmp_path_factory: pytest.TempPathFactory, qwen2_vl_dir: Path, local_media: Path
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("vl-server")
    srv = launch(
        workdir,
        args=[
            "--model",
            str(qwen2_vl_dir),
            "--allowed-media-domains",
            "127.0.0.1",
            "--allowed-local-media-path",
            str(local_media),
            "--limit-mm-per-prompt",
            '{"image": 2}',
            "--dtype",  # compared with transformers' float32 greedy text (auto may be bf16)
            "float32",
            # room for the longest prompt here (~60 tokens with the image's placeholders
            # expanded) and its answer: a request without max_tokens runs to this length
            "--max-model-len",
            "256",
        ],
        env={
            "VLLM_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S),
            "VLLM_ASSETS_CACHE": str(workdir / "assets"),
        },
    )
    yield srv
    srv.stop()
    srv.cleanup()


def _hf_greedy(
    checkpoint: Path, prompt_ids: list[int], image_png: bytes, min_pixels: int | None = None
) -> str:
    """transformers' greedy reply to the prompt (one image placeholder) and image
    (``min_pixels``: the image processor's lower size bound instead of the checkpoint's)."""
    from PIL import Image
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))
    if min_pixels is not None:
        processor.size = {
            "shortest_edge": min_pixels,
            "longest_edge": processor.size["longest_edge"],
        }
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    inputs = processor(images=[image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    at = prompt_ids.index(pad)
    count = int(grid.prod()) // 4  # spatial merge 2x2
    ids = prompt_ids[:at] + [pad] * count + prompt_ids[at + 1 :]
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(checkpoint), dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            pixel_values=inputs["pixel_values"],
            image_grid_thw=grid,
            # which tokens are image rows: transformers' M-RoPE positions need it
            mm_token_type_ids=(torch.tensor([ids]) == pad).int(),
            max_new_tokens=MAX_TOKENS,
            do_sample=False,
        )
    text: str = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
    return text


def _hf_image_tokens(checkpoint: Path, image_png: bytes) -> int:
    """The placeholder tokens transformers' Qwen2-VL processor gives the image."""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    processor = Qwen2VLImageProcessorPil.from_pretrained(str(checkpoint))
    image = Image.open(io.BytesIO(image_png)).convert("RGB")
    grid = processor(images=[image], return_tensors="pt")["image_grid_thw"]
    return int(grid.prod()) // 4  # spatial merge 2x2


def _answer(server: Server, part: dict[str, Any]) -> str:
    body = {
        "messages": _image_message(part),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    response = _post(server, body)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def test_image_from_http_equals_transformers_and_data_url(
    vl_server: Server, media: MediaServer, qwen2_vl_dir: Path, local_media: Path
) -> None:
    with vl_server.http() as http:
        tokenized = http.post(
            "/tokenize", json={"messages": _image_message(_image_url("http://127.0.0.1/x.png"))}
        )
    assert tokenized.status_code == 200, tokenized.text
    expected = _hf_greedy(qwen2_vl_dir, tokenized.json()["tokens"], media.image)

    fetched = _answer(vl_server, _image_url(media.url("/image.png")))
    assert fetched == expected
    data_url = "data:image/png;base64," + base64.b64encode(media.image).decode()
    assert _answer(vl_server, _image_url(data_url)) == expected
    assert _answer(vl_server, _image_url(f"file://{local_media}/cat.png")) == expected
    other = "data:image/png;base64," + base64.b64encode(png_bytes((56, 84), seed=3)).decode()
    assert _answer(vl_server, _image_url(other)) != expected  # the image matters


def test_mm_processor_kwargs_resize_the_request_media(
    vl_server: Server, media: MediaServer, qwen2_vl_dir: Path
) -> None:
    """The chat request's mm_processor_kwargs reach the processor (transformers' answer
    at that size, which differs from its answer at the checkpoint's); an unknown key is a
    400 naming it."""
    part = _image_url(media.url("/image.png"))
    with vl_server.http() as http:
        tokenized = http.post("/tokenize", json={"messages": _image_message(part)})
    assert tokenized.status_code == 200, tokenized.text
    big = 112 * 112
    expected = _hf_greedy(qwen2_vl_dir, tokenized.json()["tokens"], media.image, min_pixels=big)
    body: dict[str, Any] = {
        "messages": _image_message(part),
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    plain = _post(vl_server, body)
    sized = _post(vl_server, {**body, "mm_processor_kwargs": {"min_pixels": big}})
    assert plain.status_code == 200 and sized.status_code == 200, sized.text
    assert sized.json()["choices"][0]["message"]["content"] == expected
    assert expected != _hf_greedy(qwen2_vl_dir, tokenized.json()["tokens"], media.image)
    error = _error(_post(vl_server, {**body, "mm_processor_kwargs": {"fps": 2}}))
    assert error["param"] == "mm_processor_kwargs"
    assert "'fps'" in error["message"] and "accepted: max_pixels, min_pixels" in error["message"]


def test_usage_counts_the_prompt_the_engine_ran(
    vl_server: Server, media: MediaServer, qwen2_vl_dir: Path
) -> None:
    """usage.prompt_tokens is the prompt with the image's placeholders expanded (as vLLM
    and OpenAI count), answered whole and streamed (final and per-chunk usage)."""
    messages = _image_message(_image_url(media.url("/image.png")))
    with vl_server.http() as http:
        tokenized = http.post("/tokenize", json={"messages": messages})
    assert tokenized.status_code == 200, tokenized.text
    unexpanded = tokenized.json()["count"]
    expected = unexpanded - 1 + _hf_image_tokens(qwen2_vl_dir, media.image)
    assert expected > unexpanded
    body: dict[str, Any] = {"messages": messages, "max_tokens": 3, "temperature": 0.0}
    whole = _post(vl_server, body)
    assert whole.status_code == 200, whole.text
    usage = whole.json()["usage"]
    assert usage["prompt_tokens"] == expected
    assert usage["total_tokens"] == expected + usage["completion_tokens"]
    for options in (
        {"include_usage": True},
        {"include_usage": True, "continuous_usage_stats": True},
    ):
        stream = vl_server.client().chat.completions.create(
            model=None,  # type: ignore[arg-type]
            messages=messages,  # type: ignore[arg-type]
            max_tokens=3,
            temperature=0.0,
            stream=True,
            stream_options=options,  # type: ignore[arg-type]
        )
        chunks = list(stream)
        assert chunks[-1].usage is not None and not chunks[-1].choices
        assert chunks[-1].usage.prompt_tokens == expected
        if options.get("continuous_usage_stats"):  # every chunk, the role chunk first
            assert all(c.usage is not None for c in chunks)
            assert {c.usage.prompt_tokens for c in chunks if c.usage} == {expected}


def test_mm_processor_kwargs_without_media_are_checked(vl_server: Server) -> None:
    """No media part: an unknown key is still a 400 naming it; valid settings are taken
    and change nothing."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.0,
    }
    error = _error(_post(vl_server, {**body, "mm_processor_kwargs": {"fps": 2}}))
    assert error["param"] == "mm_processor_kwargs"
    assert "'fps'" in error["message"] and "accepted: max_pixels, min_pixels" in error["message"]
    plain = _post(vl_server, body)
    sized = _post(vl_server, {**body, "mm_processor_kwargs": {"min_pixels": 112 * 112}})
    assert plain.status_code == 200 and sized.status_code == 200, sized.text
    assert sized.json()["choices"] == plain.json()["choices"]
    assert sized.json()["usage"] == plain.json()["usage"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64,!!!", "not valid base64"),
        ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not an image"),
        ("http://localhost:{port}/image.png", "'localhost' is not in this server's"),
        ("http://[::ffff:127.0.0.1]:{port}/image.png", "is not in this server's"),
        ("file:///etc/passwd", "not inside this server's --allowed-local-media-path"),
        ("ftp://127.0.0.1/image.png", "scheme 'ftp'"),
        ("http://127.0.0.1:{port}/missing.png", "answered HTTP 404"),
    ],
)
def test_refused_media_are_400s(
    vl_server: Server, media: MediaServer, url: str, reason: str
) -> None:
    before = media.hits["/image.png"]
    body = {"messages": _image_message(_image_url(url.format(port=media.port))), "max_tokens": 2}
    error = _error(_post(vl_server, body))
    assert error["param"] == "messages[0].content[0]"
    assert reason in error["message"] and "image_url" in error["message"]
    assert "root:" not in error["message"] and "/etc" not in error["message"]
    assert media.hits["/image.png"] == before  # nothing was fetched


def test_slow_media_is_a_400_within_the_timeout_and_others_are_served(
    vl_server: Server, media: MediaServer
) -> None:
    import concurrent.futures

    slow_body = {"messages": _image_message(_image_url(media.url("/slow"))), "max_tokens": 2}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        slow = pool.submit(_post, vl_server, slow_body)
        # served while the slow fetch waits: fetching does not block the event loop
        text_only = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert _post(vl_server, text_only).status_code == 200
        error = _error(slow.result(timeout=60))
        assert time.monotonic() - start < FETCH_TIMEOUT_S + 5.0
    assert "took longer than 2 s" in error["message"]


def test_streamed_answer_with_an_image_equals_the_whole_one(
    vl_server: Server, media: MediaServer
) -> None:
    part = _image_url(media.url("/image.png"))
    whole = _answer(vl_server, part)
    stream = vl_server.client().chat.completions.create(
        model=None,  # type: ignore[arg-type]
        messages=_image_message(part),  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        temperature=0.0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole


def test_video_from_a_data_url_is_answered(vl_server: Server) -> None:
    url = "data:video/mp4;base64," + base64.b64encode(mp4_bytes()).decode()
    part = {"type": "video_url", "video_url": {"url": url}}
    first = _answer(vl_server, part)
    assert first and _answer(vl_server, part) == first  # greedy: the same answer again
    broken = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}
    error = _error(_post(vl_server, {"messages": _image_message(broken), "max_tokens": 2}))
    assert "video_url could not be used" in error["message"]


def test_too_many_images_are_refused(vl_server: Server, media: MediaServer) -> None:
    parts = [_image_url(media.url("/image.png"))] * 3
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 2}
    error = _error(_post(vl_server, body))
    assert "3 image items" in error["message"] and "--limit-mm-per-prompt" in error["message"]


def test_qwen2_vl_refuses_audio(vl_server: Server) -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    error = _error(_post(vl_server, {"messages": _image_message(part), "max_tokens": 2}))
    assert "does not accept audio inputs (it takes image, video)" in error["message"]


# --- the wire (no server) --------------------------------------------------------------


def test_media_cross_the_wire_as_raw_bytes_and_decode_alike() -> None:
    import msgspec
    import numpy as np

    from kvrun.multimodal.media import content_hash, decode_image
    from kvrun.server.wire import (
        AddRequest,
        WireArray,
        WireAudio,
        WireImage,
        WireMultiModal,
        WireSampling,
        frontend_decoder,
    )

    image = decode_image(png_bytes()).image
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    samples = np.linspace(-1, 1, 50, dtype=np.float32)
    media = WireMultiModal(
        image=[WireImage.of(image)],
        video=[WireArray.of(frames)],
        audio=[WireAudio(WireArray.of(samples), 16000)],
    )
    sent = AddRequest("r1", [1, 2], WireSampling(), 0.0, multi_modal_data=media)
    received = frontend_decoder().decode(msgspec.msgpack.encode(sent))
    assert isinstance(received, AddRequest) and received.multi_modal_data is not None
    data = received.multi_modal_data.to_data()
    assert content_hash(data["image"][0]) == content_hash(image)
    np.testing.assert_array_equal(data["video"][0], frames)
    ((clip, rate),) = data["audio"]
    np.testing.assert_array_equal(clip, samples)
    assert rate == 16000
    assert WireMultiModal().to_data() == {}


@pytest.mark.parametrize(
    "bad",
    [
        lambda w: w.WireArray("object", [1], b"x").to_array(),
        lambda w: w.WireArray("float32", [3], b"\0" * 8).to_array(),
        lambda w: w.WireArray("uint8", [-1], b"").to_array(),
        lambda w: w.WireImage("RGB", 2, 2, b"\0" * 5).to_image(),
        lambda w: w.WireImage("P", 1, 1, b"\0").to_image(),
    ],
)
def test_malformed_wire_media_are_refused(bad: Any) -> None:
    from kvrun.server import wire

    with pytest.raises(ValueError, match="media"):
        bad(wire)


# --- the flags (no server) ---------------------------------------------------------------


def test_limit_mm_per_prompt_reads_vllm_forms_and_refuses_others() -> None:
    from kvrun.errors import ConfigError
    from kvrun.server.chat_media import parse_limit_mm_per_prompt

    assert parse_limit_mm_per_prompt(None) == {"image": 8, "video": 8, "audio": 8}
    assert parse_limit_mm_per_prompt('{"image": 2, "video": {"count": 0}}') == {
        "image": 2,
        "video": 0,
        "audio": 8,
    }
    for bad, reason in [
        ("image=2", "not a JSON object"),
        ('{"hologram": 1}', "names 'hologram'"),
        ('{"image": -1}', "not a count"),
        ('{"image": true}', "not a count"),
    ]:
        with pytest.raises(ConfigError, match=reason):
            parse_limit_mm_per_prompt(bad)


def test_allowed_local_media_path_must_be_a_directory(tmp_path: Path) -> None:
    from kvrun.errors import ConfigError
    from kvrun.multimodal.fetch import check_allowed_local_path

    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    (tmp_path / "real").mkdir()
    assert check_allowed_local_path(str(link)) == str((tmp_path / "real").resolve())
    assert check_allowed_local_path(None) is None
    with pytest.raises(ConfigError, match="is not a directory"):
        check_allowed_local_path(str(tmp_path / "missing"))


def test_an_image_request_without_max_tokens_gets_the_room_after_expansion(
    vl_server: Server, media: MediaServer
) -> None:
    # The frontend sees one placeholder per image; the engine expands it. Without
    # max_tokens the room is computed after that, so the request is not refused as too long.
    body = {"messages": _image_message(_image_url(media.url("/image.png"))), "temperature": 0.0}
    response = _post(vl_server, body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    with vl_server.http() as http:
        max_model_len = http.get("/v1/models").json()["data"][0]["max_model_len"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= max_model_len
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
