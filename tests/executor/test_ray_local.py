"""The Ray executor's node-local data path (kvrun.executor.ray_local) without Ray: the
engine's end and a rank's end in two threads of this process, over a real Unix socket,
ring and result area.

- a rank that connects with the engine's token gets its doorbell and (the driver) the
  result area: a step published on the ring reaches it, a tensor it places in the area
  reads back on the engine's side, its replies arrive on the connection;
- the listening socket and its directory are gone once every rank has connected; close()
  unlinks the ring from /dev/shm and the rank sees the engine gone (ChannelClosed);
- a connection with a wrong token is refused and no descriptor leaves the engine.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from kvrun.executor.messages import (
    Committed,
    ExecuteStep,
    MessageError,
    SharedTensor,
    decode_broadcast,
    decode_reply,
    encode,
)
from kvrun.executor.ray_local import LocalAttach, LocalEnd, LocalRanks, decode_attach
from kvrun.executor.shm_channel import ChannelClosed


def _attach_in_thread(offer: bytes) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def attach() -> None:
        try:
            box["end"] = LocalEnd(offer, timeout_s=30)
        except BaseException as exc:  # reported to the test
            box["error"] = exc

    thread = threading.Thread(target=attach)
    thread.start()
    return thread, box


def test_a_local_rank_gets_the_ring_and_the_result_area() -> None:
    ranks = LocalRanks([0, 1], driver_rank=0, ring=True, result_bytes=4 * 64 * 8)
    ends: dict[int, LocalEnd] = {}
    try:
        socket_dir = Path(ranks.path).parent
        assert socket_dir.is_dir() and (socket_dir.stat().st_mode & 0o777) == 0o700
        started = [_attach_in_thread(ranks.offer(r)) for r in (0, 1)]
        ranks.accept(timeout_s=30)
        for rank, (thread, box) in zip((0, 1), started):
            thread.join(30)
            assert "error" not in box, box.get("error")
            ends[rank] = box["end"]
        assert not socket_dir.exists()  # nobody else can connect now
        assert ends[0].area is not None and ends[1].area is None
        assert os.path.exists(f"/dev/shm/{ranks.segment_name}")

        ranks.publish(encode(ExecuteStep(7, [], frozenset({"a"}), frozenset())), lambda: None)
        for end in ends.values():
            assert end.reader is not None
            message = decode_broadcast(end.reader.receive(timeout_s=10))
            assert isinstance(message, ExecuteStep) and message.step == 7

        logits = torch.arange(64 * 8, dtype=torch.float32).view(8, 64)
        ref = ends[0].place(logits)
        assert isinstance(ref, SharedTensor)
        assert ranks.area is not None
        assert torch.equal(ranks.area.tensor(ref), logits)

        ends[1].reply.send_bytes(encode(Committed(1, 123)))
        reply = decode_reply(ranks.conns[1].recv_bytes())
        assert reply == Committed(1, 123)
    finally:
        ranks.close()
    assert not os.path.exists(f"/dev/shm/{ranks.segment_name}")
    reader = ends[1].reader
    assert reader is not None
    with pytest.raises(ChannelClosed):
        reader.receive(timeout_s=10)
    for end in ends.values():
        end.close()


def test_a_connection_with_a_wrong_token_is_refused() -> None:
    ranks = LocalRanks([0], driver_rank=0, ring=True, result_bytes=1024)
    try:
        offer = decode_attach(ranks.offer(0))
        forged = msgspec.msgpack.encode(
            LocalAttach(offer.path, "0" * 32, 0, offer.ring, offer.reader, offer.result_area)
        )
        thread, box = _attach_in_thread(forged)
        with pytest.raises(MessageError, match="an unexpected connection"):
            ranks.accept(timeout_s=30)
        thread.join(30)
        assert "end" not in box  # it got no descriptors: its connection was closed
        assert ranks.conns == {}
    finally:
        ranks.close()
    assert not os.path.exists(f"/dev/shm/{ranks.segment_name}")


def test_a_malformed_offer_is_a_message_error() -> None:
    with pytest.raises(MessageError, match="not a LocalAttach message"):
        decode_attach(b"\x93pickle")
