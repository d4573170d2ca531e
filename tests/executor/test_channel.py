"""The mp executor's typed messages and its shared-memory broadcast ring, on their own:
round trips of every message type, refusals, wrap-around with forked readers, a lagging
reader's warning, and the segment's removal."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import msgspec
import pytest
import torch

from kvrun.config import EngineArgs, check_parallelism
from kvrun.engine.batch import StepLogits
from kvrun.envs import read_env
from kvrun.errors import ConfigError
from kvrun.executor import messages as m
from kvrun.executor.processes import check_start_method
from kvrun.executor.shm_channel import (
    SEGMENT_PREFIX,
    BroadcastReader,
    BroadcastWriter,
    ChannelClosed,
    ChannelTimeout,
)
from kvrun.scheduling.output import ScheduledChunk

CHUNKS = [
    ScheduledChunk("req-a", [1, 2, 3], 0, [4, 9], samples=True, is_prefill=True),
    ScheduledChunk("req-b", [7], 40, [0, 1, 2], samples=False, is_prefill=False, lora_id=3),
]


def _handle() -> m.ChannelHandle:
    return m.ChannelHandle("kvrun_mp_1_ab", 2, 16, 1 << 20)


@pytest.mark.parametrize(
    "message",
    [
        m.InitKVCache(123),
        m.ExecuteStep(7, [m.chunk_to_wire(c) for c in CHUNKS], frozenset({"req-a"}), frozenset()),
        m.CommitKVCache(),
        m.Shutdown(),
    ],
)
def test_every_broadcast_message_round_trips(message: msgspec.Struct) -> None:
    assert m.decode_broadcast(m.encode(message)) == message


def test_chunks_round_trip_field_for_field() -> None:
    step = m.ExecuteStep(0, [m.chunk_to_wire(c) for c in CHUNKS], frozenset(), frozenset({"x"}))
    decoded = m.decode_broadcast(m.encode(step))
    assert isinstance(decoded, m.ExecuteStep)
    assert [m.chunk_from_wire(w) for w in decoded.chunks] == CHUNKS
    assert decoded.hidden_for == frozenset({"x"})


def test_every_reply_message_round_trips() -> None:
    logits = StepLogits(
        logits=torch.randn(2, 11),
        request_ids=["a", "b"],
        prompt_logits={"a": torch.randn(3, 11)},
        hidden={"c": torch.randn(4, 5, dtype=torch.bfloat16)},
    )
    replies = [
        m.WorkerReady(1, 512),
        m.KVCacheReady(0),
        m.StepResult(3, m.pack_step_logits(logits)),
        m.Committed(1, 4096),
        m.WorkerFailed(1, "load_model", "ConfigError: bad", "Traceback ...", user_error=True),
    ]
    for reply in replies:
        assert m.decode_reply(m.encode(reply)) == reply
    back = m.unpack_step_logits(m.pack_step_logits(logits))
    assert torch.equal(back.logits, logits.logits)
    assert torch.equal(back.prompt_logits["a"], logits.prompt_logits["a"])
    assert back.hidden["c"].dtype == torch.bfloat16
    assert torch.equal(back.hidden["c"], logits.hidden["c"])
    assert back.request_ids == ["a", "b"]


def test_the_worker_start_message_round_trips() -> None:
    start = m.WorkerStart(
        rank=1, local_rank=1, tensor_parallel_size=2, pipeline_parallel_size=1,
        init_method="tcp://127.0.0.1:29500", is_driver=False,
        engine_args=msgspec.to_builtins(EngineArgs(model="x", tensor_parallel_size=2)),
        env={"VLLM_TARGET_DEVICE": "cpu", "LOCAL_RANK": "1"}, threads=1, dist_timeout_s=5.0,
        channel=_handle(), reader_index=1, doorbell_fd=7, reply_fd=9, parent_pid=1,
        started_by_main_thread=True,
    )  # fmt: skip
    decoded = m.decode_start(m.encode(start))
    assert decoded == start
    assert EngineArgs(**decoded.engine_args) == EngineArgs(model="x", tensor_parallel_size=2)


def test_an_unknown_tag_a_wrong_direction_and_a_pickle_are_refused() -> None:
    with pytest.raises(m.MessageError, match=r"'bogus'.*accepted message types: commit_kv_cache, "):
        m.decode_broadcast(msgspec.msgpack.encode({"type": "bogus", "step": 1}))
    with pytest.raises(m.MessageError, match="Invalid value 'ready'"):
        m.decode_broadcast(m.encode(m.WorkerReady(0, 1)))
    with pytest.raises(m.MessageError, match="not a valid worker-to-executor message"):
        m.decode_reply(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00N.")  # pickle of None
    with pytest.raises(m.MessageError, match="Object contains unknown field `extra`"):
        m.decode_broadcast(msgspec.msgpack.encode({"type": "shutdown", "extra": 1}))
    blob = m.TensorBlob("float32", [2, 2], b"\x00" * 12)
    with pytest.raises(m.MessageError, match="needs 16 bytes, got 12"):
        m.unpack_tensor(blob)
    with pytest.raises(m.MessageError, match="tensor dtype 'complex64' is not known"):
        m.unpack_tensor(m.TensorBlob("complex64", [1], b"\x00" * 8))


def test_media_chunks_travel_with_the_data_of_the_items_they_cover() -> None:
    from kvrun.multimodal.inputs import MultiModalInputs, MultiModalItem

    pixels = torch.arange(24, dtype=torch.float32).view(4, 6)
    item = MultiModalItem("image", "ab" * 32, 2, 4, {"pixel_values": pixels,
                          "grid_thw": torch.tensor([1, 2, 2])})  # fmt: skip
    positions = torch.arange(24, dtype=torch.int64).view(3, 8)
    media = MultiModalInputs((item,), positions, -3)

    def round_trip(start: int, count: int) -> ScheduledChunk:
        chunk = ScheduledChunk("r", list(range(count)), start, [0], samples=True,
                               is_prefill=True, multi_modal=media)  # fmt: skip
        step = m.step_message(0, [chunk], frozenset(), frozenset())
        decoded = m.decode_broadcast(m.encode(step))
        assert isinstance(decoded, m.ExecuteStep) and decoded.lora is None
        return m.chunk_from_wire(decoded.chunks[0])

    inside = round_trip(0, 4).multi_modal  # covers rows 2, 3 of the item
    assert inside is not None and inside.mrope_delta == -3
    assert torch.equal(inside.items[0].data["pixel_values"], pixels)
    assert torch.equal(inside.items[0].data["grid_thw"], torch.tensor([1, 2, 2]))
    assert torch.equal(inside.mrope_positions, positions)  # type: ignore[arg-type]
    assert inside.cache_salt == media.cache_salt
    after = round_trip(6, 2).multi_modal  # past the item: its data stays behind
    assert after is not None and after.items[0].data == {}
    assert torch.equal(after.positions(6, 2, 8), media.positions(6, 2, 8))
    decode = round_trip(9, 1).multi_modal  # past the prompt: positions from the delta
    assert decode is not None and decode.mrope_positions is not None
    assert decode.mrope_positions.shape == (3, 8)
    assert torch.equal(decode.positions(9, 1, 8), media.positions(9, 1, 8))


def test_a_step_carries_each_chunks_adapter_slot_and_the_loads() -> None:
    from kvrun.lora.request import LoRARequest
    from kvrun.lora.slots import SlotTable

    table = SlotTable(2)
    assert table.assign([0, 7, 9, 7]) == ([-1, 0, 1, 0], [(0, 7), (1, 9)])
    assert table.assign([5, 9]) == ([0, 1], [(0, 5)])  # 7 was the least recently used
    follower = SlotTable(2)
    follower.place(0, 7)
    follower.place(1, 9)
    follower.place(0, 5)  # 7's slot goes to 5
    assert (follower.slot_of(5), follower.slot_of(9), follower.slot_of(7)) == (0, 1, None)
    step = m.ExecuteStep(
        3, [], frozenset(), frozenset(),
        m.LoraStep([0, -1], [m.LoraLoad(0, 5, "five", "/adapters/5")], [7]),
    )  # fmt: skip
    decoded = m.decode_broadcast(m.encode(step))
    assert decoded == step
    assert isinstance(decoded, m.ExecuteStep) and decoded.lora is not None
    assert m.lora_request(decoded.lora.loads[0]) == LoRARequest("five", 5, "/adapters/5")


def _segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(SEGMENT_PREFIX)}


def _forked_reader(writer: BroadcastWriter, index: int, expected: list[bytes]) -> int:
    """A child process that checks it receives ``expected`` then EOF; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for fd in writer.inherited_fds(index):
                os.close(fd)
            reader = BroadcastReader(writer.handle, index, writer.doorbell_read_fd(index))
            ok = all(reader.receive(30) == payload for payload in expected)
            try:
                reader.receive(30)
            except ChannelClosed:
                code = 0 if ok else 2
        finally:
            os._exit(code)
    return pid


def test_two_readers_get_every_message_in_order_across_wrap_around() -> None:
    before = _segments()
    # 3 slots of 64 bytes: messages of 0..3000 bytes wrap the ring many times, and the
    # ones longer than a slot travel as several frames
    writer = BroadcastWriter(2, num_slots=3, slot_bytes=64)
    assert writer.name in _segments()
    sizes = [0, 1, 55, 56, 57, 200, 3000] * 4
    payloads = [os.urandom(n) for n in sizes]
    pids = [_forked_reader(writer, i, payloads) for i in range(2)]
    writer.close_reader_fds()
    for payload in payloads:
        writer.publish(payload, timeout_s=60)
    writer.close()  # the readers see EOF once they have read everything
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    assert _segments() == before


def test_a_lagging_reader_is_named_in_a_warning_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = BroadcastWriter(
        2, num_slots=2, slot_bytes=64, warn_interval_s=0.05, reader_names=["rank 0", "rank 1"]
    )
    try:
        reader0 = BroadcastReader(writer.handle, 0, writer.doorbell_read_fd(0))
        writer.publish(b"one")
        writer.publish(b"two")
        assert reader0.receive(1) == b"one"
        assert reader0.receive(1) == b"two"
        assert writer.lagging() == ["rank 1"]
        with caplog.at_level(logging.WARNING, logger="kvrun.executor.shm_channel"):
            started = time.monotonic()
            with pytest.raises(ChannelTimeout, match="rank 1 did not read"):
                writer.publish(b"three", timeout_s=0.5)  # rank 1 holds the ring full
        assert time.monotonic() - started >= 0.5
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) >= 3
        assert all(
            w.startswith("the shared-memory ring buffer is full: rank 1 has not") for w in warnings
        )
        assert "VLLM_RINGBUFFER_WARNING_INTERVAL=0.05" in warnings[0]
        reader0.close()
    finally:
        writer.close()


def test_a_wait_for_a_message_is_bounded() -> None:
    writer = BroadcastWriter(1, num_slots=2, slot_bytes=64)
    try:
        reader = BroadcastReader(writer.handle, 0, writer.doorbell_read_fd(0))
        started = time.monotonic()
        with pytest.raises(ChannelTimeout):
            reader.receive(0.2)
        assert time.monotonic() - started < 5
        reader.close()
    finally:
        writer.close()


def test_a_full_ring_wait_stops_when_the_check_raises() -> None:
    writer = BroadcastWriter(1, num_slots=1, slot_bytes=64)
    calls = []

    def dead() -> None:
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("worker rank 0 died")

    try:
        writer.publish(b"fills the only slot")
        with pytest.raises(RuntimeError, match="worker rank 0 died"):
            writer.publish(b"waits", check=dead)
    finally:
        writer.close()


def test_bad_parallel_settings_are_refused_by_name() -> None:
    with pytest.raises(
        ConfigError, match=r"tensor_parallel_size=0 is not valid; accepted: an integer >= 1"
    ):
        EngineArgs(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match=r"pipeline_parallel_size=-1 is not valid"):
        EngineArgs(pipeline_parallel_size=-1)
    with pytest.raises(
        ConfigError,
        match=r"distributed_executor_backend='bogus' is not known; accepted: uni, mp, ray",
    ):
        EngineArgs(distributed_executor_backend="bogus")
    assert check_parallelism(2, 1, "ray") == "ray"  # tests/executor/test_ray_executor.py
    with pytest.raises(ConfigError, match=r"'uni' runs one rank .* = 2 x 1 = 2"):
        EngineArgs(tensor_parallel_size=2, distributed_executor_backend="uni")
    assert check_parallelism(1, 1, None) == "uni"
    assert check_parallelism(2, 1, None) == "mp"
    assert check_parallelism(1, 1, "mp") == "mp"
    with pytest.raises(ConfigError, match=r"VLLM_WORKER_MULTIPROC_METHOD='bogus' is invalid"):
        read_env({"VLLM_WORKER_MULTIPROC_METHOD": "bogus"})
    with pytest.raises(
        ConfigError, match=r"'forkserver' is not a start method; accepted: fork, spawn"
    ):
        check_start_method("forkserver")


def test_the_serve_flags_reach_the_engine_options() -> None:
    from kvrun.cli.main import parse_command_line

    args = parse_command_line(
        ["serve", "-tp", "2", "-pp", "1", "--distributed-executor-backend", "mp"]
    )
    engine = EngineArgs.from_cli_args(args)
    assert (engine.tensor_parallel_size, engine.pipeline_parallel_size) == (2, 1)
    assert engine.distributed_executor_backend == "mp"
    long = parse_command_line(
        ["serve", "--tensor-parallel-size", "4", "--pipeline-parallel-size", "2"]
    )
    assert (long.tensor_parallel_size, long.pipeline_parallel_size) == (4, 2)
