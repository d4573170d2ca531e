"""Offline ``LLM.chat`` with media content parts and ``mm_processor_kwargs`` (issue 18), on
the random tiny Qwen2-VL of tests/engine/test_multimodal.py, against transformers.

``LLM.chat`` parses content parts with the server's parser (kvrun.multimodal.chat_parts):
an ``image_pil`` part, a ``data:`` URL and a ``file://`` URL under
``allowed_local_media_path`` all answer as transformers does on the image; a ``video_url``
answers as ``generate`` on the decoded frames; refusals name the part. Processor settings
(``min_pixels``/``max_pixels``) from the engine (``LLM(mm_processor_kwargs=...)``, JSON as
the flag gives it) or the prompt resize the image as transformers' processor does with
them, and the encoder cache keys on them: the same image at another size is encoded
again, never served the other size's rows.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvrun import LLM, SamplingParams
from kvrun.errors import ConfigError, RequestError
from tests.engine.test_multimodal import (  # noqa: F401  (vl_dir, reference: fixtures)
    GREEDY,
    IMAGE_PROMPT,
    Reference,
    _assert_matches,
    _image,
    _run,
    reference,
    vl_dir,
)
from tests.server.test_media_inputs import QWEN2_VL_TEMPLATE
from tests.support.engine import make_engine
from tests.support.media_server import mp4_bytes

PIL = pytest.importorskip("PIL.Image")

BIG = 112 * 112  # min_pixels that upsizes the 56 x 84 test image (2 x 3 -> 4 x 5 merged)


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _chat(part: dict[str, Any], text: str = "Describe this picture") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [part, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("allowed-media")
    (root / "one.png").write_bytes(_png(_image(1)))
    return root


@pytest.fixture(scope="module")
def llm(vl_dir: Path, media_dir: Path) -> Iterator[LLM]:  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CONFIGURE_LOGGING", "0")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.1")
        yield LLM(
            model=str(vl_dir),
            dtype="float32",
            max_model_len=256,
            allowed_local_media_path=str(media_dir),
        )


def _reply(llm: LLM, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
    [out] = llm.chat(messages, GREEDY, chat_template=QWEN2_VL_TEMPLATE, use_tqdm=False, **kwargs)
    return out


def _sized(reference: Reference, directory: Path, min_pixels: int) -> Reference:  # noqa: F811
    """The reference with its image processor's size bounds changed."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    sized = object.__new__(Reference)
    sized.__dict__.update(reference.__dict__)
    processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
    processor.size = {"shortest_edge": min_pixels, "longest_edge": processor.size["longest_edge"]}
    sized.images = processor
    return sized


def test_chat_image_parts_equal_transformers(
    llm: LLM,
    reference: Reference,  # noqa: F811
    media_dir: Path,
) -> None:
    image = _image(1)
    data_url = "data:image/png;base64," + base64.b64encode(_png(image)).decode()
    parts = [
        {"type": "image_pil", "image_pil": image},
        {"type": "image_url", "image_url": {"url": data_url, "detail": "low"}},
        {"type": "image_url", "image_url": {"url": f"file://{media_dir}/one.png"}},
    ]
    text = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}],
        add_generation_prompt=True,
        chat_template=QWEN2_VL_TEMPLATE,
    )
    expected = reference.generate(text, image=image)
    for part in parts:
        out = _reply(llm, _chat(part, "Describe"))
        _assert_matches(out, expected)
    other = _reply(llm, _chat({"type": "image_pil", "image_pil": _image(2)}, "Describe"))
    seq = other.outputs[0]  # the image matters
    got = [seq.logprobs[i][t].logprob for i, t in enumerate(seq.token_ids)]
    assert (list(seq.token_ids), pytest.approx(got, abs=1e-3)) != (expected[0], expected[1])


def test_chat_video_part_equals_generate_on_the_decoded_frames(llm: LLM) -> None:
    from kvrun.multimodal.media import decode_video

    clip = mp4_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    out = _reply(llm, _chat({"type": "video_url", "video_url": {"url": url}}, "What happens?"))
    frames = decode_video(clip).frames
    prompt = {
        "prompt_token_ids": _unexpanded(out.prompt_token_ids, llm),
        "multi_modal_data": {"video": frames},
    }
    [want] = llm.generate(prompt, GREEDY, use_tqdm=False)
    assert list(out.outputs[0].token_ids) == list(want.outputs[0].token_ids)
    assert out.prompt_token_ids == want.prompt_token_ids


def _unexpanded(ids: list[int], llm: LLM) -> list[int]:
    """A prompt's ids with each run of one placeholder token folded back to one."""
    engine = llm.llm_engine
    assert engine.multimodal is not None
    pads = set(engine.multimodal.token_ids.values())
    out: list[int] = []
    for token in ids:
        if token in pads and out and out[-1] == token:
            continue
        out.append(token)
    return out


@pytest.mark.parametrize(
    ("part", "reason"),
    [
        (
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
            "not inside LLM(allowed_local_media_path=...)",  # the caller's own setting
        ),
        (
            {"type": "image_url", "image_url": {"url": "http://localhost:9/x.png"}},
            "localhost",
        ),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}, "base64"),
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
        ({"type": "image_embeds", "image_embeds": "AAAA"}, "image_embeds parts are not"),
        ({"type": "image_pil", "image_pil": "not an image"}, "PIL.Image.Image"),
    ],
)
def test_chat_refusals_name_the_part(llm: LLM, part: dict[str, Any], reason: str) -> None:
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]") as caught:
        _reply(llm, _chat(part))
    assert reason in str(caught.value) and caught.value.param == "messages[0].content[0]"
    assert "root:" not in str(caught.value)
    assert not llm.llm_engine.has_unfinished_requests()


# --- mm_processor_kwargs -------------------------------------------------------------------


def test_processor_kwargs_resize_as_transformers_and_key_the_encoder_cache(
    llm: LLM,
    reference: Reference,  # noqa: F811
    vl_dir: Path,  # noqa: F811
) -> None:
    engine = llm.llm_engine
    image = _image(11)  # not encoded by an earlier test
    cache = engine.runner.encoder_cache  # type: ignore[attr-defined]
    runs = cache.encoder_runs
    prompts = [
        {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}},
        {
            "prompt": IMAGE_PROMPT,
            "multi_modal_data": {"image": image},
            "mm_processor_kwargs": {"min_pixels": BIG},
        },
    ]
    plain, bigger = _run(engine, prompts)
    _assert_matches(plain, reference.generate(IMAGE_PROMPT, image=image))
    _assert_matches(bigger, _sized(reference, vl_dir, BIG).generate(IMAGE_PROMPT, image=image))
    pad = reference.config.image_token_id
    assert plain.prompt_token_ids.count(pad) == 6 and bigger.prompt_token_ids.count(pad) == 20
    assert cache.encoder_runs == runs + 2  # one encoding per size, none shared
    again = _run(engine, prompts[::-1])  # each size finds its own rows now
    assert cache.encoder_runs == runs + 2
    assert [o.outputs[0].token_ids for o in again] == [
        bigger.outputs[0].token_ids,
        plain.outputs[0].token_ids,
    ]
    # LLM.chat takes them too
    out = _reply(
        llm,
        _chat({"type": "image_pil", "image_pil": image}),
        mm_processor_kwargs={"min_pixels": BIG},
    )
    assert list(out.prompt_token_ids).count(pad) == 20


def test_processor_kwargs_without_media_are_checked_then_act_on_nothing(llm: LLM) -> None:
    """No media part: an unknown key or a bad value is the same error as with media (not
    silently accepted); valid settings change nothing (vLLM runs no media processor then)."""
    text_only = [{"role": "user", "content": "Say something."}]
    for kwargs, reason in (
        ({"fps": 2}, "key 'fps' is not a setting"),
        ({"max_pixels": 0}, "mm_processor_kwargs.max_pixels=0"),
    ):
        with pytest.raises(RequestError, match=reason) as caught:
            _reply(llm, text_only, mm_processor_kwargs=kwargs)
        assert caught.value.param.startswith("mm_processor_kwargs")
        with pytest.raises(RequestError, match=reason):
            prompt = {"prompt": "Say something.", "mm_processor_kwargs": kwargs}
            llm.llm_engine.add_request("bad", prompt, SamplingParams(max_tokens=1))
    plain = _reply(llm, text_only)
    sized = _reply(llm, text_only, mm_processor_kwargs={"min_pixels": BIG})
    assert sized.prompt_token_ids == plain.prompt_token_ids
    assert sized.outputs[0].token_ids == plain.outputs[0].token_ids
    assert not llm.llm_engine.has_unfinished_requests()


def test_engine_processor_kwargs_and_their_refusals(
    vl_dir: Path,  # noqa: F811
    reference: Reference,  # noqa: F811
    random_checkpoint: Any,
) -> None:
    engine = make_engine(vl_dir, max_model_len=256, mm_processor_kwargs=f'{{"min_pixels": {BIG}}}')
    image = _image(1)
    sized = _sized(reference, vl_dir, BIG)
    [out] = _run(engine, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}])
    _assert_matches(out, sized.generate(IMAGE_PROMPT, image=image))
    # a prompt's own settings override the engine's key by key
    [back] = _run(
        engine,
        [
            {
                "prompt": IMAGE_PROMPT,
                "multi_modal_data": {"image": image},
                "mm_processor_kwargs": {"min_pixels": 784},
            }
        ],
    )
    _assert_matches(back, reference.generate(IMAGE_PROMPT, image=image))
    bad = [
        ({"fps": 2}, "key 'fps' is not a setting of Qwen2VLForConditionalGeneration"),
        ({"max_pixels": 0}, "mm_processor_kwargs.max_pixels=0"),
        ({"min_pixels": 20000, "max_pixels": 10000}, "at most max_pixels=10000"),
        ({"min_pixels": 10**9}, "min_pixels <= max_pixels"),
        ("max_pixels", "a dict of settings"),
    ]
    for kwargs, reason in bad:
        prompt = {
            "prompt": IMAGE_PROMPT,
            "multi_modal_data": {"image": image},
            "mm_processor_kwargs": kwargs,
        }
        with pytest.raises(RequestError, match="mm_processor_kwargs") as caught:
            engine.add_request("bad", prompt, SamplingParams(max_tokens=1))
        assert reason in str(caught.value), str(caught.value)
        assert caught.value.param.startswith("mm_processor_kwargs")
    assert "accepted: max_pixels, min_pixels" in _refusal(engine, {"fps": 2})  # the keys it takes
    with pytest.raises(ConfigError, match="key 'size' is not a setting"):
        make_engine(vl_dir, max_model_len=256, mm_processor_kwargs={"size": 3})
    with pytest.raises(ConfigError, match="is not JSON"):
        make_engine(vl_dir, max_model_len=256, mm_processor_kwargs="{min_pixels: 3}")
    text_model = random_checkpoint("llama", seed=3, init_std=0.2)
    with pytest.raises(ConfigError, match="takes text only"):
        make_engine(text_model, max_model_len=64, mm_processor_kwargs={"max_pixels": 100})
    assert not engine.has_unfinished_requests()


def _refusal(engine: Any, kwargs: Any) -> str:
    prompt = {
        "prompt": IMAGE_PROMPT,
        "multi_modal_data": {"image": _image(1)},
        "mm_processor_kwargs": kwargs,
    }
    with pytest.raises(RequestError) as caught:
        engine.add_request("bad", prompt, SamplingParams(max_tokens=1))
    return str(caught.value)


# --- audio ------------------------------------------------------------------------------

# renders a user message's parts as tests/engine/test_multimodal.AUDIO_PROMPT spells them
AUDIO_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
)


def _wav(samples: Any, rate: int = 16000) -> bytes:
    import wave

    import numpy as np

    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())
    return buf.getvalue()


def test_chat_input_audio_equals_transformers(smollm2_hf_dir: Path) -> None:
    from kvrun.multimodal.media import decode_audio
    from kvrun.testing.checkpoints import build_random_qwen2_audio_checkpoint
    from tests.engine.test_multimodal import AUDIO_PROMPT, _clip, _hf_audio
    from tests.support.checkpoints import cached_build

    audio_dir = cached_build(  # the checkpoint tests/engine/test_multimodal.py builds
        "random-qwen2-audio",
        {"seed": 0},
        lambda out: build_random_qwen2_audio_checkpoint(out, tokenizer_dir=smollm2_hf_dir),
    )
    wav = _wav(_clip(1, 1.0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_TARGET_DEVICE", "cpu")
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", "0.1")
        llm = LLM(model=str(audio_dir), dtype="float32", max_model_len=256)
    part = {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
    }
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "What do you hear?"}]}]
    [out] = llm.chat(messages, GREEDY, chat_template=AUDIO_TEMPLATE, use_tqdm=False)
    decoded = decode_audio(wav)
    assert decoded.sample_rate == 16000
    assert (
        llm.get_tokenizer().decode(
            _unexpanded(out.prompt_token_ids, llm), skip_special_tokens=False
        )
        == AUDIO_PROMPT
    )
    _assert_matches(out, _hf_audio(audio_dir, decoded.samples))
    image = {"type": "image_pil", "image_pil": _image(1)}
    with pytest.raises(RequestError, match="does not accept image inputs"):
        llm.chat(_chat(image), GREEDY, chat_template=AUDIO_TEMPLATE, use_tqdm=False)
