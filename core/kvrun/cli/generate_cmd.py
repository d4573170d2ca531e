"""`kvrun generate "prompt"`: run a model once and stream the answer to stdout."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send the prompt as a user message through the chat template (default)",
    )
    from kvrun.config import EngineArgs

    EngineArgs.add_cli_args(parser)


def run(args: argparse.Namespace, env: Any) -> int:
    from kvrun.config import EngineArgs
    from kvrun.engine.llm_engine import LLMEngine
    from kvrun.sampling_params import SamplingParams

    engine = LLMEngine.from_args(EngineArgs.from_cli_args(args), env)
    tokenizer = engine.tokenizer
    prompt: str | list[int] = args.prompt
    if args.chat and tokenizer.chat_template is not None:
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])
        prompt = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p
    )
    engine.add_request("generate", prompt, params)
    while engine.has_unfinished_requests():
        for delta in engine.step():
            for seq in delta.sequences:
                sys.stdout.write(seq.text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return 0
