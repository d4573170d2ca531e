"""Sampling: per-step batch metadata, the sampler, raw logprobs and stop-string matching."""

from kvrun.sampling.logprobs import logprob_dicts, prompt_logprobs
from kvrun.sampling.metadata import (
    SamplingMetadata,
    SamplingRow,
    build_sampling_metadata,
    make_generator,
)
from kvrun.sampling.sampler import Sampler, SamplerOutput, process_logits
from kvrun.sampling.stop import StopMatch, find_stop, stop_holdback

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingMetadata",
    "SamplingRow",
    "StopMatch",
    "build_sampling_metadata",
    "find_stop",
    "logprob_dicts",
    "make_generator",
    "process_logits",
    "prompt_logprobs",
    "stop_holdback",
]
