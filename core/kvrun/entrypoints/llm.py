"""The offline API, shaped like vLLM's: ``from kvrun import LLM, SamplingParams``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from kvrun.beam_search import BeamSearchOutput
from kvrun.config import EngineArgs
from kvrun.engine.beam_search import run_beam_search
from kvrun.engine.llm_engine import LLMEngine
from kvrun.engine.output_accumulator import OutputAccumulator
from kvrun.errors import KvrunError
from kvrun.lora.request import LoRARequest
from kvrun.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    PoolingOutput,
    PoolingRequestOutput,
    RequestOutput,
    RequestOutputKind,
    ScoringOutput,
    ScoringRequestOutput,
)
from kvrun.pooling import PoolingParams, cosine
from kvrun.sampling_params import BeamSearchParams, SamplingParams
from kvrun.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvrun.multimodal.fetch import MediaPolicy

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
        args = EngineArgs(model=model, **kwargs)
        if args.data_parallel_size != 1:
            # As vLLM's LLM: one process runs one engine; N engines need N processes.
            raise KvrunError(
                f"LLM(data_parallel_size={args.data_parallel_size}) is refused: the offline "
                "LLM runs one engine in this process; serve N engines behind one endpoint "
                f"with `kvrun serve --data-parallel-size {args.data_parallel_size}` (-dp), or "
                "run one LLM per process on parts of the prompts"
            )
        env = envs.read_env()
        configure_logging(env)
        envs.warn_unknown_variables()
        self.llm_engine = LLMEngine.from_args(args, env)
        self._counter = 0
        # where LLM.chat's media parts may come from (built at the first media part)
        self._media_settings = (env, args.allowed_media_domains, args.allowed_local_media_path)
        self._media_policy: MediaPolicy | None = None

    def get_tokenizer(self) -> Tokenizer:
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt; outputs come back in the prompts' order.

        ``lora_request``: the LoRA adapter every prompt runs with, or one (or None) per
        prompt (the engine needs ``enable_lora=True``). A prompt dict may carry
        ``multi_modal_data`` (``{"image": PIL.Image | [...], "video": frames | [...]}``)
        for a multimodal model, as in vLLM."""
        items = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(items))
        loras = _as_lora_list(lora_request, len(items))
        return self._run([_generate_prompt(p) for p in items], params, use_tqdm, loras)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        mm_processor_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate
        (``lora_request`` as in :meth:`generate`).

        A message's content may be a list of parts, as the server takes them
        (:mod:`kvrun.multimodal.chat_parts`: ``image_url``, ``video_url``,
        ``input_audio``, ``audio_url``) plus vLLM's offline ``{"type": "image_pil",
        "image_pil": PIL.Image}``; URLs are fetched by the server's guarded fetcher
        (``file://`` only under ``allowed_local_media_path``, http(s) only from
        ``allowed_media_domains`` when set, else public addresses). ``mm_processor_kwargs``:
        the processor settings of these conversations' media, over the engine's."""
        from kvrun.multimodal.chat_parts import (
            load_parts_blocking,
            message_dicts,
            multi_modal_data,
        )

        conversations: list[Sequence[Message]]
        if messages and isinstance(messages[0], Mapping):
            conversations = [messages]  # type: ignore[list-item]
        else:
            conversations = list(messages)  # type: ignore[arg-type]
        engine = self.llm_engine
        tokenizer = engine.tokenizer
        accepted = engine.multimodal.accepted_modalities if engine.multimodal else frozenset()
        prompts: list[str | list[int] | Mapping[str, Any]] = []
        for conversation in conversations:
            dicts, parts = message_dicts(
                list(conversation), accepted, engine.config.model_name, objects=True
            )
            text = tokenizer.apply_chat_template(
                dicts,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
            )
            # The template already holds any special tokens the model wants.
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if parts:
                items = load_parts_blocking(parts, self._media(), {})
                prompt["multi_modal_data"] = multi_modal_data(parts, items)
            if mm_processor_kwargs is not None:  # checked by the engine, media or not
                prompt["mm_processor_kwargs"] = mm_processor_kwargs
            prompts.append(prompt if len(prompt) > 1 else ids)
        params = _as_params_list(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm, _as_lora_list(lora_request, len(prompts)))

    def _media(self) -> MediaPolicy:
        """The media policy of LLM.chat: the server's rules from this LLM's options."""
        if self._media_policy is None:
            from kvrun.multimodal.assets import AssetCache
            from kvrun.multimodal.fetch import MediaPolicy

            env, domains, local_path = self._media_settings
            self._media_policy = MediaPolicy.from_env(
                env,
                allowed_domains=domains,
                allowed_local_path=local_path,
                cache=AssetCache(env.VLLM_ASSETS_CACHE),
                offline=True,
            )
        return self._media_policy

    def beam_search(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        params: BeamSearchParams,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[BeamSearchOutput]:
        """Beam search for each prompt (vLLM's ``LLM.beam_search``): one
        :class:`~kvrun.beam_search.BeamSearchOutput` per prompt, its ``beam_width``
        best sequences first. The rule is transformers' (see :mod:`kvrun.beam_search`).
        ``lora_request`` as in :meth:`generate`: every beam of a prompt runs with its
        prompt's adapter."""
        tokenizer = self.llm_engine.tokenizer
        token_lists = []
        for item in _as_prompt_list(prompts):
            prompt = _prompt_of(item)
            token_lists.append(tokenizer.encode(prompt) if isinstance(prompt, str) else prompt)
        loras = _as_lora_list(lora_request, len(token_lists))
        return run_beam_search(self.llm_engine, token_lists, params, loras)

    # pooling (runner="pooling") -------------------------------------------------------
    def encode(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[PoolingRequestOutput]:
        """Each prompt's pooled hidden state (the model must run with runner="pooling");
        ``lora_request`` as in :meth:`generate` (the adapted model's hidden states)."""
        items = [_prompt_of(p) for p in _as_prompt_list(prompts)]
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            plist = [pooling_params or PoolingParams(task="encode")] * len(items)
        else:
            plist = list(pooling_params)
            if len(plist) != len(items):
                raise KvrunError(
                    f"got {len(plist)} pooling params for {len(items)} prompts; "
                    "give one, or one per prompt"
                )
        return self._pool(items, plist, use_tqdm, _as_lora_list(lora_request, len(items)))

    def embed(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """Each prompt's embedding (normalised unless the pooler or params say otherwise);
        ``lora_request`` as in :meth:`generate`."""
        return [
            EmbeddingRequestOutput(
                out.request_id, EmbeddingOutput(out.outputs.data.tolist()), out.prompt_token_ids
            )
            for out in self.encode(
                prompts,
                pooling_params or PoolingParams(task="embed"),
                use_tqdm=use_tqdm,
                lora_request=lora_request,
            )
        ]

    def classify(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[ClassificationRequestOutput]:
        """Each prompt's class probabilities (a ``*ForSequenceClassification`` model);
        ``lora_request`` as in :meth:`generate`."""
        items = [_prompt_of(p) for p in _as_prompt_list(prompts)]
        params = [PoolingParams(task="classify")] * len(items)
        loras = _as_lora_list(lora_request, len(items))
        return [
            ClassificationRequestOutput(
                out.request_id,
                ClassificationOutput(out.outputs.data.tolist()),
                out.prompt_token_ids,
            )
            for out in self._pool(items, params, use_tqdm, loras)
        ]

    def score(
        self,
        text_1: str | Sequence[str],
        text_2: str | Sequence[str],
        *,
        use_tqdm: bool = True,
        lora_request: LoRARequest | None = None,
    ) -> list[ScoringRequestOutput]:
        """vLLM's scores for an embedding model: the cosine similarity of each pair's
        embeddings. One ``text_1`` pairs with every ``text_2``; two lists pair up.
        ``lora_request``: the adapter every text is embedded with."""
        firsts = [text_1] if isinstance(text_1, str) else list(text_1)
        seconds = [text_2] if isinstance(text_2, str) else list(text_2)
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds) or not seconds:
            raise KvrunError(
                f"score() pairs text_1 with text_2: got {len(firsts)} and {len(seconds)} "
                "texts; give one text_1 or as many as text_2 (at least one)"
            )
        unique = list(dict.fromkeys([*firsts, *seconds]))
        params = PoolingParams(task="score")
        loras = _as_lora_list(lora_request, len(unique))
        outs = self._pool(list(unique), [params] * len(unique), use_tqdm, loras)
        by_text = dict(zip(unique, outs, strict=True))
        return [
            ScoringRequestOutput(
                f"{by_text[a].request_id}-{by_text[b].request_id}",
                ScoringOutput(cosine(by_text[a].outputs.data, by_text[b].outputs.data)),
                by_text[a].prompt_token_ids + by_text[b].prompt_token_ids,
            )
            for a, b in zip(firsts, seconds, strict=True)
        ]

    def _pool(
        self,
        prompts: list[str | list[int]],
        params: list[PoolingParams],
        use_tqdm: bool,
        loras: Sequence[LoRARequest | None] = (),
    ) -> list[PoolingRequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        pooled: dict[str, PoolingRequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm)
        try:
            for index, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                request_id = str(self._counter)
                self._counter += 1
                lora = loras[index] if loras else None
                engine.add_pooling_request(request_id, prompt, p, lora_request=lora)
                ids.append(request_id)
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    if delta.pooled is not None:
                        pooled[delta.request_id] = PoolingRequestOutput(
                            delta.request_id,
                            PoolingOutput(delta.pooled),
                            list(delta.prompt_token_ids),
                        )
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [pooled[i] for i in ids]

    def start_profile(self) -> None:
        self.llm_engine.start_profile()

    def stop_profile(self) -> None:
        self.llm_engine.stop_profile()

    def _run(
        self,
        prompts: Sequence[str | list[int] | Mapping[str, Any]],
        params: list[SamplingParams],
        use_tqdm: bool,
        loras: Sequence[LoRARequest | None] = (),
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        # Only each request's final output is returned (as vLLM's LLM does), so the
        # accumulator builds nothing on the steps in between.
        final_only: dict[int, SamplingParams] = {}  # one copy per distinct params object
        finished: dict[str, RequestOutput] = {}
        accumulator = OutputAccumulator()
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm)
        try:
            for index, (prompt, p) in enumerate(zip(prompts, params)):
                request_id = str(self._counter)
                self._counter += 1
                if p.output_kind is not RequestOutputKind.FINAL_ONLY:
                    if id(p) not in final_only:
                        final_only[id(p)] = p.replace(output_kind=RequestOutputKind.FINAL_ONLY)
                    p = final_only[id(p)]
                lora = loras[index] if loras else None
                engine.add_request(request_id, prompt, p, lora_request=lora)
                ids.append(request_id)
            while engine.has_unfinished_requests():
                for delta in engine.step():
                    output = accumulator.add(delta)
                    if output is not None and output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
                for _, error in engine.take_failed_requests():
                    raise error
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


def _generate_prompt(item: PromptInput) -> str | list[int] | Mapping[str, Any]:
    """A prompt for generation: a dict with media (or processor settings) goes to the
    engine whole."""
    if isinstance(item, Mapping) and (
        item.get("multi_modal_data") or item.get("mm_processor_kwargs") is not None
    ):
        return item
    return _prompt_of(item)


def _prompt_of(item: PromptInput) -> str | list[int]:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        if item.get("multi_modal_data"):  # generate() hands such prompts on whole
            raise KvrunError(
                "multi_modal_data is taken by generate() only; beam_search and the pooling "
                "calls take text prompts"
            )
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


def _as_lora_list(
    lora: LoRARequest | Sequence[LoRARequest | None] | None, count: int
) -> list[LoRARequest | None]:
    if lora is None:
        return []
    if isinstance(lora, LoRARequest):
        return [lora] * count
    listed = list(lora)
    if len(listed) != count or not all(r is None or isinstance(r, LoRARequest) for r in listed):
        raise KvrunError(
            f"got {len(listed)} lora_request entries for {count} prompts; give one "
            "LoRARequest, or one LoRARequest (or None) per prompt"
        )
    return listed
