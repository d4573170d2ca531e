"""The engine side of the server: one loop that owns the LLMEngine.

The loop drains incoming messages (add, abort, utility, shutdown), runs one engine
step while any request is unfinished, and sends the step's outputs as deltas with
the engine's stats. When idle it still sends stats every ``heartbeat_s`` so the
frontend can tell a hung engine from an idle one. The same loop runs in a thread
(VLLM_ENABLE_V1_MULTIPROCESSING=0) or in its own process behind ZeroMQ.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvrun.errors import KvrunError, RequestError
from kvrun.lora.request import LoRARequest
from kvrun.server.deltas import to_wire
from kvrun.server.wire import (
    Abort,
    AddRequest,
    Dead,
    EngineInfo,
    EngineMessage,
    FrontendMessage,
    Hello,
    Outputs,
    Ready,
    Rejected,
    Shutdown,
    Utility,
    UtilityResult,
)

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.envs import EnvSnapshot
    from kvrun.server.ipc import IpcPaths

__all__ = [
    "HEARTBEAT_S",
    "EngineEndpoint",
    "EngineLoop",
    "engine_info",
    "engine_process_main",
    "run_engine",
]

logger = logging.getLogger(__name__)

# Idle stats interval; the frontend's hang detection needs it well under 1 s
# (VLLM_ENGINE_ITERATION_TIMEOUT_S is whole seconds, at least 1).
HEARTBEAT_S = 0.25

Send = Callable[[EngineMessage], None]
# timeout in seconds (0: do not wait) -> the messages that arrived
Receive = Callable[[float], list[FrontendMessage]]


def engine_info(engine: LLMEngine) -> EngineInfo:
    config = engine.config
    return EngineInfo(
        model_name=config.model_name,
        model_path=config.model_source,
        max_model_len=config.max_model_len,
        vocab_size=config.vocab_size,
        max_logprobs=config.max_logprobs,
        platform_name=config.platform_name,
        attention_backend=config.attention_backend,
        dtype=str(config.dtype).removeprefix("torch."),
        num_kv_blocks=config.num_kv_blocks,
        block_size=config.block_size,
        id2label=list(config.id2label),
        structured_outputs_backend=config.structured_outputs_backend,
        accepted_modalities=sorted(
            engine.multimodal.accepted_modalities if engine.multimodal is not None else ()
        ),
    )


class EngineLoop:
    """Drives one LLMEngine from messages; ``run`` returns on Shutdown or ``should_stop``."""

    def __init__(self, engine: LLMEngine, send: Send, *, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.engine = engine
        self.send = send
        self.heartbeat_s = heartbeat_s
        self._rejected: list[Rejected] = []
        # LoRA adapters loaded by name (--lora-modules, /v1/load_lora_adapter); ids are
        # this loop's, never reused, so a reloaded adapter shares no cached KV blocks.
        self._loras: dict[str, LoRARequest] = {}
        self._lora_ids = itertools.count(1)

    def handle(self, msg: FrontendMessage) -> bool:
        """Apply one message; False on Shutdown."""
        if isinstance(msg, AddRequest):
            self._add(msg)
        elif isinstance(msg, Abort):
            self.engine.abort_request(msg.request_ids)
        elif isinstance(msg, Utility):
            self.send(self._utility(msg))
        elif isinstance(msg, Shutdown):
            return False
        return True

    def _add(self, msg: AddRequest) -> None:
        from kvrun.sampling_params import SamplingParams

        try:
            lora = None
            if msg.lora_name is not None:
                lora = self._loras.get(msg.lora_name)
                if lora is None:  # unloaded while the request was on its way
                    raise RequestError(
                        f"The model `{msg.lora_name}` does not exist.",
                        param="model",
                        code="model_not_found",
                    )
            if msg.pooling is not None:
                from kvrun.pooling import PoolingParams

                pooling = msg.pooling
                self.engine.add_pooling_request(
                    msg.request_id,
                    msg.prompt_token_ids,
                    PoolingParams(
                        dimensions=pooling.dimensions,
                        normalize=pooling.normalize,
                        task=pooling.task,
                    ),
                    arrival_time=msg.arrival_time,
                    lora_request=lora,
                )
                return
            params = SamplingParams(**msg.params.kwargs())  # type: ignore[arg-type]
            prompt: list[int] | dict[str, Any] = msg.prompt_token_ids
            if msg.multi_modal_data is not None:  # to_data: a ValueError (400) if malformed
                prompt = {
                    "prompt_token_ids": msg.prompt_token_ids,
                    "multi_modal_data": msg.multi_modal_data.to_data(),
                }
                if msg.multi_modal_data.processor_kwargs is not None:
                    prompt["mm_processor_kwargs"] = msg.multi_modal_data.processor_kwargs
            self.engine.add_request(
                msg.request_id,
                prompt,
                params,
                arrival_time=msg.arrival_time,
                lora_request=lora,
            )
        except RequestError as exc:
            self._rejected.append(Rejected(msg.request_id, str(exc), exc.param, exc.code, 400))
        except ValueError as exc:  # SamplingParams validation, KvrunError included
            self._rejected.append(Rejected(msg.request_id, str(exc), None, None, 400))
        except Exception as exc:  # a bug refusing one request must not stop the others
            logger.exception("adding request %s failed", msg.request_id)
            self._rejected.append(
                Rejected(
                    msg.request_id,
                    f"the engine failed to add the request: {exc!r}",
                    None,
                    None,
                    500,
                )
            )

    def _utility(self, msg: Utility) -> UtilityResult:
        try:
            if msg.method in ("load_lora_adapter", "unload_lora_adapter"):
                return self._lora_call(msg)
            if msg.method == "reset_prefix_cache":
                return UtilityResult(msg.call_id, True, self.engine.reset_prefix_cache(), None)
            if msg.method == "start_profile":
                self.engine.start_profile()
            else:
                self.engine.stop_profile()
            return UtilityResult(msg.call_id, True, None, None)
        except Exception as exc:  # answered to the caller; the engine keeps running
            logger.exception("utility call %s failed", msg.method)
            return UtilityResult(msg.call_id, False, None, str(exc))

    def _lora_call(self, msg: Utility) -> UtilityResult:
        """Load or unload an adapter by name; a refusal comes back with its 400/404."""
        if msg.lora is None:
            return UtilityResult(msg.call_id, False, None, "no adapter named", 400)
        name = msg.lora.lora_name
        if msg.method == "unload_lora_adapter":
            unloaded = self._loras.pop(name, None)
            if unloaded is None:
                error = f"The LoRA adapter `{name}` is not loaded."
                return UtilityResult(msg.call_id, False, None, error, 404)
            self.engine.remove_lora(unloaded.lora_int_id)
            return UtilityResult(msg.call_id, True, True, None)
        if name in self._loras:
            error = f"The LoRA adapter `{name}` is already loaded; unload it first."
            return UtilityResult(msg.call_id, False, None, error, 400)
        lora = LoRARequest(name, next(self._lora_ids), msg.lora.lora_path)
        try:
            self.engine.add_lora(lora)
        except RequestError as exc:
            return UtilityResult(msg.call_id, False, None, str(exc), 400)
        self._loras[name] = lora
        logger.info("LoRA adapter %s loaded (id %d)", name, lora.lora_int_id)
        return UtilityResult(msg.call_id, True, True, None)

    def run(self, receive: Receive, should_stop: Callable[[], bool] = lambda: False) -> None:
        last_sent = 0.0
        while not should_stop():
            busy = self.engine.has_unfinished_requests()
            messages = receive(0.0 if busy else self.heartbeat_s)
            for msg in messages:
                if not self.handle(msg):
                    return
            outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
            for request_id, exc in self.engine.take_failed_requests():  # grammars that failed
                self._rejected.append(Rejected(request_id, str(exc), exc.param, exc.code, 400))
            now = time.time()
            if outputs or messages or self._rejected or now - last_sent >= self.heartbeat_s:
                deltas = [to_wire(o) for o in outputs]
                rejected, self._rejected = self._rejected, []
                self.send(Outputs(deltas, rejected, self.engine.stats(), now))
                last_sent = now


def run_engine(
    engine_args: EngineArgs,
    env: EnvSnapshot,
    send: Send,
    receive: Receive,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Load the engine, announce it, and serve until Shutdown; failures are sent as Dead."""
    from kvrun.engine.llm_engine import LLMEngine

    try:
        engine = LLMEngine.from_args(engine_args, env, entry_point="serve")
        started = time.monotonic()
        engine.warm_up(commit_kv_cache=True)
        logger.info("warm-up step: %.2f s", time.monotonic() - started)
    except KvrunError as exc:
        send(Dead(str(exc), user_error=True))
        return
    except Exception:
        send(Dead(traceback.format_exc(), user_error=False))
        return
    send(Ready(engine_info(engine)))
    try:
        EngineLoop(engine, send).run(receive, should_stop)
    except Exception:
        logger.exception("the engine loop failed")
        send(Dead(traceback.format_exc(), user_error=False))


class EngineEndpoint:
    """The engine's two sockets: binds its input (0600), connects to the frontend's.

    Whatever arrives that is not one frame holding a valid message is logged and dropped.
    """

    def __init__(self, paths: IpcPaths) -> None:
        import msgspec
        import zmq

        from kvrun.server.ipc import IpcPaths, bind_private
        from kvrun.server.wire import frontend_decoder

        self._zmq = zmq
        self._decode_error = msgspec.DecodeError
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        bind_private(self._inbox, paths.engine_input)
        self._outbox = self._ctx.socket(zmq.PUSH)
        self._outbox.setsockopt(zmq.LINGER, 2000)
        self._outbox.connect(IpcPaths.address(paths.frontend_input))
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = frontend_decoder()
        self.dropped = 0  # messages dropped as undecodable

    def send(self, msg: EngineMessage) -> None:
        self._outbox.send(self._encoder.encode(msg), copy=False)

    def receive(self, timeout: float) -> list[FrontendMessage]:
        """What arrived within ``timeout`` seconds (0: only what is already there)."""
        messages: list[FrontendMessage] = []
        if not self._inbox.poll(int(timeout * 1000)):
            return messages
        while True:
            try:
                frames = self._inbox.recv_multipart(self._zmq.NOBLOCK)
            except self._zmq.Again:
                return messages
            if len(frames) != 1:
                self.dropped += 1
                logger.warning("dropped a %d-part message on the engine socket", len(frames))
                continue
            try:
                messages.append(self._decoder.decode(frames[0]))
            except self._decode_error as exc:
                self.dropped += 1
                logger.warning(
                    "dropped %d bytes on the engine socket that are not a kvrun message: %s",
                    len(frames[0]),
                    exc,
                )

    def close(self) -> None:
        self._inbox.close(linger=0)
        self._outbox.close()
        self._ctx.term()


def engine_process_main(
    engine_args: EngineArgs,
    env: EnvSnapshot,
    paths: IpcPaths,
    parent_pid: int,
    cpus: tuple[int, ...] | None = None,
) -> None:
    """Entry point of the engine process (multiprocessing spawn); ``cpus``: run one
    compute thread per CPU listed, pinned to them (a data-parallel rank's share)."""
    from kvrun.logging_config import configure_logging

    if cpus is not None:
        import torch

        os.sched_setaffinity(0, cpus)  # before the thread pools exist: they inherit it
        torch.set_num_threads(len(cpus))

    # Ctrl-C, `timeout` and systemd signal the whole process group; the frontend decides
    # when we stop (Shutdown after draining, SIGKILL past the timeout), and we exit on our
    # own if it goes away (see orphaned()).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(env)
    endpoint = EngineEndpoint(paths)

    def orphaned() -> bool:
        return os.getppid() != parent_pid

    endpoint.send(Hello(os.getpid()))
    try:
        run_engine(engine_args, env, endpoint.send, endpoint.receive, orphaned)
    finally:
        endpoint.close()
