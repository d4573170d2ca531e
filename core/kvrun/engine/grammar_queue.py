"""Where constrained requests wait while their grammar compiles.

A request with ``structured_outputs`` is checked when it is added (a RequestError
naming the field), then its grammar compiles in the compiler's worker thread. Its
scheduler requests wait here, outside the scheduler, so nothing else waits for the
compiler; :meth:`GrammarQueue.ready` hands them over, each sequence with its own
matcher, once the grammar is compiled, and reports those whose grammar failed or took
longer than :data:`~kvrun.structured_output.compiler.COMPILE_TIMEOUT_S`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, wait
from dataclasses import dataclass

from kvrun.engine.sequence import SequenceState
from kvrun.errors import RequestError
from kvrun.scheduling.request import Request
from kvrun.structured_output import StructuredOutputsParams
from kvrun.structured_output.compiler import (
    COMPILE_TIMEOUT_S,
    CompiledConstraint,
    GrammarCompiler,
    check_constraint,
)
from kvrun.tokenizer import Tokenizer

__all__ = ["GrammarQueue"]


@dataclass
class _Waiting:
    requests: list[Request]  # the request's sequences, payloads SequenceState
    grammar: Future[CompiledConstraint]
    deadline: float  # time.monotonic() after which the request is refused


class GrammarQueue:
    """The engine's constrained requests until their grammar is ready."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, backend: str) -> None:
        self.backend = backend
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._compiler: GrammarCompiler | None = None  # made for the first request
        self._waiting: dict[str, _Waiting] = {}

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = GrammarCompiler(self._tokenizer, self._vocab_size, self.backend)
        return self._compiler

    def check(self, constraint: StructuredOutputsParams) -> None:
        """A RequestError naming the field when the constraint is not a grammar."""
        check_constraint(constraint, self.backend)

    def hold(
        self, request_id: str, requests: list[Request], constraint: StructuredOutputsParams
    ) -> None:
        """Start compiling; ``requests`` wait until :meth:`ready` hands them over."""
        grammar = self.compiler.submit(constraint)
        self._waiting[request_id] = _Waiting(
            requests, grammar, time.monotonic() + COMPILE_TIMEOUT_S
        )

    def drop(self, request_id: str) -> bool:
        """Forget a waiting request (aborted); False when it is not waiting here."""
        return self._waiting.pop(request_id, None) is not None

    def ready(self, idle: bool) -> tuple[list[Request], list[tuple[str, RequestError]]]:
        """The scheduler requests whose grammar compiled (each sequence's matcher set),
        and the request ids refused with why. ``idle``: nothing else can run, so wait a
        little for the first compile rather than let the engine spin."""
        if not self._waiting:
            return [], []
        if idle:
            first = next(iter(self._waiting.values()))
            wait([first.grammar], timeout=max(0.0, min(0.05, first.deadline - time.monotonic())))
        now = time.monotonic()
        admitted: list[Request] = []
        refused: list[tuple[str, RequestError]] = []
        for request_id, entry in list(self._waiting.items()):
            if entry.grammar.done():
                exc = entry.grammar.exception()
                if exc is None:
                    compiled = entry.grammar.result()
                    for request in entry.requests:
                        state: SequenceState = request.payload  # type: ignore[assignment]
                        state.constraint = compiled.matcher()
                        admitted.append(request)
                    del self._waiting[request_id]
                    continue
                error = (
                    exc
                    if isinstance(exc, RequestError)
                    else RequestError(
                        f"structured_outputs could not be compiled: {exc}",
                        param="structured_outputs",
                    )
                )
            elif now >= entry.deadline:
                entry.grammar.cancel()
                error = RequestError(
                    f"structured_outputs did not compile within {COMPILE_TIMEOUT_S:.0f} s; "
                    "accepted: a smaller schema, regex or grammar",
                    param="structured_outputs",
                )
            else:
                continue
            del self._waiting[request_id]
            refused.append((request_id, error))
        return admitted, refused
