"""Typed messages between the HTTP frontend and the engine loop.

Encoded as msgpack by msgspec into tagged-union Structs: a payload that is not one
of these messages (garbage, a pickle, a message with a wrong field type) fails to
decode and is dropped by the receiver. Nothing here is ever unpickled.

Outputs travel as the engine makes them, as deltas: each :class:`CompletionDelta`
carries what one step added to a sequence (text only grows: the engine holds back
text that may still become a stop string).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from kvrun.stats import EngineStats

__all__ = [
    "Abort",
    "AddRequest",
    "CompletionDelta",
    "Dead",
    "EngineInfo",
    "EngineMessage",
    "FrontendMessage",
    "Hello",
    "LogprobEntry",
    "Outputs",
    "Ready",
    "Rejected",
    "RequestDelta",
    "Shutdown",
    "Utility",
    "UtilityMethod",
    "UtilityResult",
    "WireArray",
    "WireAudio",
    "WireImage",
    "WireLora",
    "WireMultiModal",
    "WirePooling",
    "WireSampling",
    "WireStructuredOutputs",
    "engine_decoder",
    "frontend_decoder",
]

UNSET = msgspec.UNSET


class _Message(msgspec.Struct, forbid_unknown_fields=True):
    """Base of every message: a field we do not know is a malformed message."""


class WireStructuredOutputs(_Message, omit_defaults=True):
    """A request's StructuredOutputsParams, as the frontend checked it (one constraint)."""

    json: str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


class WireSampling(_Message, omit_defaults=True):
    """The SamplingParams fields a request set; unset ones keep SamplingParams' defaults."""

    n: int | msgspec.UnsetType = UNSET
    temperature: float | msgspec.UnsetType = UNSET
    top_p: float | msgspec.UnsetType = UNSET
    top_k: int | msgspec.UnsetType = UNSET
    min_p: float | msgspec.UnsetType = UNSET
    seed: int | msgspec.UnsetType | None = UNSET
    stop: list[str] | msgspec.UnsetType = UNSET
    stop_token_ids: list[int] | msgspec.UnsetType = UNSET
    max_tokens: int | msgspec.UnsetType | None = UNSET  # None: the room the prompt leaves
    min_tokens: int | msgspec.UnsetType = UNSET
    ignore_eos: bool | msgspec.UnsetType = UNSET
    logprobs: int | msgspec.UnsetType | None = UNSET
    prompt_logprobs: int | msgspec.UnsetType | None = UNSET
    presence_penalty: float | msgspec.UnsetType = UNSET
    frequency_penalty: float | msgspec.UnsetType = UNSET
    repetition_penalty: float | msgspec.UnsetType = UNSET
    logit_bias: dict[int, float] | msgspec.UnsetType = UNSET
    allowed_token_ids: list[int] | msgspec.UnsetType = UNSET
    bad_words: list[str] | msgspec.UnsetType = UNSET
    include_stop_str_in_output: bool | msgspec.UnsetType = UNSET
    skip_special_tokens: bool | msgspec.UnsetType = UNSET
    structured_outputs: WireStructuredOutputs | msgspec.UnsetType = UNSET

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for ``SamplingParams``: only the fields that were set."""
        out = {
            name: value
            for name in self.__struct_fields__
            if (value := getattr(self, name)) is not UNSET
        }
        if isinstance(self.structured_outputs, WireStructuredOutputs):
            from kvrun.structured_output import StructuredOutputsParams

            constraint = self.structured_outputs
            out["structured_outputs"] = StructuredOutputsParams(
                **{name: getattr(constraint, name) for name in constraint.__struct_fields__}
            )
        return out


class WirePooling(_Message, omit_defaults=True):
    """A pooling request's PoolingParams (embeddings, scores)."""

    dimensions: int | None = None
    normalize: bool | None = None
    task: str | None = None


# Media a request carries, decoded by the frontend (kvrun.multimodal.media): raw pixels
# and raw array bytes, never an encoded file the engine would have to parse again.
_WIRE_DTYPES = frozenset({"uint8", "int16", "int32", "float16", "float32", "float64"})
_WIRE_IMAGE_MODES = {"RGB": 3, "RGBA": 4, "L": 1}


class WireArray(_Message, array_like=True):
    """A numpy array: C-order bytes, its dtype's name (one of a closed set) and shape."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def of(cls, array: Any) -> WireArray:
        import numpy as np

        array = np.ascontiguousarray(array)
        return cls(str(array.dtype), list(array.shape), array.tobytes())

    def to_array(self) -> Any:
        """The array; ValueError for a dtype outside the set or bytes that do not fit."""
        import numpy as np

        if self.dtype not in _WIRE_DTYPES or any(d < 0 for d in self.shape):
            raise ValueError(f"a media array of dtype {self.dtype!r} is not accepted")
        dtype = np.dtype(self.dtype)
        if len(self.data) != math.prod(self.shape) * dtype.itemsize:
            raise ValueError("a media array's bytes do not match its shape")
        return np.frombuffer(self.data, dtype=dtype).reshape(self.shape)


class WireImage(_Message, array_like=True):
    """A decoded image: PIL mode (RGB, RGBA or L), size and raw pixel bytes."""

    mode: str
    width: int
    height: int
    data: bytes

    @classmethod
    def of(cls, image: Any) -> WireImage:
        return cls(image.mode, image.size[0], image.size[1], image.tobytes())

    def to_image(self) -> Any:
        from PIL import Image

        channels = _WIRE_IMAGE_MODES.get(self.mode)
        if channels is None or len(self.data) != self.width * self.height * channels:
            raise ValueError("a media image's bytes do not match its mode and size")
        return Image.frombytes(self.mode, (self.width, self.height), self.data)


class WireAudio(_Message, array_like=True):
    samples: WireArray  # float32 [N], mono
    sample_rate: int


class WireMultiModal(_Message, omit_defaults=True):
    """A prompt's media, each kind in the order its placeholders appear in the prompt."""

    image: list[WireImage] = []
    video: list[WireArray] = []  # uint8 [frames, height, width, 3]
    audio: list[WireAudio] = []
    # the request's mm_processor_kwargs (the engine's processor checks them); None: unset
    processor_kwargs: dict[str, Any] | None = None

    def to_data(self) -> dict[str, list[Any]]:
        """The engine's ``multi_modal_data``: {"image": [PIL.Image], "video": [array],
        "audio": [(array, sample_rate)]}, only the kinds present."""
        data: dict[str, list[Any]] = {}
        if self.image:
            data["image"] = [i.to_image() for i in self.image]
        if self.video:
            data["video"] = [v.to_array() for v in self.video]
        if self.audio:
            data["audio"] = [(a.samples.to_array(), a.sample_rate) for a in self.audio]
        return data


# --- frontend -> engine ------------------------------------------------------------


class AddRequest(_Message, tag="add"):
    request_id: str
    prompt_token_ids: list[int]  # already tokenized (and checked) by the frontend
    params: WireSampling
    arrival_time: float  # time.time() at the frontend
    pooling: WirePooling | None = None  # set: a pooling request (params unused)
    lora_name: str | None = None  # the LoRA adapter it runs with (a loaded adapter's name)
    multi_modal_data: WireMultiModal | None = None  # the prompt's media, decoded


class Abort(_Message, tag="abort"):
    request_ids: list[str]


UtilityMethod = Literal[
    "reset_prefix_cache",
    "start_profile",
    "stop_profile",
    "load_lora_adapter",
    "unload_lora_adapter",
]


class WireLora(_Message, omit_defaults=True):
    """The adapter a load or unload call names; the frontend has checked the path."""

    lora_name: str
    lora_path: str = ""  # a real path inside the allowed directories (load only)


class Utility(_Message, tag="utility"):
    call_id: int
    method: UtilityMethod  # a closed set: the engine never looks up a name it was sent
    lora: WireLora | None = None  # the *_lora_adapter methods' argument


class Shutdown(_Message, tag="shutdown"):
    pass


FrontendMessage = AddRequest | Abort | Utility | Shutdown


# --- engine -> frontend ------------------------------------------------------------


class EngineInfo(_Message):
    """What the frontend needs to know about the loaded engine."""

    model_name: str  # the served model name
    model_path: str  # what was loaded (path or repo id)
    max_model_len: int
    vocab_size: int
    max_logprobs: int
    platform_name: str
    attention_backend: str
    dtype: str  # e.g. "float32"
    num_kv_blocks: int
    block_size: int
    id2label: list[str] = []  # a classifier's labels (runner "pooling", convert "classify")
    structured_outputs_backend: str = "xgrammar"  # how the engine compiles constraints
    accepted_modalities: list[str] = []  # media the model takes: "image", "video", "audio"


class Hello(_Message, tag="hello"):
    """Sent as soon as the engine process is up, before the model loads."""

    pid: int


class Ready(_Message, tag="ready"):
    info: EngineInfo


class LogprobEntry(_Message, array_like=True):
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    decoded: str | None  # the engine's decoding, when it made one


class CompletionDelta(_Message, array_like=True):
    """What changed in one of a request's n sequences since the last message."""

    index: int
    text: str  # the text that follows what earlier deltas carried
    token_ids: list[int]  # token ids generated since the last message
    logprobs: list[list[LogprobEntry]] | None  # one entry per new token, chosen first
    cumulative_logprob: float | None
    finish_reason: str | None  # None while running; "stop", "length", "abort"
    stop_reason: int | str | None


class RequestDelta(_Message, array_like=True):
    request_id: str
    completions: list[CompletionDelta]
    finished: bool
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    # Sent once, when the engine first has them: one entry per prompt token, entry 0 None.
    prompt_logprobs: list[list[LogprobEntry] | None] | None = None
    pooled: list[float] | None = None  # a pooling request's vector, in its finished delta
    # The prompt's length as the engine runs it: media placeholders expanded (what
    # usage.prompt_tokens counts); None where no engine said (the server's abort delta).
    num_prompt_tokens: int | None = None


class Rejected(_Message, array_like=True):
    """The engine refused a request: the frontend answers 400 (or 500 for status 500)."""

    request_id: str
    message: str
    param: str | None
    code: str | None
    status: int


class Outputs(_Message, tag="outputs"):
    deltas: list[RequestDelta]
    rejected: list[Rejected]
    stats: EngineStats  # the engine's own record, as it is
    sent_at: float  # time.time() on the engine side, for the frontend's latency metrics


class UtilityResult(_Message, tag="result"):
    call_id: int
    ok: bool
    value: bool | None
    error: str | None
    status: int = 500  # the HTTP status of a failure: 400/404 for a caller's mistake


class Dead(_Message, tag="dead"):
    """The engine loop stopped on an error; ``user_error`` marks a KvrunError at load."""

    message: str
    user_error: bool


EngineMessage = Hello | Ready | Outputs | UtilityResult | Dead


def frontend_decoder() -> msgspec.msgpack.Decoder[FrontendMessage]:
    """Decoder for what the engine receives."""
    return msgspec.msgpack.Decoder(FrontendMessage)  # type: ignore[arg-type]


def engine_decoder() -> msgspec.msgpack.Decoder[EngineMessage]:
    """Decoder for what the frontend receives."""
    return msgspec.msgpack.Decoder(EngineMessage)  # type: ignore[arg-type]
