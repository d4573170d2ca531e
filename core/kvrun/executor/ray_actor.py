"""One rank of the Ray executor: a Ray actor wrapping a :class:`~kvrun.distributed.worker.Worker`.

:class:`RankActor` is a plain class; :mod:`kvrun.executor.ray_executor` turns it into a
Ray actor class (``ray.remote``) and creates one per rank in a placement group. Its
arguments are plain data, as the mp workers get them: EngineArgs' fields, the variables
the engine was started with, the WorkerSpec's fields. Each step arrives as the bytes of a
typed :class:`~kvrun.executor.messages.ExecuteStep` message (msgpack, never a pickle of
our objects); the driver rank answers the bytes of a
:class:`~kvrun.executor.messages.StepResult` and, beside them, its float32 logits as
numpy arrays (the message names them: :class:`~kvrun.executor.messages.AttachedTensor`),
which Ray's object store carries without the copies that bytes inside msgpack cost; the
other ranks answer ``b""``. That is the path of a rank on another node than the
engine's; a rank on the engine's node is attached to the node-local data path
(:mod:`kvrun.executor.ray_local`: :meth:`attach_local`) and then serves the engine's
shared-memory ring in one long :meth:`serve_local` call, its logits (the driver's) in
the result area; under a compiled graph every rank keeps answering :meth:`execute`,
and the driver (attached on the engine's node) puts its logits in the result area and
sends its header on its connection.

Call order (the Worker's): :meth:`placement` (where the actor runs), on rank 0
:meth:`rendezvous_address`, then :meth:`start` on every rank at once (they meet at the
rendezvous), :meth:`init_kv_cache`, on the engine's node :meth:`attach_local` (then
:meth:`serve_local` unless a compiled graph drives the steps), :meth:`execute` per step
(ranks on other nodes, compiled graphs), :meth:`close`.
This module imports no torch at import time; Ray imports it in each actor process.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["RankActor"]

logger = logging.getLogger(__name__)


class RankActor:
    """One rank in a Ray actor process."""

    def __init__(self, env: Mapping[str, str], threads: int) -> None:
        # as an mp worker: this process's thread count before torch starts its pool
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        from kvrun.envs import read_env
        from kvrun.logging_config import configure_logging

        configure_logging(read_env(dict(env)))
        self.env = dict(env)
        self.threads = threads
        self.worker: Any = None
        self.rank = -1
        self.is_driver = False
        self.local: Any = None  # the node-local data path's end (kvrun.executor.ray_local)

    def placement(self) -> tuple[str, str, int]:
        """(Ray node id, the node's IP as Ray reports it, this process's pid)."""
        import ray

        return (
            ray.get_runtime_context().get_node_id(),
            ray.util.get_node_ip_address(),  # type: ignore[no-untyped-call]
            os.getpid(),
        )

    def rendezvous_address(self) -> tuple[str, int]:
        """Where rank 0 (this actor) serves the rendezvous: VLLM_HOST_IP, else this
        node's IP as Ray reports it; the first free port from VLLM_PORT (unset: any)."""
        import ray

        from kvrun.distributed.state import find_free_port
        from kvrun.envs import read_env

        env = read_env(self.env)
        host = env.VLLM_HOST_IP or ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        return host, find_free_port(host, env.VLLM_PORT)

    def start(
        self, engine_args: dict[str, Any], spec: dict[str, Any], dist_timeout_s: float
    ) -> int:
        """Build the Worker, join the rendezvous, load this rank's shard; the KV blocks
        this rank's share of the budget holds. Errors propagate (Ray carries them)."""
        from kvrun.config import EngineArgs
        from kvrun.distributed.worker import Worker, WorkerSpec

        worker_spec = WorkerSpec(**spec)
        self.rank = worker_spec.rank
        os.environ["LOCAL_RANK"] = str(worker_spec.local_rank)
        self.worker = Worker(EngineArgs(**engine_args), self.env, worker_spec)
        self.is_driver = self.worker.is_driver
        self.worker.init_distributed(dist_timeout_s)
        self.worker.load_model()
        return int(self.worker.kv_cache_blocks())

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def commit_kv_cache(self) -> int:
        return int(self.worker.commit_kv_cache())

    def attach_local(self, offer: bytes) -> None:
        """Connect to the engine on this node (a :class:`~kvrun.executor.ray_local.LocalAttach`)
        and map what it hands over: the step ring, the driver's result area."""
        from kvrun.executor.ray_local import LocalEnd

        self.local = LocalEnd(offer)

    def detach_local(self) -> None:
        """Leave the node-local data path (the engine fell back to actor calls)."""
        if self.local is not None:
            self.local.close()
            self.local = None

    def serve_local(self) -> None:
        """Serve the engine's ring until it says Shutdown or goes: this call lasts as long
        as the engine (Ray still reports the actor's death through it)."""
        self.local.serve(self.worker, self.is_driver)

    def execute(self, payload: bytes) -> tuple[bytes, list[Any]] | bytes:
        """Run one step (an ExecuteStep message); the driver's StepResult bytes and the
        arrays it names, else b"". A driver rank attached to the node-local path (a
        compiled graph's, on the engine's node) puts its logits in the result area and
        sends the StepResult (or its failure) on its connection instead, answering b"":
        the engine sleeps on that connection rather than in Ray's channel read, which
        spins."""
        import torch

        from kvrun.executor.messages import (
            AttachedTensor,
            ExecuteStep,
            MessageError,
            StepResult,
            TensorRef,
            decode_broadcast,
            encode,
            pack_step_logits,
            pack_tensor,
        )

        message = decode_broadcast(payload)
        if not isinstance(message, ExecuteStep):
            raise MessageError(f"rank {self.rank} expected a step, got {type(message).__name__}")
        if self.local is not None and self.is_driver:
            try:
                out = self.worker.execute_step(message)
                if out is None:
                    raise RuntimeError("the driver rank's Worker.execute returned no logits")
                self.local.reply.send_bytes(encode(self.local.step_result(message.step, out)))
            except BaseException as exc:
                self.local.report_failure("execute", exc)
                raise
            return b""
        out = self.worker.execute_step(message)
        if not self.is_driver:
            return b""
        if out is None:
            raise RuntimeError("the driver rank's Worker.execute returned no logits")
        arrays: list[Any] = []

        def attach(tensor: torch.Tensor) -> TensorRef:
            if tensor.dtype != torch.float32 or tensor.numel() == 0:
                return pack_tensor(tensor)
            arrays.append(tensor.detach().to("cpu").contiguous().numpy())
            return AttachedTensor("float32", list(tensor.shape), len(arrays) - 1)

        header = encode(StepResult(message.step, pack_step_logits(out, attach)))
        return header, arrays

    def close(self) -> None:
        if self.local is not None:
            self.local.close()
            self.local = None
        if self.worker is not None:
            self.worker.close()
            self.worker = None
