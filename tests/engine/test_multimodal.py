"""Qwen2-VL and Qwen2.5-VL (images and video) and Qwen2-Audio against transformers on
tiny random checkpoints.

Greedy tokens equal and logprobs within 1e-4 in float32: images (two different ones in
one batch beside a text-only prompt), a 2-frame video, a prefill chunked inside an
image's placeholder run; the encoder runs once per distinct image (the LRU of
VLLM_MM_INPUT_CACHE_SIZE); prefix caching never serves a prompt's blocks to the same
text with another image; and the refusals of malformed media requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.errors import RequestError
from kvrun.models.config import ModelConfig
from kvrun.outputs import RequestOutput
from kvrun.sampling_params import SamplingParams
from kvrun.testing.checkpoints import (
    build_random_qwen2_audio_checkpoint,
    build_random_qwen2_vl_checkpoint,
)
from tests.support.checkpoints import cached_build
from tests.support.engine import make_engine

PIL = pytest.importorskip("PIL.Image")

NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=1)
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>Describe this picture"
VIDEO_PROMPT = "<|vision_start|><|video_pad|><|vision_end|>What happens here?"
TEXT_PROMPT = "A plain question without any picture"


@pytest.fixture(scope="module")
def vl_dir(smollm2_hf_dir: Path) -> Path:
    return cached_build(
        "random-qwen2-vl",
        {"seed": 0},
        lambda out: build_random_qwen2_vl_checkpoint(out, tokenizer_dir=smollm2_hf_dir),
    )


@pytest.fixture(scope="module")
def vl25_dir(smollm2_hf_dir: Path) -> Path:
    return cached_build(
        "random-qwen2.5-vl",
        {"seed": 0, "max_pixels": 168 * 168},
        lambda out: build_random_qwen2_vl_checkpoint(
            out, tokenizer_dir=smollm2_hf_dir, qwen2_5=True, max_pixels=168 * 168
        ),
    )


def _image(seed: int, height: int = 56, width: int = 84) -> Any:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return PIL.fromarray(pixels, "RGB")


class Reference:
    """transformers' Qwen2VLForConditionalGeneration, its tokenizer and image processor."""

    def __init__(self, directory: Path, *, qwen2_5: bool = False) -> None:
        from transformers import (
            AutoTokenizer,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2VLForConditionalGeneration,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
        self.images = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
        model_class = (
            Qwen2_5_VLForConditionalGeneration if qwen2_5 else Qwen2VLForConditionalGeneration
        )
        self.model = model_class.from_pretrained(str(directory), dtype=torch.float32).eval()
        self.qwen2_5 = qwen2_5
        self.config = self.model.config

    def generate(
        self, text: str, *, image: Any = None, video: dict[str, torch.Tensor] | None = None
    ) -> tuple[list[int], list[float]]:
        """Greedy tokens and each one's logprob; ``video``: pixel values and grid."""
        kwargs: dict[str, Any] = {}
        if image is not None:
            out = self.images(images=[image], return_tensors="pt")
            count = int(out["image_grid_thw"][0].prod()) // 4
            assert text.count("<|image_pad|>") == 1
            text = text.replace("<|image_pad|>", "<|image_pad|>" * count)
            kwargs = {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}
        if video is not None:
            count = int(video["grid_thw"].prod()) // 4
            text = text.replace("<|video_pad|>", "<|video_pad|>" * count)
            kwargs = {
                "pixel_values_videos": video["pixel_values"],
                "video_grid_thw": video["grid_thw"].view(1, 3),
            }
            if self.qwen2_5:  # a temporal patch of 2 frames at kvrun's 2 frames a second
                kwargs["second_per_grid_ts"] = torch.tensor([1.0])
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        if kwargs:
            kinds = (ids == self.config.image_token_id).int() + 2 * (
                ids == self.config.video_token_id
            ).int()
            kwargs["mm_token_type_ids"] = kinds
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        tokens = out.sequences[0, ids.shape[1] :].tolist()
        logprobs = [
            float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)
        ]
        return tokens, logprobs


@pytest.fixture(scope="module")
def reference(vl_dir: Path) -> Reference:
    return Reference(vl_dir)


@pytest.fixture(scope="module")
def engine(vl_dir: Path) -> LLMEngine:
    return make_engine(vl_dir, max_model_len=256, enable_prefix_caching=True)


def _run(engine: LLMEngine, prompts: Sequence[Any]) -> list[RequestOutput]:
    ids = []
    for prompt in prompts:
        ids.append(engine.new_request_id())
        engine.add_request(ids[-1], prompt, GREEDY)
    accumulator = OutputAccumulator()
    finished: dict[str, RequestOutput] = {}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            out = accumulator.add(delta)
            if out is not None and out.finished:
                finished[out.request_id] = out
    return [finished[i] for i in ids]


def _assert_matches(out: RequestOutput, expected: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = expected
    seq = out.outputs[0]
    assert list(seq.token_ids) == tokens
    assert seq.logprobs is not None
    for step, token in enumerate(tokens):
        assert seq.logprobs[step][token].logprob == pytest.approx(logprobs[step], abs=1e-4)


def test_images_and_text_in_one_batch_match_transformers(
    engine: LLMEngine, reference: Reference
) -> None:
    first, second = _image(1), _image(2)
    outs = _run(
        engine,
        [
            {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": first}},
            {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": second}},
            TEXT_PROMPT,
        ],
    )
    expected_first = reference.generate(IMAGE_PROMPT, image=first)
    expected_second = reference.generate(IMAGE_PROMPT, image=second)
    assert expected_first[0] != expected_second[0], "the image must change the output"
    _assert_matches(outs[0], expected_first)
    _assert_matches(outs[1], expected_second)
    _assert_matches(outs[2], reference.generate(TEXT_PROMPT))
    # the placeholder was expanded to the image's 2x3 merged patches
    image_token = reference.config.image_token_id
    assert outs[0].prompt_token_ids.count(image_token) == 6


def test_video_frames_match_transformers(engine: LLMEngine, reference: Reference) -> None:
    """4 frames: 2 temporal patches, each frame pair attending within itself."""
    frames = np.stack([np.asarray(_image(s)) for s in (3, 4, 5, 6)])  # [4, H, W, 3]
    (out,) = _run(engine, [{"prompt": VIDEO_PROMPT, "multi_modal_data": {"video": frames}}])
    assert engine.multimodal is not None
    _, processed = engine.multimodal.process(
        engine.tokenizer.encode(VIDEO_PROMPT), {"video": frames}
    )
    (item,) = processed.items
    assert item.data["grid_thw"].tolist() == [2, 4, 6]
    _assert_matches(out, reference.generate(VIDEO_PROMPT, video=dict(item.data)))


def test_video_patches_use_transformers_layout(engine: LLMEngine, reference: Reference) -> None:
    """Two equal frames make the patches transformers' image processor makes of one frame
    (it repeats a still image over the temporal patch)."""
    assert engine.multimodal is not None
    frame = _image(5)
    _, processed = engine.multimodal.process(
        engine.tokenizer.encode(VIDEO_PROMPT), {"video": [frame, frame]}
    )
    expected = reference.images(images=[frame], return_tensors="pt")["pixel_values"]
    assert torch.equal(processed.items[0].data["pixel_values"], expected)


def test_mrope_positions_equal_transformers(engine: LLMEngine, reference: Reference) -> None:
    assert engine.multimodal is not None
    prompt = "Look:" + IMAGE_PROMPT + " and " + VIDEO_PROMPT
    frames = [_image(6), _image(7), _image(8), _image(9)]  # 2 temporal patches
    ids, processed = engine.multimodal.process(
        engine.tokenizer.encode(prompt), {"image": _image(1, 84, 56), "video": frames}
    )
    tensor = torch.tensor([ids])
    config = reference.config
    kinds = (tensor == config.image_token_id).int() + 2 * (tensor == config.video_token_id).int()
    image, video = processed.items
    positions, delta = reference.model.model.get_rope_index(
        tensor,
        kinds,
        image_grid_thw=image.data["grid_thw"].view(1, 3),
        video_grid_thw=video.data["grid_thw"].view(1, 3),
    )
    assert torch.equal(processed.mrope_positions, positions[:, 0])
    assert processed.mrope_delta == int(delta)


def test_chunked_prefill_inside_an_image_matches(vl_dir: Path, reference: Reference) -> None:
    """A 5-token budget cuts the image's 6 placeholder rows across chunks; the encoder
    still runs once (the second chunk reads its cached rows)."""
    chunked = make_engine(
        vl_dir,
        max_model_len=256,
        max_num_batched_tokens=5,
        max_num_seqs=2,
        enable_chunked_prefill=True,
    )
    image = _image(1)
    (out,) = _run(chunked, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}])
    _assert_matches(out, reference.generate(IMAGE_PROMPT, image=image))
    cache = chunked.runner.encoder_cache  # type: ignore[attr-defined]
    assert (cache.encoder_runs, cache.hits) == (1, 1)


def test_preempted_media_requests_recompute_alike(vl_dir: Path, reference: Reference) -> None:
    """Three image requests under a KV budget of four 16-token blocks: some are preempted
    and recompute their prompt (media rows from the encoder cache) and output."""
    tight = make_engine(
        vl_dir,
        max_model_len=64,
        num_kv_blocks=4,
        block_size=16,
        max_num_batched_tokens=16,
        max_num_seqs=4,
        enable_prefix_caching=False,
    )
    images = [_image(41), _image(42), _image(43)]
    outs = _run(tight, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": i}} for i in images])
    assert tight.stats().scheduler.num_preemptions_total > 0
    for out, image in zip(outs, images):
        _assert_matches(out, reference.generate(IMAGE_PROMPT, image=image))


@pytest.fixture(scope="module")
def uncached_prefix_engine(vl_dir: Path) -> LLMEngine:
    """An engine without prefix caching, shared by the tests below (each counts from
    where the encoder cache stands when it starts)."""
    return make_engine(vl_dir, max_model_len=256, enable_prefix_caching=False)


def test_decode_steps_keep_the_fused_decoder(uncached_prefix_engine: LLMEngine) -> None:
    """After its prefill, a media request's decode steps (plain positions shifted by the
    rope delta) are taken by the cpu plugin's fused decode step."""
    engine = uncached_prefix_engine
    fused = engine.runner.fused_decoder  # type: ignore[attr-defined]
    assert fused is not None
    taken: list[bool] = []
    run = fused.run

    def counting_run(*args: Any) -> Any:
        hidden = run(*args)
        taken.append(hidden is not None)
        return hidden

    fused.run = counting_run
    try:
        image = _image(1)
        _run(engine, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}])
    finally:
        del fused.run  # the class's method again
    assert taken.count(True) == NEW_TOKENS - 1  # every decode step; the prefill is not


def test_a_repeated_image_is_encoded_once(vl_dir: Path, uncached_prefix_engine: LLMEngine) -> None:
    engine = uncached_prefix_engine
    cache = engine.runner.encoder_cache  # type: ignore[attr-defined]
    runs, hits = cache.encoder_runs, cache.hits
    image = _image(11)  # encoded by no other test
    prompt = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}
    first = _run(engine, [prompt])
    second = _run(engine, [{**prompt, "prompt": IMAGE_PROMPT + " again"}])
    assert (cache.encoder_runs, cache.hits) == (runs + 1, hits + 1)
    assert first[0].outputs[0].token_ids != ()
    assert second[0].num_cached_tokens == 0  # prefix caching is off: the encoder cache hit
    # an equal copy of the image (another object) has the same content hash
    _run(engine, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image.copy()}}])
    assert (cache.encoder_runs, cache.hits) == (runs + 1, hits + 2)
    _run(engine, [{"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": _image(12)}}])
    assert cache.encoder_runs == runs + 2
    # VLLM_MM_INPUT_CACHE_SIZE=0 keeps nothing: the same image is encoded every time
    uncached = make_engine(
        vl_dir, {"VLLM_MM_INPUT_CACHE_SIZE": "0"}, max_model_len=256, enable_prefix_caching=False
    )
    assert _run(uncached, [prompt])[0].outputs[0].token_ids == first[0].outputs[0].token_ids
    _run(uncached, [prompt])
    none_kept = uncached.runner.encoder_cache  # type: ignore[attr-defined]
    assert (none_kept.encoder_runs, none_kept.hits, len(none_kept)) == (2, 0, 0)


def test_prefix_cache_keys_on_the_image(engine: LLMEngine, reference: Reference) -> None:
    """The same text with another image recomputes its whole prompt (and says what the
    other image shows); the same image again is served from the cache."""
    long_prompt = IMAGE_PROMPT + " in every detail, with all the colours and shapes you see"
    first, second = _image(21), _image(22)
    (a,) = _run(engine, [{"prompt": long_prompt, "multi_modal_data": {"image": first}}])
    (b,) = _run(engine, [{"prompt": long_prompt, "multi_modal_data": {"image": second}}])
    (c,) = _run(engine, [{"prompt": long_prompt, "multi_modal_data": {"image": first}}])
    assert b.num_cached_tokens == 0
    assert c.num_cached_tokens > 0
    expected_second = reference.generate(long_prompt, image=second)
    assert expected_second[0] != list(a.outputs[0].token_ids)
    _assert_matches(b, expected_second)
    assert c.outputs[0].token_ids == a.outputs[0].token_ids


def test_malformed_media_requests_are_refused(engine: LLMEngine, random_checkpoint: Any) -> None:
    image = _image(1)
    cases = [
        ({"prompt": IMAGE_PROMPT, "multi_modal_data": {"audio": [0.0]}}, "audio"),
        ({"prompt": TEXT_PROMPT, "multi_modal_data": {"image": image}}, "placeholder"),
        ({"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": [image, image]}}, "2 image"),
        ({"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": "cat.png"}}, "PIL image"),
        ({"multi_modal_data": {"image": image}}, "'prompt'"),
    ]
    for prompt, fragment in cases:
        with pytest.raises(RequestError) as info:
            engine.add_request(engine.new_request_id(), prompt, GREEDY)
        assert fragment in str(info.value)
        assert str(info.value.param).startswith(("multi_modal_data", "prompt"))
    assert not engine.has_unfinished_requests()
    text_only = make_engine(random_checkpoint("qwen2"), max_model_len=128)
    with pytest.raises(RequestError, match="takes text only") as refused:
        text_only.add_request("r", {"prompt": "hi", "multi_modal_data": {"image": image}}, GREEDY)
    assert refused.value.param == "multi_modal_data"


def test_qwen2_5_vl_windows_and_video_match_transformers(vl25_dir: Path) -> None:
    """Qwen2.5-VL: a 112x84 image is 4x3 merge units in four attention windows of at
    most 2x2 (block 1 attends to the whole frame); and a 4-frame 168x84 video (2 temporal
    patches at time positions 0 and 4, 6x3 merge units each, windowed per frame), in one
    batch. (Its height keeps the text after it where transformers 5.25 puts it: for a
    video whose time positions pass its height and width, 5.25 numbers the text after
    it, and generation after a prompt ending in it, otherwise than the original Qwen
    rule that kvrun and vLLM follow.)"""
    reference = Reference(vl25_dir, qwen2_5=True)
    engine = make_engine(vl25_dir, max_model_len=256)
    image = _image(31, height=112, width=84)
    frames = [_image(s, height=168, width=84) for s in (32, 33, 34, 35)]
    video_prompt = "Watch this: " + VIDEO_PROMPT
    outs = _run(
        engine,
        [
            {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}},
            {"prompt": video_prompt, "multi_modal_data": {"video": frames}},
        ],
    )
    assert engine.multimodal is not None
    _, processed = engine.multimodal.process(
        engine.tokenizer.encode(video_prompt), {"video": frames}
    )
    (video,) = processed.items
    assert video.data["grid_thw"].tolist() == [2, 12, 6]
    assert processed.mrope_positions is not None
    times = processed.mrope_positions[0, video.offset : video.end]
    assert times.unique().tolist() == [int(times[0]), int(times[0]) + 4]
    _assert_matches(outs[0], reference.generate(IMAGE_PROMPT, image=image))
    _assert_matches(outs[1], reference.generate(video_prompt, video=dict(video.data)))
    assert outs[0].prompt_token_ids.count(reference.config.image_token_id) == 12


AUDIO_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>What do you hear?"


@pytest.fixture(scope="module")
def audio_dir(smollm2_hf_dir: Path) -> Path:
    return cached_build(
        "random-qwen2-audio",
        {"seed": 0},
        lambda out: build_random_qwen2_audio_checkpoint(out, tokenizer_dir=smollm2_hf_dir),
    )


def _clip(seed: int, seconds: float, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * (200 + 100 * seed) * t) + 0.05 * noise).astype(np.float32)


def _hf_audio(directory: Path, clip: np.ndarray) -> tuple[list[int], list[float]]:
    from transformers import (
        AutoTokenizer,
        Qwen2AudioForConditionalGeneration,
        WhisperFeatureExtractor,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    features = WhisperFeatureExtractor.from_pretrained(str(directory))(
        clip, sampling_rate=16000, return_attention_mask=True, padding="max_length"
    )
    frames = int(np.sum(features["attention_mask"]))
    count = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = tokenizer(AUDIO_PROMPT.replace("<|AUDIO|>", "<|AUDIO|>" * count), return_tensors="pt")
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(directory), dtype=torch.float32)
    with torch.no_grad():
        out = model.eval().generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            input_features=torch.tensor(np.asarray(features["input_features"])),
            feature_attention_mask=torch.tensor(np.asarray(features["attention_mask"])),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, ids["input_ids"].shape[1] :].tolist()
    logprobs = [
        float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, tokens)
    ]
    return tokens, logprobs


def test_qwen2_audio_matches_transformers(audio_dir: Path) -> None:
    """Two clips of 1 s and 1.5 s in one batch beside a text prompt; an 8 kHz clip is
    resampled to the extractor's 16 kHz (as many placeholders as at 16 kHz)."""
    engine = make_engine(audio_dir, max_model_len=256)
    first, second = _clip(1, 1.0), _clip(2, 1.5)
    outs = _run(
        engine,
        [
            {"prompt": AUDIO_PROMPT, "multi_modal_data": {"audio": (first, 16000)}},
            {"prompt": AUDIO_PROMPT, "multi_modal_data": {"audio": [(second, 16000)]}},
            TEXT_PROMPT,
        ],
    )
    expected_first = _hf_audio(audio_dir, first)
    expected_second = _hf_audio(audio_dir, second)
    assert expected_first[0] != expected_second[0], "the clip must change the output"
    _assert_matches(outs[0], expected_first)
    _assert_matches(outs[1], expected_second)
    assert engine.multimodal is not None
    ids = engine.tokenizer.encode(AUDIO_PROMPT)
    at_16k, _ = engine.multimodal.process(ids, {"audio": (first, 16000)})
    at_8k, low = engine.multimodal.process(ids, {"audio": (_clip(1, 1.0, rate=8000), 8000)})
    # 1 s: 100 mel frames, 50 conv rows, 25 pooled rows
    assert len(at_8k) == len(at_16k) and low.items[0].length == 25
    with pytest.raises(RequestError, match="at most 2 s"):
        engine.multimodal.process(ids, {"audio": (_clip(3, 2.5), 16000)})


def test_the_offline_api_takes_media_in_generate_only(vl_dir: Path) -> None:
    from kvrun import LLM
    from kvrun.errors import KvrunError
    from kvrun.sampling_params import BeamSearchParams

    llm = LLM(str(vl_dir), max_model_len=256, dtype="float32", enforce_eager=True)
    image = _image(1)
    prompt = {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": image}}
    (out,) = llm.generate(prompt, GREEDY, use_tqdm=False)
    (again,) = _run(llm.llm_engine, [prompt])
    assert out.outputs[0].token_ids == again.outputs[0].token_ids
    with pytest.raises(KvrunError, match="generate"):
        llm.beam_search(prompt, BeamSearchParams(beam_width=2, max_tokens=2))


def test_accepted_modalities(vl_dir: Path, random_checkpoint: Any) -> None:
    import json

    def config(path: Path) -> ModelConfig:
        return ModelConfig.from_hf(json.loads((path / "config.json").read_text()), str(path))

    assert config(vl_dir).accepted_modalities == frozenset({"image", "video"})
    assert config(vl_dir).architecture == "Qwen2VLForConditionalGeneration"
    assert config(random_checkpoint("qwen2")).accepted_modalities == frozenset()
