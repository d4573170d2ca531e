"""The offline API, shaped like vLLM's: ``from kvrun import LLM, SamplingParams``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from kvrun.config import EngineArgs
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.errors import KvrunError
from kvrun.outputs import RequestOutput, RequestOutputKind
from kvrun.sampling_params import SamplingParams
from kvrun.tokenizer import Tokenizer

__all__ = ["LLM"]

PromptInput = str | Mapping[str, Any] | Sequence[int]
Message = Mapping[str, Any]


class LLM:
    """Load a model once, then generate for batches of prompts.

    ``LLM(model=None)`` loads the default model (SmolLM2-135M-Instruct). Keyword
    arguments are :class:`kvrun.config.EngineArgs` fields (vLLM's names).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from kvrun import envs
        from kvrun.logging_config import configure_logging

        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise KvrunError(
                f"LLM() got unknown option(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known - {'model'}))}"
            )
        env = envs.read_env()
        configure_logging(env)
        envs.warn_unknown_variables()
        self.llm_engine = LLMEngine.from_args(EngineArgs(model=model, **kwargs), env)
        self._counter = 0

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in the prompts' order."""
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        return self._run([_prompt_of(p) for p in items], params, use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        conversations: list[Sequence[Message]]
        if messages and isinstance(messages[0], Mapping):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        tokenizer = self.llm_engine.tokenizer
        prompts: list[str | list[int]] = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(
                list(conversation),
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
            # The template already holds any special tokens the model wants.
            prompts.append(tokenizer.encode(text, add_special_tokens=False))
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def start_profile(self) -> None:
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        self.llm_engine.stop_profile()

    def _run(
        self, prompts: list[str | list[int]], params: list[SamplingParams], use_tqdm: bool
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        # Only each request's final output is returned (as vLLM's LLM does), so the
        # accumulator builds nothing on the steps in between.
        final_only: dict[int, SamplingParams] = {}  # one copy per distinct params object
        for prompt, p in zip(prompts, params):
            request_id = str(self._counter)
            self._counter += 1
            if p.output_kind is not RequestOutputKind.FINAL_ONLY:
                if id(p) not in final_only:
                    final_only[id(p)] = p.replace(output_kind=RequestOutputKind.FINAL_ONLY)
                p = final_only[id(p)]
            engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        accumulator = OutputAccumulator()
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    output = accumulator.add(delta)
                    if output is not None and output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]


def _as_prompt_list(prompts: PromptInput | Sequence[PromptInput]) -> list[PromptInput]:
    if isinstance(prompts, str | Mapping):
        return [prompts]
    items: list[Any] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [items]  # one prompt given as token ids
    return items


def _prompt_of(item: PromptInput) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        if "prompt_token_ids" in item:
            return [int(t) for t in item["prompt_token_ids"]]
        if "prompt" in item:
            return str(item["prompt"])
        raise KvrunError(
            f"a prompt dict needs 'prompt' or 'prompt_token_ids'; got keys {sorted(item)}"
        )
    return [int(t) for t in item]


def _as_params_list(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(params, SamplingParams):
        return [params] * count
    listed = list(params)
    if len(listed) != count:
        raise KvrunError(
            f"got {len(listed)} sampling_params for {count} prompts; give one, or one per prompt"
        )
    return listed
