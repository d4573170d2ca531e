"""A prompt with media -> token ids with expanded placeholders, encoder inputs, M-RoPE.

vLLM's prompt shape: ``{"prompt": str | "prompt_token_ids": [...], "multi_modal_data":
{"image": PIL.Image | [PIL.Image, ...], "video": frames | [frames, ...], "audio": (samples,
rate) | [...]}}`` where one video's frames are a list of PIL images or a ``[T, H, W, 3]``
uint8 array. The prompt holds one placeholder token per item (Qwen2-VL: ``<|image_pad|>``
/ ``<|video_pad|>``, usually between ``<|vision_start|>`` and ``<|vision_end|>``;
Qwen2-Audio: ``<|AUDIO|>`` between ``<|audio_bos|>`` and ``<|audio_eos|>``), in the
order the items are given; each is expanded to as many tokens as the item's encoder
rows, as the model's Hugging Face processor does.

Images go through the checkpoint's image processor (transformers'
``Qwen2VLImageProcessorPil``, read from its preprocessor_config.json: resize to a
multiple of patch x merge within min/max pixels, rescale, normalize, patches ordered
block-major over merge blocks). Videos use the same per-frame processing (transformers'
video processor needs torchvision, which kvrun does not install), then pair consecutive
frames into temporal patches; an odd last frame is repeated, as the video processor does.

Audio goes through the checkpoint's Whisper feature extractor (log-mel over the
encoder's whole window, with the clip's frame count), resampled to its rate first.

Each item's content hash is the sha256 of its decoded pixels (mode, size and bytes of
every frame) or samples, its modality, and the processor settings that were not the
checkpoint's own (``mm_processor_kwargs``): equal hashes give equal encoder inputs here,
so the same image resized otherwise never hits the other size's cached encoding.

``mm_processor_kwargs`` (vLLM's name; the engine's ``LLM(mm_processor_kwargs=...)`` /
``--mm-processor-kwargs``, overridden key by key by a prompt's own) are handed to the
Hugging Face processor: Qwen2-VL / Qwen2.5-VL take ``min_pixels`` and ``max_pixels`` (the
resize bounds of images and video frames, as the image processor's ``size``
``shortest_edge`` / ``longest_edge``); Qwen2-Audio's feature extractor takes none. An
unknown key or a bad value is an error naming it and what is accepted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvrun.errors import ConfigError, ModelLoadError, RequestError
from kvrun.models.config import ModelConfig
from kvrun.multimodal.inputs import MultiModalInputs, MultiModalItem

__all__ = ["VIDEO_FPS", "MultiModalProcessor", "parse_processor_kwargs", "split_media"]

VIDEO_FPS = 2.0  # the frame rate assumed for a video's frames (Qwen2.5-VL's time positions)


def split_media(value: Any, modality: str) -> list[Any]:
    """One modality's value as a list of items: an image is a PIL image (or an [H, W, 3]
    array); a video is a list of PIL images or a [T, H, W, 3] array; an audio clip is
    ``(samples, sample_rate)``; each may come as a list of items."""
    if modality == "image":
        if isinstance(value, list | tuple):
            return list(value)
        return [value]
    if modality == "audio":  # a clip is (samples, rate) or samples; or a list of clips
        if isinstance(value, tuple) and len(value) == 2 and np.isscalar(value[1]):
            return [value]
        if isinstance(value, list) and value and not np.isscalar(value[0]):
            return list(value)
        return [value]
    if isinstance(value, np.ndarray | torch.Tensor):
        return [value] if value.ndim == 4 else list(value)
    if isinstance(value, list | tuple) and value:
        first = value[0]
        if isinstance(first, list | tuple) or (
            isinstance(first, np.ndarray | torch.Tensor) and first.ndim == 4
        ):
            return list(value)  # several videos
        return [list(value)]  # one video's frames
    raise RequestError.invalid(
        "multi_modal_data.video",
        type(value).__name__,
        "a list of PIL images, a [T, H, W, 3] uint8 array, or a list of those",
    )


def _pil(frame: Any, what: str) -> Any:
    """A PIL RGB image from a PIL image or an [H, W, 3] uint8 array."""
    from PIL import Image

    if isinstance(frame, Image.Image):
        return frame.convert("RGB") if frame.mode != "RGB" else frame
    if isinstance(frame, torch.Tensor):
        frame = frame.cpu().numpy()
    if isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[-1] == 3:
        return Image.fromarray(frame.astype(np.uint8), "RGB")
    raise RequestError.invalid(
        what, type(frame).__name__, "a PIL image or an [H, W, 3] uint8 array"
    )


def parse_processor_kwargs(value: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``mm_processor_kwargs`` as given to the engine (a dict, or ``--mm-processor-kwargs``'
    JSON text): the dict; a ConfigError when it is not an object."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"mm_processor_kwargs {value!r} is not JSON ({exc}); accepted: an object "
                "such as '{\"max_pixels\": 200704}'"
            ) from None
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"mm_processor_kwargs {value!r} is not accepted; accepted: an object such as "
            '{"max_pixels": 200704}'
        )
    return dict(value)


def _settings_key(settings: Mapping[str, Any]) -> bytes:
    """What processor settings add to a content hash (nothing for the checkpoint's own)."""
    if not settings:
        return b""
    return b"|settings:" + json.dumps(dict(settings), sort_keys=True).encode()


def _hash_frames(modality: str, frames: Sequence[Any], settings: Mapping[str, Any]) -> str:
    digest = hashlib.sha256(modality.encode())
    digest.update(_settings_key(settings))
    for frame in frames:
        digest.update(f"|{frame.mode}:{frame.size[0]}x{frame.size[1]}|".encode())
        digest.update(frame.tobytes())
    return digest.hexdigest()


class MultiModalProcessor:
    """A multimodal model's processing of media prompts, from the checkpoint directory's
    preprocessor_config.json: Qwen2-VL / Qwen2.5-VL (image, video) or Qwen2-Audio."""

    def __init__(
        self,
        directory: Path,
        config: ModelConfig,
        source: str,
        processor_kwargs: Mapping[str, Any] | str | None = None,
    ) -> None:
        if not (Path(directory) / "preprocessor_config.json").is_file():
            raise ModelLoadError(
                f"{source}: a {config.architecture} checkpoint needs preprocessor_config.json "
                "(its media processor's settings) beside config.json"
            )
        self.config = config
        self.token_ids = {
            "image": config.image_token_id,
            "video": config.video_token_id,
            "audio": config.audio_token_id,
        }
        given = parse_processor_kwargs(processor_kwargs)
        try:
            # the engine's settings, which a prompt's own override key by key
            self.default_kwargs = self._check_kwargs(given, "mm_processor_kwargs")
        except RequestError as exc:
            raise ConfigError(str(exc)) from None
        if config.audio is not None:
            from transformers import WhisperFeatureExtractor

            self.audio_features = WhisperFeatureExtractor.from_pretrained(str(directory))
        if config.vision is None:
            return
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(directory))
        self.merge = int(config.vision["spatial_merge_size"])
        self.temporal_patch_size = int(config.vision["temporal_patch_size"])
        self.patch_size = int(config.vision["patch_size"])
        # Qwen2.5-VL's video time positions: tokens_per_second x the seconds a temporal
        # patch spans (frames given without their rate are taken at VIDEO_FPS, as vLLM's
        # Qwen2.5-VL processing does); Qwen2-VL steps by 1
        per_second = config.vision.get("tokens_per_second")
        self.video_time_interval = (
            float(per_second) * self.temporal_patch_size / VIDEO_FPS if per_second else 1.0
        )

    @property
    def accepted_modalities(self) -> frozenset[str]:
        return self.config.accepted_modalities

    @property
    def accepted_kwargs(self) -> tuple[str, ...]:
        """The ``mm_processor_kwargs`` keys this model's processor takes."""
        return ("max_pixels", "min_pixels") if self.config.vision is not None else ()

    def check_request_kwargs(self, kwargs: Any) -> dict[str, Any]:
        """A prompt's ``mm_processor_kwargs`` checked as :meth:`process` checks them (for a
        prompt without media, where nothing else would): a RequestError naming the key."""
        return self._check_kwargs(kwargs, "mm_processor_kwargs")

    def _check_kwargs(self, kwargs: Any, param: str) -> dict[str, Any]:
        """``kwargs`` checked: known keys, positive int pixel counts, min <= max."""
        if not isinstance(kwargs, Mapping):
            raise RequestError.invalid(param, type(kwargs).__name__, "a dict of settings")
        accepted = self.accepted_kwargs
        for key, value in kwargs.items():
            if key not in accepted:
                takes = ", ".join(accepted) if accepted else "none (it takes no settings)"
                raise RequestError(
                    f"{param} key {key!r} is not a setting of {self.config.architecture}'s "
                    f"processor; accepted: {takes}",
                    param=param,
                )
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise RequestError.invalid(f"{param}.{key}", value, "an int >= 1 (pixels)")
        low, high = kwargs.get("min_pixels"), kwargs.get("max_pixels")
        if low is not None and high is not None and low > high:
            raise RequestError.invalid(f"{param}.min_pixels", low, f"at most max_pixels={high}")
        return dict(kwargs)

    def _resize(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The image processor's call arguments for ``settings`` (its ``size`` bounds)."""
        if not settings:
            return {}
        size = self.image_processor.size
        low = settings.get("min_pixels", size["shortest_edge"])
        high = settings.get("max_pixels", size["longest_edge"])
        if low > high:
            raise RequestError.invalid(
                "mm_processor_kwargs",
                f"min_pixels={low}, max_pixels={high}",
                "min_pixels <= max_pixels (the checkpoint's own bounds are "
                f"{size['shortest_edge']} and {size['longest_edge']})",
            )
        return {"size": {"shortest_edge": low, "longest_edge": high}}

    # media -> encoder inputs ------------------------------------------------------------
    def _image(
        self, image: Any, settings: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], str, int]:
        frame = _pil(image, "multi_modal_data.image")
        out = self.image_processor(images=[frame], return_tensors="pt", **self._resize(settings))
        data = {"pixel_values": out["pixel_values"], "grid_thw": out["image_grid_thw"][0]}
        return data, _hash_frames("image", [frame], settings), self._grid_tokens(data)

    def _grid_tokens(self, data: Mapping[str, torch.Tensor]) -> int:
        return int(data["grid_thw"].prod()) // self.merge**2

    def _audio(
        self, audio: Any, settings: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], str, int]:
        """A clip as ``(samples, sample_rate)`` (or samples at the extractor's rate):
        Whisper's log-mel features padded to the encoder's window, resampled first when
        the rate differs (scipy's polyphase filter)."""
        extractor = self.audio_features
        rate = extractor.sampling_rate
        if isinstance(audio, tuple | list) and len(audio) == 2 and np.isscalar(audio[1]):
            samples, given_rate = audio
        else:
            samples, given_rate = audio, rate
        if isinstance(samples, torch.Tensor):
            samples = samples.cpu().numpy()
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1 or samples.size == 0 or not np.isfinite(samples).all():
            raise RequestError.invalid(
                "multi_modal_data.audio",
                f"an array of shape {tuple(samples.shape)}",
                "(samples, sample_rate) with mono float samples, finite, at least one",
            )
        if int(given_rate) != rate:
            from math import gcd

            from scipy.signal import resample_poly  # type: ignore[import-untyped]

            g = gcd(int(given_rate), rate)
            samples = resample_poly(samples, rate // g, int(given_rate) // g).astype(np.float32)
        window = extractor.n_samples
        if samples.size > window:
            raise RequestError.invalid(
                "multi_modal_data.audio",
                f"{samples.size / rate:.1f} s of audio",
                f"clips of at most {window / rate:g} s (the encoder's window)",
            )
        out = extractor(
            samples,
            sampling_rate=rate,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        frames = int(out["attention_mask"][0].sum())
        length = ((frames - 1) // 2 + 1 - 2) // 2 + 1  # after the stride-2 conv and pooling
        digest = hashlib.sha256(b"audio|" + samples.tobytes() + _settings_key(settings)).hexdigest()
        data = {"input_features": out["input_features"][0], "frames": torch.tensor(frames)}
        return data, digest, length

    def _video(
        self, video: Any, settings: Mapping[str, Any]
    ) -> tuple[dict[str, torch.Tensor], str, int]:
        frames = [_pil(f, "multi_modal_data.video") for f in video]
        if not frames:
            raise RequestError.invalid("multi_modal_data.video", "[]", "at least one frame")
        tps = self.temporal_patch_size
        frames += [frames[-1]] * (-len(frames) % tps)  # pad to whole temporal patches
        out = self.image_processor(images=frames, return_tensors="pt", **self._resize(settings))
        grids = out["image_grid_thw"]
        if not bool((grids == grids[0]).all()):
            raise RequestError.invalid(
                "multi_modal_data.video",
                "frames of different sizes",
                "frames that all have the same size",
            )
        _, h, w = (int(x) for x in grids[0].tolist())
        ps, channels = self.patch_size, out["pixel_values"].shape[1] // (tps * self.patch_size**2)
        # each frame's patches with its pixels repeated tps times; keep one copy and put
        # tps consecutive frames in the temporal slots instead
        per_frame = out["pixel_values"].view(len(frames), h * w, channels, tps, ps, ps)[:, :, :, 0]
        grouped = per_frame.view(len(frames) // tps, tps, h * w, channels, ps, ps)
        patches = grouped.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * tps * ps * ps)
        grid = torch.tensor([len(frames) // tps, h, w], dtype=torch.int64)
        data = {"pixel_values": patches.contiguous(), "grid_thw": grid}
        return data, _hash_frames("video", frames, settings), self._grid_tokens(data)

    # the prompt -----------------------------------------------------------------------
    def process(
        self,
        token_ids: Sequence[int],
        multi_modal_data: Mapping[str, Any],
        processor_kwargs: Mapping[str, Any] | None = None,
    ) -> tuple[list[int], MultiModalInputs]:
        """Expand each placeholder of ``token_ids`` for its item; build items and M-RoPE.
        ``processor_kwargs``: the prompt's ``mm_processor_kwargs``, over the engine's."""
        settings = self.default_kwargs
        if processor_kwargs is not None:
            settings = {**settings, **self._check_kwargs(processor_kwargs, "mm_processor_kwargs")}
        if not isinstance(multi_modal_data, Mapping):
            raise RequestError.invalid(
                "multi_modal_data", type(multi_modal_data).__name__, "a dict of modality: media"
            )
        unknown = sorted(set(multi_modal_data) - self.accepted_modalities)
        if unknown:
            raise RequestError.invalid(
                "multi_modal_data",
                ", ".join(unknown),
                f"the modalities {self.config.architecture} accepts: "
                f"{', '.join(sorted(self.accepted_modalities))}",
            )
        processed: dict[str, list[tuple[dict[str, torch.Tensor], str, int]]] = {}
        encoders = {"image": self._image, "video": self._video, "audio": self._audio}
        for modality, value in multi_modal_data.items():
            encode = encoders[modality]
            processed[modality] = [encode(item, settings) for item in split_media(value, modality)]
        for modality, given in processed.items():
            found = sum(1 for t in token_ids if t == self.token_ids[modality])
            if found != len(given):
                raise RequestError.invalid(
                    "multi_modal_data",
                    f"{len(given)} {modality} item(s) for {found} placeholder(s)",
                    f"one {modality} placeholder token (id {self.token_ids[modality]}) in the "
                    f"prompt per {modality} item",
                )
        expanded: list[int] = []
        items: list[MultiModalItem] = []
        cursor = {modality: 0 for modality in processed}
        by_token = {self.token_ids[m]: m for m in processed}
        for token in token_ids:
            kind = by_token.get(token)
            if kind is None:
                expanded.append(token)
                continue
            data, content_hash, length = processed[kind][cursor[kind]]
            cursor[kind] += 1
            items.append(MultiModalItem(kind, content_hash, len(expanded), length, data))
            expanded.extend([token] * length)
        if not self.config.mrope_section:  # ordinary rotary (Qwen2-Audio)
            return expanded, MultiModalInputs(tuple(items))
        positions, delta = self.mrope_positions(len(expanded), items)
        return expanded, MultiModalInputs(tuple(items), positions, delta)

    def mrope_positions(
        self, prompt_len: int, items: Sequence[MultiModalItem]
    ) -> tuple[torch.Tensor, int]:
        """[3, prompt_len] (t, h, w) positions and the rope delta of later tokens.

        Text runs count on from the last position; an item starting at position s puts
        its (t, h, w) grid cell at (s + t * interval, s + h, s + w) over the merged grid
        (interval 1, or Qwen2.5-VL's video time interval); the text after it starts one
        past the largest position so far (Qwen2-VL's rule).
        """
        parts: list[torch.Tensor] = []
        next_position = 0
        index = 0
        for item in items:
            if item.offset > index:  # the text before the item
                run = torch.arange(item.offset - index, dtype=torch.int64) + next_position
                parts.append(run.expand(3, -1))
                next_position += item.offset - index
            t, h, w = (int(x) for x in item.data["grid_thw"].tolist())
            h, w = h // self.merge, w // self.merge
            interval = self.video_time_interval if item.modality == "video" else 1.0
            times = (torch.arange(t) * interval).long()
            grid = torch.stack(
                torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
            ).reshape(3, -1)
            parts.append(grid + next_position)
            next_position += max(int(times[-1]) + 1, h, w)
            index = item.end
        if prompt_len > index:
            run = torch.arange(prompt_len - index, dtype=torch.int64) + next_position
            parts.append(run.expand(3, -1))
            next_position += prompt_len - index
        positions = torch.cat(parts, dim=1).contiguous()
        return positions, next_position - prompt_len
