"""Decoding fetched media into the items a model's processor takes, with content hashes.

- Images: Pillow, converted to RGB (as vLLM's default ``image_mode``); a
  :class:`PIL.Image.Image`.
- Video: PyAV (FFmpeg); at most ``num_frames`` frames (default 32, vLLM's) sampled
  evenly over the whole clip, as one ``uint8`` array ``[frames, height, width, 3]`` (RGB).
- Audio: PyAV, any container/codec FFmpeg reads (wav, mp3, flac, ogg); channels
  averaged to mono ``float32`` at the file's own sample rate: ``(samples, sample_rate)``. The
  model's processor resamples to its rate.

Decoding is CPU work: callers on an event loop run these in a worker thread. Every
decoder bounds what it produces (:data:`MAX_IMAGE_PIXELS`, :data:`MAX_VIDEO_BYTES`,
:data:`MAX_AUDIO_SAMPLES`) so a small file cannot expand without limit, and raises
:class:`MediaDecodeError` with a message that is safe to show.

:func:`content_hash` is the identity of a decoded item (sha256 of its kind, shape,
dtype/mode and bytes): equal items hash alike whatever URL or encoding they came from.
The engine's prefix cache and encoder cache key media by it.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kvrun.errors import KvrunError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "AUDIO_FORMATS",
    "DEFAULT_NUM_FRAMES",
    "MAX_AUDIO_SAMPLES",
    "MAX_IMAGE_PIXELS",
    "MAX_VIDEO_BYTES",
    "AudioItem",
    "ImageItem",
    "MediaDecodeError",
    "VideoItem",
    "content_hash",
    "decode_audio",
    "decode_image",
    "decode_video",
]

MAX_IMAGE_PIXELS = 8192 * 8192
MAX_VIDEO_BYTES = 256 << 20  # the sampled frames together, decoded
MAX_VIDEO_FRAMES_READ = 100_000  # frames demuxed/decoded to reach the sampled ones
MAX_AUDIO_SAMPLES = 48_000 * 60 * 30  # 30 minutes at 48 kHz
DEFAULT_NUM_FRAMES = 32
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class MediaDecodeError(KvrunError):
    """Bytes that are not a readable image, video or audio clip (or decode too large)."""


@dataclass(frozen=True)
class ImageItem:
    image: Image
    hash: str


@dataclass(frozen=True)
class VideoItem:
    frames: np.ndarray  # uint8 [T, H, W, 3], RGB
    hash: str


@dataclass(frozen=True)
class AudioItem:
    samples: np.ndarray  # float32 [N], mono
    sample_rate: int
    hash: str


def content_hash(item: Any) -> str:
    """sha256 (hex) of a decoded item: a PIL image, an array, or ``(array, sample_rate)``."""
    digest = hashlib.sha256()
    if isinstance(item, tuple):
        samples, rate = item
        digest.update(f"audio:{int(rate)}:".encode())
        _hash_array(digest, np.asarray(samples))
    elif isinstance(item, np.ndarray):
        digest.update(b"array:")
        _hash_array(digest, item)
    else:  # a PIL image
        digest.update(f"image:{item.mode}:{item.size[0]}x{item.size[1]}:".encode())
        digest.update(item.tobytes())
    return digest.hexdigest()


def _hash_array(digest: Any, array: np.ndarray) -> None:
    digest.update(f"{array.dtype.str}:{array.shape}:".encode())
    digest.update(np.ascontiguousarray(array).tobytes())


def decode_image(data: bytes) -> ImageItem:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise MediaDecodeError(
                    f"the image is {width}x{height}, more than {MAX_IMAGE_PIXELS} pixels"
                )
            image = opened.convert("RGB")  # loads it
    except MediaDecodeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise MediaDecodeError("the data is not an image Pillow can read") from None
    return ImageItem(image, content_hash(image))


def _open_container(data: bytes, what: str) -> Any:
    import av

    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, ValueError, OSError):
        raise MediaDecodeError(f"the data is not {what} FFmpeg can read") from None


def decode_video(data: bytes, num_frames: int = DEFAULT_NUM_FRAMES) -> VideoItem:
    """At most ``num_frames`` frames spread evenly over the clip (all when fewer)."""
    import av

    container = _open_container(data, "a video")
    try:
        if not container.streams.video:
            raise MediaDecodeError("the data holds no video stream")
        stream = container.streams.video[0]
        total = 0  # packets with data: one frame each for video codecs
        for packet in container.demux(stream):
            total += packet.size > 0
            if total > MAX_VIDEO_FRAMES_READ:
                break
        if total > MAX_VIDEO_FRAMES_READ:
            raise MediaDecodeError(f"the video has more than {MAX_VIDEO_FRAMES_READ} frames")
        if total == 0:
            raise MediaDecodeError("the video has no frames")
        wanted = set(np.linspace(0, total - 1, min(num_frames, total)).round().astype(int))
        container.seek(0)
        frames: list[np.ndarray] = []
        size = 0
        for index, frame in enumerate(container.decode(stream)):
            if index >= MAX_VIDEO_FRAMES_READ:
                break
            if index in wanted:
                array = frame.to_ndarray(format="rgb24")
                size += array.nbytes
                if size > MAX_VIDEO_BYTES:
                    raise MediaDecodeError(
                        f"the video's sampled frames decode to more than {MAX_VIDEO_BYTES} bytes"
                    )
                frames.append(array)
    except MediaDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError):
        raise MediaDecodeError("the video could not be decoded") from None
    finally:
        container.close()
    if not frames or len({f.shape for f in frames}) != 1:
        raise MediaDecodeError("the video's frames could not be decoded alike")
    stacked = np.stack(frames)
    return VideoItem(stacked, content_hash(stacked))


def decode_audio(data: bytes) -> AudioItem:
    import av

    container = _open_container(data, "audio")
    try:
        if not container.streams.audio:
            raise MediaDecodeError("the data holds no audio stream")
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate or stream.rate
        if not rate:
            raise MediaDecodeError("the audio has no sample rate")
        # planar float32 at the file's rate and layout; channels averaged here (as
        # librosa's mono=True, which vLLM uses), not FFmpeg's -3 dB downmix
        resampler = av.AudioResampler(format="fltp", rate=rate)
        chunks: list[np.ndarray] = []
        count = 0
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunk = out.to_ndarray().mean(axis=0, dtype=np.float32)
                count += chunk.size
                if count > MAX_AUDIO_SAMPLES:
                    raise MediaDecodeError(f"the audio is longer than {MAX_AUDIO_SAMPLES} samples")
                chunks.append(chunk)
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0, dtype=np.float32))
    except MediaDecodeError:
        raise
    except (av.FFmpegError, ValueError, OSError):
        raise MediaDecodeError("the audio could not be decoded") from None
    finally:
        container.close()
    if not chunks:
        raise MediaDecodeError("the audio has no samples")
    samples = np.concatenate(chunks).astype(np.float32, copy=False)
    return AudioItem(samples, int(rate), content_hash((samples, int(rate))))
