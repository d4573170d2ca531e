"""The mp executor's result area: the driver rank's logits in shared memory, the pipe
carrying only a typed header (kvrun.executor.result_area).

- in one process: tensors placed by the writer read back equal through the executor's
  side, as views of one mapping, each at an aligned offset; what does not fit travels as
  bytes; a header that points outside the area is refused; the area has no name in
  /dev/shm and closes even while a caller still holds a view;
- end to end (a process of its own in a loopback-only namespace): a batch-16 prefill and
  decode step of a 49152-token vocabulary (3 MB of float32 logits) through a worker equal
  the in-process runner's exactly, arrive as views of the area, and nothing is left
  (processes, /dev/shm, the mapping) once the executor is closed.
"""

from __future__ import annotations

import gc
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrun.engine.batch import StepLogits
from kvrun.executor import messages as m
from kvrun.executor.result_area import ALIGN, ResultArea, ResultAreaWriter
from tests.executor import scenarios


def _writer_of(area: ResultArea) -> ResultAreaWriter:
    """The driver's side, from a duplicate of the area's descriptor (as a worker gets it)."""
    return ResultAreaWriter(os.dup(area.fd))


def test_placed_tensors_read_back_equal_as_views_of_one_mapping() -> None:
    area = ResultArea(4 * 11 * 4 + 3 * 11 * 4 + 2 * ALIGN)
    writer = _writer_of(area)
    out = StepLogits(
        logits=torch.randn(4, 11),
        request_ids=["a", "b", "c", "d"],
        prompt_logits={"a": torch.randn(3, 11)},
        hidden={"c": torch.randn(2, 5)},
    )
    writer.start_step()
    message = m.pack_step_logits(out, writer.place)
    assert isinstance(message.logits, m.SharedTensor)
    assert isinstance(message.prompt_logits["a"], m.SharedTensor)
    assert isinstance(message.hidden["c"], m.TensorBlob)  # kept across steps: always a copy
    assert message.prompt_logits["a"].offset % ALIGN == 0
    decoded = m.decode_reply(m.encode(m.StepResult(0, message)))
    assert isinstance(decoded, m.StepResult)
    back = m.unpack_step_logits(decoded.logits, area.tensor)
    assert torch.equal(back.logits, out.logits)
    assert torch.equal(back.prompt_logits["a"], out.prompt_logits["a"])
    assert torch.equal(back.hidden["c"], out.hidden["c"])
    assert back.logits.untyped_storage().nbytes() == area.nbytes  # a view, not a copy
    # the next step writes from offset 0 again
    writer.start_step()
    again = writer.place(torch.full((4, 11), 2.0))
    assert isinstance(again, m.SharedTensor) and again.offset == 0
    assert torch.equal(area.tensor(again), torch.full((4, 11), 2.0))
    writer.close()
    area.close()


def test_what_does_not_fit_travels_as_bytes_and_a_bad_header_is_refused() -> None:
    area = ResultArea(64)
    writer = _writer_of(area)
    writer.start_step()
    small = writer.place(torch.arange(8, dtype=torch.float32))  # 32 bytes
    big = writer.place(torch.arange(16, dtype=torch.float32))  # 64 more: over
    assert isinstance(small, m.SharedTensor) and isinstance(big, m.TensorBlob)
    assert torch.equal(m.unpack_tensor(big), torch.arange(16, dtype=torch.float32))
    with pytest.raises(ValueError, match="does not lie in the 64-byte result area"):
        area.tensor(m.SharedTensor("float32", [32], 0))
    with pytest.raises(ValueError, match="at a multiple of 64"):
        area.tensor(m.SharedTensor("float32", [2], 4))
    with pytest.raises(m.MessageError, match="accepted: float32"):
        area.tensor(m.SharedTensor("complex64", [2], 0))
    with pytest.raises(m.MessageError, match="nowhere to read it from"):
        m.unpack_step_logits(m.StepLogitsMessage(small, ["a"], {}, {}))
    writer.close()
    area.close()


def test_the_area_has_no_name_and_closes_while_a_view_is_held() -> None:
    before = set(os.listdir("/dev/shm"))
    area = ResultArea(1 << 20)
    writer = _writer_of(area)
    writer.start_step()
    view = area.tensor(m.SharedTensor("float32", [4], 0))
    assert set(os.listdir("/dev/shm")) == before  # memfd: never in /dev/shm
    assert "kvrun_mp_result" in Path("/proc/self/maps").read_text()
    writer.close()
    area.close()  # the view keeps the mapping; no error
    area.close()  # idempotent
    assert view.shape == (4,)
    del view
    gc.collect()
    assert "kvrun_mp_result" not in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(
    shutil.which("unshare") is None or shutil.which("ip") is None,
    reason="needs unshare and ip (root) for a loopback-only network namespace",
)
def test_a_batch_16_step_s_logits_cross_exactly_and_nothing_is_left(
    random_checkpoint: Callable[..., Path],
) -> None:
    model = random_checkpoint("llama", seed=3)  # vocabulary 49152: 3 MB of logits a step
    out: dict[str, Any] = scenarios.run("result_area", timeout_s=600, model=str(model))
    assert out["area_bytes"] == 16 * 49152 * 4  # max_num_seqs x vocab x float32
    for step in out["steps"]:
        assert step["shape"] == [16, 49152] and step["dtype"] == "torch.float32"
        assert step["request_ids"]
        # the same arithmetic in another process: equal to the bit
        assert step["equal"], step["max_abs_diff"]
        assert step["storage_bytes"] == out["area_bytes"]  # a view of the area
    assert out["driver_maps_area"]
    assert out["alive_after_close"] == [] and out["children"] == []
    assert out["segments_left"] == []
    assert not out["area_still_mapped"]


def test_ray_s_attached_arrays_read_back_as_writable_copies_and_bad_ones_are_refused() -> None:
    import numpy as np

    from kvrun.executor.ray_executor import _attached

    logits = torch.randn(3, 7)
    array = logits.numpy().copy()
    array.flags.writeable = False  # as Ray's object store hands it back
    message = m.StepLogitsMessage(m.AttachedTensor("float32", [3, 7], 0), ["a", "b", "c"], {}, {})
    decoded = m.decode_reply(m.encode(m.StepResult(5, message)))
    assert isinstance(decoded, m.StepResult)
    back = m.unpack_step_logits(decoded.logits, lambda ref: _attached(ref, [array]))
    assert torch.equal(back.logits, logits)
    back.logits[0, 0] = 1.0  # the sampler edits logits in place: a copy of its own
    assert array[0, 0] == logits[0, 0]
    with pytest.raises(m.MessageError, match="1 array"):
        _attached(m.AttachedTensor("float32", [3, 7], 1), [array])
    with pytest.raises(m.MessageError, match=r"the reply says float32 \[7, 3\]"):
        _attached(m.AttachedTensor("float32", [7, 3], 0), [array])
    with pytest.raises(m.MessageError, match="SharedTensor"):
        _attached(m.SharedTensor("float32", [3, 7], 0), [np.zeros(1)])
