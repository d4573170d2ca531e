"""Structured output: a request's output held to a JSON schema, regex, choice or grammar.

:class:`StructuredOutputsParams` says what a request asks for (no grammar library
needed); :mod:`~kvrun.structured_output.compiler` checks and compiles it with xgrammar,
off the engine loop and with a time bound; the engine keeps one matcher per sequence and
the sampler masks each step's logits with its token bitmask
(:func:`kvrun.ops.reference.apply_token_bitmask`, which a platform may override).
"""

from kvrun.structured_output.params import CONSTRAINT_KINDS, StructuredOutputsParams

__all__ = ["CONSTRAINT_KINDS", "StructuredOutputsParams"]
