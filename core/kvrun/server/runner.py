"""Run the server: start the engine, serve HTTP until SIGTERM/SIGINT or engine death, clean up.

SIGTERM (or Ctrl-C) stops accepting connections, gives in-flight requests up to
``--shutdown-timeout`` seconds, then aborts what is left, stops the engine
process and removes its socket files. Engine death fails in-flight requests (500),
turns /health to 503 and exits with status 1, unless
VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 keeps the server up answering 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Generator
from dataclasses import replace
from typing import TYPE_CHECKING

import uvicorn

from kvrun.errors import ConfigError
from kvrun.server.app import attach_state, build_app
from kvrun.server.config import ServerConfig
from kvrun.server.engine_client import EngineClient
from kvrun.server.lora import load_static_adapters
from kvrun.server.metrics import ServerMetrics
from kvrun.server.state import ServerState

if TYPE_CHECKING:
    from kvrun.config import EngineArgs
    from kvrun.envs import EnvSnapshot
    from kvrun.tokenizer import Tokenizer

__all__ = ["run_server"]

logger = logging.getLogger(__name__)

# uvicorn answers a bare 400 (no envelope) past its own header limit; keep it well
# above ours so the envelope is what clients normally see.
_UVICORN_HEADER_FACTOR = 4


# After the drain, seconds the aborted requests' handlers get to write their answers.
_ANSWER_GRACE_S = 5


class _Server(uvicorn.Server):
    """uvicorn, with kvrun's stop: signals are recorded, not re-raised (that would kill
    the process before the engine is stopped), and in-flight requests get
    ``--shutdown-timeout`` seconds to finish, then end with finish_reason "abort"."""

    def __init__(self, config: uvicorn.Config, client: EngineClient, drain_s: float) -> None:
        super().__init__(config)
        self.client = client
        self.drain_s = drain_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # no new connections while the running requests drain
        deadline = time.monotonic() + self.drain_s
        while self.client.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # Every handler gets its request's last delta and answers normally: a whole
        # response, or a stream's final chunk and [DONE].
        self.client.abort_all()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        handlers = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)


def _load_tokenizer(engine_args: EngineArgs, env: EnvSnapshot) -> Tokenizer:
    """The frontend's own tokenizer (the engine's lives in the engine process)."""
    from kvrun.loader import load_engine_checkpoint
    from kvrun.tokenizer import load_tokenizer

    # Config and tokenizer files only: the engine process reads (and fetches) the weights.
    args = replace(engine_args, model=engine_args.tokenizer or engine_args.model)
    return load_tokenizer(load_engine_checkpoint(args, env, weights=False))


async def _serve(
    engine_args: EngineArgs, config: ServerConfig, env: EnvSnapshot, sock: socket.socket
) -> int:
    exit_status = 0
    server: _Server | None = None

    def on_dead(reason: str) -> None:
        nonlocal exit_status
        if config.keep_alive_on_engine_death:
            logger.error("engine died; VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1 keeps serving 503")
            return
        exit_status = 1
        if server is not None:
            server.should_exit = True

    client = EngineClient(engine_args, env, on_dead=on_dead, data_parallel=config.data_parallel)
    # Until uvicorn takes over the signals, SIGTERM cancels start-up cleanly.
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, main.cancel)
    # The frontend's tokenizer loads while the engine process loads the model.
    tokenizer_task = asyncio.ensure_future(asyncio.to_thread(_load_tokenizer, engine_args, env))
    try:
        info = await client.start()
        loras = await load_static_adapters(client, config.lora_modules)
        tokenizer = await tokenizer_task
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        metrics = ServerMetrics(info.model_name, client.engine_stats)
        client.metrics = metrics
        app = build_app(config)
        attach_state(
            app,
            ServerState(
                config, client, info, tokenizer, metrics, started_at=int(time.time()), loras=loras
            ),
        )
        uv_config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            root_path=config.root_path,
            http="h11",
            lifespan="off",
            log_level=config.uvicorn_log_level,
            access_log=config.access_log,
            # Past the drain, the aborted requests' handlers need a moment to answer.
            timeout_graceful_shutdown=_ANSWER_GRACE_S,
            h11_max_incomplete_event_size=config.max_header_bytes * _UVICORN_HEADER_FACTOR,
        )
        server = _Server(uv_config, client, config.shutdown_timeout)
        logger.info(
            "serving %s on http://%s:%d%s (api key %s)",
            info.model_name,
            config.host,
            config.port,
            config.root_path,
            "required" if config.api_key else "not required",
        )
        await server.serve(sockets=[sock])
        if client.dead_reason is not None and not config.keep_alive_on_engine_death:
            exit_status = 1
        return exit_status
    except asyncio.CancelledError:
        logger.info("stopped during start-up")
        return 1
    finally:
        tokenizer_task.cancel()
        await client.shutdown(config.shutdown_timeout)
        logger.info("engine stopped")


def run_server(engine_args: EngineArgs, config: ServerConfig, env: EnvSnapshot) -> int:
    """Serve until stopped; the process exit status (0 after SIGTERM, 1 after engine death).

    The listening socket is bound first, so a port in use fails at once, before the
    model loads."""
    sock = bind_listening_socket(config.host, config.port)
    try:
        return asyncio.run(_serve(engine_args, config, env, sock))
    finally:
        sock.close()


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port); ConfigError naming the address when it cannot."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # Not SO_REUSEPORT: a port another server listens on must stay an error.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}; another process may be "
            "using the port: choose another with --port"
        ) from None
    return sock
