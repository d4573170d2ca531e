"""Typed messages between the multiprocess executor and its workers (msgpack, no pickle).

Every message is a msgspec Struct in a tagged union: the tag (field ``type``) names the
message, the Struct is its schema, and a payload that is not one of these messages (an
unknown tag, a missing or mistyped field, a pickle) fails to decode with a
:class:`MessageError` naming what is wrong. Tensors travel as raw bytes with their dtype
and shape (:class:`TensorBlob`); a step's logits travel outside the message, which
names where: from the mp executor's driver rank in its shared result area
(:class:`SharedTensor`, :mod:`kvrun.executor.result_area`), from the Ray executor's as
numpy arrays beside the message (:class:`AttachedTensor`).

Directions:
- executor -> every worker, over the shared-memory broadcast (:data:`Broadcast`):
  :class:`InitKVCache`, :class:`ExecuteStep`, :class:`CommitKVCache`, :class:`Shutdown`;
- worker -> executor, over each worker's reply pipe (:data:`Reply`): :class:`WorkerReady`,
  :class:`KVCacheReady`, :class:`StepResult` (driver rank only; the other ranks send
  nothing per step), :class:`Committed`, :class:`WorkerFailed`;
- :class:`WorkerStart`: what a worker process is started with.

A step (:func:`step_message`) carries, besides its chunks, its LoRA plan
(:class:`LoraStep`: each chunk's adapter slot, the adapters each rank reads from their
path into slots first, those removed since the last step; the engine's
:class:`~kvrun.lora.slots.ExecutorLoras` decides) and each media chunk's inputs
(:class:`WireMedia`): pixel arrays or audio features travel as :class:`TensorBlob` inside
the step, which the mp executor's shared-memory ring carries in as many frames as it
takes, and only for the chunks whose tokens cover the item (a later chunk of the same
request sends the item without its data: the ranks' encoder caches hold its rows, and a
chunk that covers none of an item's rows never encodes it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import torch

from kvrun.engine.batch import StepLogits
from kvrun.lora.request import LoRARequest
from kvrun.lora.slots import ExecutorLoras
from kvrun.multimodal.inputs import MultiModalInputs, MultiModalItem
from kvrun.scheduling.output import ScheduledChunk

__all__ = [
    "AttachedTensor",
    "Broadcast",
    "ChannelHandle",
    "CommitKVCache",
    "Committed",
    "ExecuteStep",
    "InitKVCache",
    "KVCacheReady",
    "LoraLoad",
    "LoraStep",
    "MessageError",
    "Reply",
    "SharedTensor",
    "Shutdown",
    "StepLogitsMessage",
    "StepResult",
    "TensorBlob",
    "TensorRef",
    "WireChunk",
    "WireMedia",
    "WireMediaItem",
    "WorkerFailed",
    "WorkerReady",
    "WorkerStart",
    "chunk_from_wire",
    "chunk_to_wire",
    "decode_broadcast",
    "decode_reply",
    "decode_start",
    "dtype_named",
    "encode",
    "lora_request",
    "pack_step_logits",
    "pack_tensor",
    "step_message",
    "unpack_step_logits",
    "unpack_tensor",
]

# Tensor dtypes that may cross the boundary, by name.
_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}


class MessageError(RuntimeError):
    """A payload that is not a well-formed message of the expected union."""


class _Message(msgspec.Struct, forbid_unknown_fields=True, tag_field="type"):
    """Base of every message: tagged by ``type``; a field we do not know is malformed."""


class TensorBlob(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="blob"):
    """A tensor as raw bytes: ``data`` holds prod(shape) elements of ``dtype``, C order."""

    dtype: str  # a key of _DTYPES
    shape: list[int]
    data: bytes


class SharedTensor(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="shared"):
    """A tensor the driver rank placed in the executor's result area: prod(shape)
    elements of ``dtype``, C order, from byte ``offset`` (kvrun.executor.result_area)."""

    dtype: str  # a key of _DTYPES
    shape: list[int]
    offset: int


class AttachedTensor(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="attached"):
    """A tensor that travels beside the message as an array of its own, the ``index``-th
    (the Ray executor's driver rank: Ray's object store carries a numpy array without
    the copies of bytes inside msgpack)."""

    dtype: str  # a key of _DTYPES
    shape: list[int]
    index: int


# where a reply's tensor is: in the message, in the mp result area, or beside the message
TensorRef = TensorBlob | SharedTensor | AttachedTensor


# --- executor -> workers (the broadcast) ------------------------------------------------
class InitKVCache(_Message, tag="init_kv_cache"):
    """Allocate the KV cache: the minimum of the ranks' block counts."""

    num_blocks: int


class WireMediaItem(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """A MultiModalItem's fields; ``data`` (the encoder's inputs, e.g. Qwen2-VL's
    pixel_values and grid_thw) is empty when the chunk covers none of its rows."""

    modality: str
    content_hash: str
    offset: int
    length: int
    data: dict[str, TensorBlob]


class WireMedia(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """A chunk's MultiModalInputs: its items, and its M-RoPE positions when the chunk
    reads them (a chunk past the prompt needs only ``prompt_len`` and the delta)."""

    items: list[WireMediaItem]
    prompt_len: int
    mrope_positions: TensorBlob | None  # [3, prompt_len] int64, or None (see above)
    has_mrope: bool  # the model's media have M-RoPE positions
    mrope_delta: int


class WireChunk(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """A ScheduledChunk's fields (kvrun.scheduling.output says what each means)."""

    request_id: str
    token_ids: list[int]
    start_position: int
    block_ids: list[int]
    samples: bool
    is_prefill: bool
    lora_id: int
    media: WireMedia | None = None


class LoraLoad(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """Read adapter ``lora_int_id`` from ``lora_path`` into ``slot`` (replacing what the
    slot held) before the step runs; every rank reads the file and keeps its shard."""

    slot: int
    lora_int_id: int
    lora_name: str
    lora_path: str


class LoraStep(msgspec.Struct, forbid_unknown_fields=True):
    """A step's adapters (kvrun.lora.slots.LoraStepPlan)."""

    slots: list[int]  # per chunk: its adapter's slot, -1 for none
    loads: list[LoraLoad]
    forget: list[int]  # adapter ids removed from the engine (ranks drop their copies)


class ExecuteStep(_Message, tag="execute"):
    """One scheduler step, as StepRunner.execute takes it."""

    step: int  # counts up from 0; the driver's StepResult names it
    chunks: list[WireChunk]
    prompt_logits_for: frozenset[str]
    hidden_for: frozenset[str]
    lora: LoraStep | None = None  # None: no engine adapters (enable_lora=False)


class CommitKVCache(_Message, tag="commit_kv_cache"):
    """Write every byte of this rank's KV cache once (StepRunner.commit_kv_cache)."""


class Shutdown(_Message, tag="shutdown"):
    """Close the worker and exit."""


Broadcast = InitKVCache | ExecuteStep | CommitKVCache | Shutdown


# --- workers -> executor (each worker's reply pipe) -------------------------------------
class WorkerReady(_Message, tag="ready"):
    """Distributed init and model load done; the blocks this rank's KV budget holds."""

    rank: int
    kv_cache_blocks: int


class KVCacheReady(_Message, tag="kv_cache_ready"):
    rank: int


class StepLogitsMessage(msgspec.Struct, forbid_unknown_fields=True):
    """A StepLogits (fields as its own) with its tensors as blobs or, the logits, in the
    result area; hidden states (which pooling keeps across steps) always as blobs."""

    logits: TensorRef
    request_ids: list[str]
    prompt_logits: dict[str, TensorRef]
    hidden: dict[str, TensorBlob]


class StepResult(_Message, tag="step_result"):
    """The driver rank's output of step ``step``."""

    step: int
    logits: StepLogitsMessage


class Committed(_Message, tag="committed"):
    rank: int
    nbytes: int  # bytes of KV cache this rank wrote


class WorkerFailed(_Message, tag="failed"):
    """A worker's exception; it exits right after sending this."""

    rank: int
    phase: str  # "start-up", "init_kv_cache", "execute", ...
    error: str  # the exception's type and message
    traceback: str
    user_error: bool  # the exception was a KvrunError (a bad setting, an unreachable peer)


Reply = WorkerReady | KVCacheReady | StepResult | Committed | WorkerFailed


# --- what a worker process starts with --------------------------------------------------
class ChannelHandle(msgspec.Struct, forbid_unknown_fields=True):
    """How a reader attaches to a broadcast ring (kvrun.executor.shm_channel)."""

    name: str  # the shared-memory segment's name (/dev/shm/<name>)
    num_readers: int
    num_slots: int
    slot_bytes: int


class WorkerStart(_Message, tag="start"):
    """Everything a worker process needs: its WorkerSpec's fields, the engine options,
    the environment, and where its channels are."""

    rank: int
    local_rank: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    init_method: str
    is_driver: bool
    engine_args: dict[str, Any]  # EngineArgs' fields (plain data)
    env: dict[str, str]  # the variables the engine was started with, LOCAL_RANK set
    threads: int  # torch/OpenMP threads for this worker
    dist_timeout_s: float  # bound on the distributed rendezvous
    channel: ChannelHandle
    reader_index: int  # this worker's reader slot in the channel
    doorbell_fd: int  # read end of this worker's wake-up pipe (EOF: the executor is gone)
    reply_fd: int  # write end of this worker's reply pipe
    parent_pid: int
    started_by_main_thread: bool  # PR_SET_PDEATHSIG is safe (it follows the starting thread)
    result_fd: int = -1  # the driver rank's: its result area (kvrun.executor.result_area)


_encoder = msgspec.msgpack.Encoder()
_broadcast_decoder = msgspec.msgpack.Decoder(Broadcast)
_reply_decoder = msgspec.msgpack.Decoder(Reply)
_start_decoder = msgspec.msgpack.Decoder(WorkerStart)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def _decode(decoder: msgspec.msgpack.Decoder[Any], payload: bytes, what: str) -> Any:
    try:
        return decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        tags = ", ".join(sorted(_tags(decoder.type)))
        raise MessageError(
            f"{len(payload)} bytes are not a valid {what} message ({exc}); accepted "
            f"message types: {tags}"
        ) from None


def _tags(union: Any) -> list[str]:
    members = getattr(union, "__args__", (union,))
    return [str(m.__struct_config__.tag) for m in members]


def decode_broadcast(payload: bytes) -> Broadcast:
    """An executor -> worker message; MessageError for anything else."""
    message: Broadcast = _decode(_broadcast_decoder, payload, "executor-to-worker")
    return message


def decode_reply(payload: bytes) -> Reply:
    """A worker -> executor message; MessageError for anything else."""
    message: Reply = _decode(_reply_decoder, payload, "worker-to-executor")
    return message


def decode_start(payload: bytes) -> WorkerStart:
    message: WorkerStart = _decode(_start_decoder, payload, "worker start")
    return message


def step_message(
    step: int,
    chunks: Sequence[ScheduledChunk],
    prompt_logits_for: frozenset[str],
    hidden_for: frozenset[str],
    lora: ExecutorLoras | None = None,
) -> ExecuteStep:
    """The ExecuteStep of one scheduler step; ``lora`` (the engine's adapters, when
    enable_lora) places the chunks' adapters in the ranks' slots."""
    plan = None
    if lora is not None:
        decided = lora.plan([c.lora_id for c in chunks])
        plan = LoraStep(
            decided.slots,
            [LoraLoad(s, r.lora_int_id, r.lora_name, r.lora_path) for s, r in decided.loads],
            decided.forget,
        )
    wire = [chunk_to_wire(c) for c in chunks]
    return ExecuteStep(step, wire, prompt_logits_for, hidden_for, plan)


def lora_request(load: LoraLoad) -> LoRARequest:
    return LoRARequest(load.lora_name, load.lora_int_id, load.lora_path)


def chunk_to_wire(chunk: ScheduledChunk) -> WireChunk:
    media = chunk.multi_modal
    return WireChunk(
        chunk.request_id,
        chunk.token_ids,
        chunk.start_position,
        chunk.block_ids,
        chunk.samples,
        chunk.is_prefill,
        chunk.lora_id,
        None if media is None else _media_to_wire(media, chunk),
    )


def chunk_from_wire(wire: WireChunk) -> ScheduledChunk:
    return ScheduledChunk(
        request_id=wire.request_id,
        token_ids=wire.token_ids,
        start_position=wire.start_position,
        block_ids=wire.block_ids,
        samples=wire.samples,
        is_prefill=wire.is_prefill,
        lora_id=wire.lora_id,
        multi_modal=None if wire.media is None else _media_from_wire(wire.media),
    )


def _media_to_wire(media: MultiModalInputs, chunk: ScheduledChunk) -> WireMedia:
    start, end = chunk.start_position, chunk.start_position + chunk.num_tokens
    items = [
        WireMediaItem(
            item.modality,
            item.content_hash,
            item.offset,
            item.length,
            # only a chunk that covers some of the item's rows may encode it
            {k: pack_tensor(v) for k, v in item.data.items()}
            if max(start, item.offset) < min(end, item.end)
            else {},
        )
        for item in media.items
    ]
    positions = media.mrope_positions
    prompt_len = positions.shape[1] if positions is not None else 0
    return WireMedia(
        items,
        prompt_len,
        pack_tensor(positions) if positions is not None and start < prompt_len else None,
        positions is not None,
        media.mrope_delta,
    )


def _media_from_wire(wire: WireMedia) -> MultiModalInputs:
    positions = None
    if wire.mrope_positions is not None:
        positions = unpack_tensor(wire.mrope_positions)
        if tuple(positions.shape) != (3, wire.prompt_len):
            raise MessageError(
                f"M-RoPE positions of shape {tuple(positions.shape)} for a prompt of "
                f"{wire.prompt_len} tokens; accepted: (3, {wire.prompt_len})"
            )
    elif wire.has_mrope:
        # a chunk past the prompt reads only the prompt's length (and the delta): a
        # [3, prompt_len] view of one element, never read (MultiModalInputs.positions)
        positions = torch.zeros((1, 1), dtype=torch.int64).expand(3, wire.prompt_len)
    items = tuple(
        MultiModalItem(
            item.modality,
            item.content_hash,
            item.offset,
            item.length,
            {k: unpack_tensor(v) for k, v in item.data.items()},
        )
        for item in wire.items
    )
    return MultiModalInputs(items, positions, wire.mrope_delta)


def dtype_named(name: str) -> torch.dtype:
    """The dtype a message names; MessageError for one that may not cross."""
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise MessageError(f"tensor dtype {name!r} is not known; accepted: {', '.join(_DTYPES)}")
    return dtype


def pack_tensor(tensor: torch.Tensor) -> TensorBlob:
    """The tensor's bytes (moved to host memory, made contiguous)."""
    name = str(tensor.dtype).removeprefix("torch.")
    dtype_named(name)
    host = tensor.detach().to("cpu").contiguous()
    data = host.view(torch.uint8).numpy().tobytes() if host.numel() else b""
    return TensorBlob(name, list(host.shape), data)


def unpack_tensor(blob: TensorBlob) -> torch.Tensor:
    """A tensor owning a copy of the blob's bytes."""
    dtype = dtype_named(blob.dtype)
    count = 1
    for d in blob.shape:
        count *= d
    if count * torch.empty((), dtype=dtype).element_size() != len(blob.data):
        raise MessageError(
            f"a {blob.dtype} tensor of shape {blob.shape} needs "
            f"{count * torch.empty((), dtype=dtype).element_size()} bytes, got {len(blob.data)}"
        )
    if not blob.data:
        return torch.empty(blob.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(blob.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(blob.shape)


def pack_step_logits(
    out: StepLogits,
    place: Callable[[torch.Tensor], TensorRef] = pack_tensor,
) -> StepLogitsMessage:
    """The message of ``out``; ``place`` puts the logits and prompt logits where they
    travel (a result area's ``place``; by default as blobs in the message)."""
    return StepLogitsMessage(
        logits=place(out.logits),
        request_ids=list(out.request_ids),
        prompt_logits={k: place(v) for k, v in out.prompt_logits.items()},
        hidden={k: pack_tensor(v) for k, v in out.hidden.items()},
    )


def unpack_step_logits(
    message: StepLogitsMessage,
    outside: Callable[[SharedTensor | AttachedTensor], torch.Tensor] | None = None,
) -> StepLogits:
    """The StepLogits of ``message``; ``outside`` reads a tensor the message only points
    to (the mp result area's ``tensor``; the Ray executor's attached arrays).
    MessageError for such a tensor where there is no reader."""

    def tensor(item: TensorRef) -> torch.Tensor:
        if isinstance(item, TensorBlob):
            return unpack_tensor(item)
        if outside is None:
            raise MessageError(
                f"a reply names a tensor outside the message ({type(item).__name__}), and "
                "this executor has nowhere to read it from"
            )
        return outside(item)

    return StepLogits(
        logits=tensor(message.logits),
        request_ids=list(message.request_ids),
        prompt_logits={k: tensor(v) for k, v in message.prompt_logits.items()},
        hidden={k: unpack_tensor(v) for k, v in message.hidden.items()},
    )
