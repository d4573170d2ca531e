"""vLLM's `serve` flags on `kvrun serve`: supported, refused by name, or warned about.

Parsing goes through :func:`kvrun.cli.main.parse_command_line`, what the `kvrun`
command runs; a few cases run the real command to see its exit status and output.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from kvrun.cli import serve_cmd
from kvrun.cli.main import parse_command_line
from kvrun.cli.vllm_flag_table import FLAGS
from kvrun.cli.vllm_flags import (
    NOTED_DEST,
    Arity,
    Verdict,
    VllmFlag,
    add_vllm_flags,
    flag_status,
    no_effect_warnings,
    normalize_argv,
)
from kvrun.config import EngineArgs
from kvrun.errors import CommandLineError

DOC = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrun serve")
    serve_cmd.add_arguments(parser)
    return parser


SERVE_PARSER = _serve_parser()
BY_NAME = {f.name: f for f in FLAGS}


def _parse(*args: str) -> argparse.Namespace:
    return parse_command_line(["serve", *args])


def _refusal(*args: str) -> str:
    with pytest.raises(CommandLineError) as caught:
        _parse(*args)
    return str(caught.value)


# -- the table ---------------------------------------------------------------------------


def test_the_table_is_vllms_whole_surface() -> None:
    # vLLM's serve parser has ~300 flags; the groups of its --help are all here
    assert len(FLAGS) >= 280
    groups = {f.group for f in FLAGS}
    assert {
        "serve",
        "Frontend",
        "ModelConfig",
        "LoadConfig",
        "AttentionConfig",
        "StructuredOutputsConfig",
        "ParallelConfig",
        "CacheConfig",
        "OffloadConfig",
        "MultiModalConfig",
        "LoRAConfig",
        "ObservabilityConfig",
        "SchedulerConfig",
        "CompilationConfig",
        "KernelConfig",
        "VllmConfig",
    } <= groups
    for short in ("-tp", "-pp", "-dp", "-q", "-O", "-sc", "-cc", "-ep", "-asc"):
        assert any(short in f.names for f in FLAGS), short


def test_no_spelling_is_listed_twice() -> None:
    counts = Counter(s for f in FLAGS for s in f.option_strings)
    assert [s for s, n in counts.items() if n > 1] == []


@pytest.mark.parametrize("flag", FLAGS, ids=lambda f: f.name)
def test_every_flag_is_supported_or_says_why_not(flag: VllmFlag) -> None:
    status = flag_status(flag, SERVE_PARSER)
    if flag.verdict is Verdict.KVRUN:
        assert status == "supported", f"{flag.name} is listed as kvrun's but the parser lacks it"
    else:
        assert status in ("supported", "refuse", "warn")
        assert flag.reason.strip(), flag.name
    # every spelling parses: kvrun's own action, an alias of one, or the table's action
    defined = {s for a in SERVE_PARSER._actions for s in a.option_strings}
    assert set(flag.option_strings) <= defined


def test_the_flags_that_map_onto_kvrun_are_supported() -> None:
    for name in (
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--served-model-name",
        "--dtype",
        "--seed",
        "--enforce-eager",
        "--block-size",
        "--trust-remote-code",
        "--load-format",
        "--tokenizer",
        "--revision",
        "--download-dir",
        "--max-logprobs",
        "--uvicorn-log-level",
        "--enable-prefix-caching",
        "--enable-chunked-prefill",
        "--kv-cache-dtype",
        "--num-gpu-blocks-override",
        "--attention-backend",
        "--shutdown-timeout",
        "--root-path",
    ):
        assert flag_status(BY_NAME[name], SERVE_PARSER) == "supported", name


@pytest.mark.parametrize(
    "name",
    [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "--tool-parser-plugin",
        "--exclude-tools-when-tool-choice-none",
        "--reasoning-parser",
        "--structured-outputs-config",
        "--guided-decoding-backend",
        "--runner",
        "--convert",
        "--pooler-config",
    ],
)
def test_issue_14_flags_are_kvruns_own(name: str) -> None:
    flag = BY_NAME[name]
    assert flag.verdict is Verdict.KVRUN
    assert flag_status(flag, SERVE_PARSER) == "supported"


# -- driven by the parser ------------------------------------------------------------------


def _parser_with(*defined: tuple[str, dict[str, object]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrun serve", exit_on_error=False)
    for name, kw in defined:
        parser.add_argument(name, **kw)  # type: ignore[arg-type]
    add_vllm_flags(parser, FLAGS)
    return parser


def test_a_flag_the_parser_defines_is_never_refused() -> None:
    # what the tool-calling change will add: the table then stands aside by itself
    parser = _parser_with(
        ("--enable-auto-tool-choice", {"action": "store_true"}),
        ("--tool-call-parser", {"default": None}),
    )
    args = parser.parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"])
    assert (args.enable_auto_tool_choice, args.tool_call_parser) == (True, "hermes")
    # vLLM's --no- form of the switch becomes an alias with the switch's destination
    assert parser.parse_args(["--no-enable-auto-tool-choice"]).enable_auto_tool_choice is False
    assert flag_status(BY_NAME["--enable-auto-tool-choice"], parser) == "supported"
    assert flag_status(BY_NAME["--tool-call-parser"], parser) == "supported"
    # and without them, the same command line is refused by name
    with pytest.raises(CommandLineError, match=r"^--tool-call-parser hermes is not supported"):
        _parser_with().parse_args(["--tool-call-parser", "hermes"])


def test_a_short_alias_follows_the_long_name_kvrun_defines() -> None:
    parser = _parser_with(("--tensor-parallel-size", {"type": int, "default": 1}))
    assert parser.parse_args(["-tp", "4"]).tensor_parallel_size == 4
    assert flag_status(BY_NAME["--tensor-parallel-size"], parser) == "supported"


def test_num_gpu_blocks_override_is_kvruns_num_kv_blocks() -> None:
    args = _parse("--num-gpu-blocks-override", "7")
    assert args.num_kv_blocks == 7
    assert EngineArgs.from_cli_args(args).num_kv_blocks == 7
    assert _parse().num_kv_blocks is None


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["--trust-remote-code"], "trust_remote_code", True),
        (["--trust-remote-code", "--no-trust-remote-code"], "trust_remote_code", False),
        (["--no-disable-uvicorn-access-log"], "disable_uvicorn_access_log", False),
        (["--no-trust-request-chat-template"], "trust_request_chat_template", False),
        (["--no-enforce-eager"], "enforce_eager", False),
        (["--no-enable-prefix-caching"], "enable_prefix_caching", False),
    ],
)
def test_vllms_bool_spellings_of_kvruns_flags(argv: list[str], dest: str, value: bool) -> None:
    assert getattr(_parse(*argv), dest) is value


# -- refused, accepted, warned ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["-dcp", "2"],
            "-dcp 2 (vLLM's --decode-context-parallel-size) is not supported: kvrun's "
            "parallelism is tensor and pipeline parallelism (the mp and ray executors) and data "
            "parallelism behind one frontend (docs/distributed.md); this part of vLLM's is not "
            "built. Accepted: 1.",
        ),
        (
            ["--nnodes=2"],
            "--nnodes 2 is not supported: kvrun's parallelism is tensor and pipeline "
            "parallelism (the mp and ray executors) and data parallelism behind one frontend "
            "(docs/distributed.md); this part of vLLM's is not built. Accepted: 1.",
        ),
        (
            ["--lora-target-modules", "q_proj"],
            "--lora-target-modules q_proj is not supported: kvrun's LoRA adapters are plain "
            "PEFT LoRA on the attention and MLP projections, in the model's dtype.",
        ),
        (
            ["--fully-sharded-loras"],
            "--fully-sharded-loras is not supported: kvrun's LoRA adapters are plain PEFT "
            "LoRA on the attention and MLP projections, in the model's dtype. "
            "Accepted: --no-fully-sharded-loras.",
        ),
        (
            ["-dpn", "1"],
            "-dpn 1 (vLLM's --data-parallel-rank) is not supported: kvrun's data-parallel "
            "ranks share rank 0's frontend; vLLM's external load balancing (one API server "
            "per rank) is not built. Instead: --headless --data-parallel-start-rank R (or "
            "VLLM_DP_RANK=R).",
        ),
        (
            ["--hf-token"],
            "--hf-token is not supported: the hub token comes from the environment. "
            "Instead: HF_TOKEN.",
        ),
    ],
)
def test_refusals_name_the_flag_why_and_what_instead(argv: list[str], message: str) -> None:
    assert _refusal(*argv) == message


def test_quantization_is_kvruns_own_flag() -> None:
    assert EngineArgs.from_cli_args(_parse("-q", "gguf")).quantization == "gguf"
    assert EngineArgs.from_cli_args(_parse("--quantization", "awq")).quantization == "awq"
    assert EngineArgs.from_cli_args(_parse()).quantization is None


def test_dotted_json_keys_are_refused_as_their_flag() -> None:
    assert _refusal("--speculative-config.method", "ngram", "-sc.num_speculative_tokens", "3")
    message = _refusal("--speculative-config.method", "ngram")
    assert message == (
        '--speculative-config {"method": "ngram"} is not supported: speculative decoding '
        "is not built."
    )
    assert _refusal("-O3").startswith("-O 3 (vLLM's --optimization-level) is not supported")
    assert _refusal("-O.mode", "3").startswith('--compilation-config {"mode": 3} is not')


@pytest.mark.parametrize(
    "argv",
    [
        ["-tp", "1"],
        ["--decode-context-parallel-size", "1.0"],
        ["-pp", "1", "-dp", "1", "--nnodes", "1"],
        ["--no-enable-lora", "--no-enable-expert-parallel"],
        ["--scheduling-policy", "FCFS"],
        ["--distributed-executor-backend", "uni"],
        ["--generation-config", "vllm"],
        ["-O0"],
        ["--disable-log-requests"],
        ["--no-enable-log-requests"],
    ],
)
def test_values_asking_for_what_kvrun_does_are_accepted_quietly(argv: list[str]) -> None:
    args = _parse(*argv)
    assert getattr(args, NOTED_DEST, None) is None
    assert not [k for k in vars(args) if k.startswith("_vllm_") and k != NOTED_DEST]


def test_no_effect_flags_are_accepted_and_each_warned_about_once() -> None:
    args = _parse("--swap-space", "4", "--enable-log-requests", "--stream-interval", "1")
    assert no_effect_warnings(args, FLAGS) == [
        "--swap-space 4 has no effect in kvrun: kvrun preempts by recomputing, never by "
        "swapping (as vLLM V1)",
        "--enable-log-requests has no effect in kvrun: kvrun has no request log",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--foo"], "unknown flag --foo; see kvrun serve --help"),
        (["--foo=3"], "unknown flag --foo; see kvrun serve --help"),
        (["--max-model", "5"], "unknown flag --max-model; see kvrun serve --help"),  # no prefixes
        (["a", "b"], "unexpected argument 'b'; see kvrun serve --help"),
    ],
)
def test_unknown_flags_are_named(argv: list[str], message: str) -> None:
    assert _refusal(*argv) == message


def test_vllms_underscore_spelling() -> None:
    args = _parse("--max_model_len", "512", "--max_num_seqs=3", "--enable_prefix_caching")
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching) == (512, 3, True)


def test_normalize_argv() -> None:
    flags = [
        VllmFlag(("--compilation-config", "-cc"), "VllmConfig", Arity.JSON, Verdict.REFUSE, "r"),
        VllmFlag(("--hf-overrides",), "ModelConfig", Arity.JSON, Verdict.REFUSE, "r"),
    ]
    assert normalize_argv(
        [
            "serve",
            "--max_model_len=5",
            "-O3",
            "--compilation-config.mode",
            "3",
            "--hf-overrides.rope_scaling.type=yarn",
            "--compilation-config.cudagraph_capture_sizes+",
            "1",
            "--compilation-config.cudagraph_capture_sizes+=2",
            "--",
            "--keep_this",
        ],
        flags,
    ) == [
        "serve",
        "--max-model-len=5",
        "-O",
        "3",
        "--compilation-config",
        '{"mode": 3, "cudagraph_capture_sizes": [1, 2]}',
        "--hf-overrides",
        '{"rope_scaling": {"type": "yarn"}}',
        "--",
        "--keep_this",
    ]


# -- the real command --------------------------------------------------------------------


def _kvrun(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "kvrun.cli.main", "serve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "INFO"},
    )
    return done, time.monotonic() - start


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["-dcp", "2"],
            "kvrun serve: -dcp 2 (vLLM's --decode-context-parallel-size) is not supported: "
            "kvrun's parallelism is tensor and pipeline parallelism (the mp and ray executors) "
            "and data parallelism behind one frontend (docs/distributed.md); this part of "
            "vLLM's is not built. Accepted: 1.",
        ),
        (
            ["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'],
            'kvrun serve: --speculative-config {"method": "ngram", "num_speculative_tokens": '
            "3} is not supported: speculative decoding is not built.",
        ),
        (["--foo"], "kvrun serve: unknown flag --foo; see kvrun serve --help"),
    ],
)
def test_kvrun_serve_refuses_before_loading_anything(args: list[str], line: str) -> None:
    done, elapsed = _kvrun(*args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [line]
    assert done.stdout == ""
    assert elapsed < 30  # the interpreter's start-up and imports; no model, no engine


def test_kvrun_serve_logs_a_no_effect_flag_once() -> None:
    # the port error stops it after the warnings and before the engine starts
    done, _ = _kvrun("--swap-space", "4", "-tp", "1", "--port", "70000")
    assert done.returncode == 2
    warnings = [line for line in done.stderr.splitlines() if "has no effect in kvrun" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "--swap-space 4 has no effect in kvrun: kvrun preempts by recomputing, never by "
        "swapping (as vLLM V1)"
    )
    assert done.stderr.strip().splitlines()[-1] == (
        "kvrun: error: --port must be in [0, 65535], got 70000"
    )


# -- the doc -------------------------------------------------------------------------------


def test_docs_table_is_in_sync() -> None:
    begin = "<!-- BEGIN GENERATED: kvrun serve --vllm-flags-markdown -->\n\n"
    end = "<!-- END GENERATED -->"
    generated = DOC[DOC.index(begin) + len(begin) : DOC.index(end)]
    assert generated == serve_cmd.vllm_flags_markdown() + "\n", (
        "regenerate with `kvrun serve --vllm-flags-markdown`"
    )
    for flag in FLAGS:
        assert f"| {', '.join(f'`{s}`' for s in flag.option_strings)} |" in generated


def test_the_markdown_option_prints_the_table() -> None:
    done, _ = _kvrun("--vllm-flags-markdown")
    assert done.returncode == 0, done.stderr
    assert done.stdout == serve_cmd.vllm_flags_markdown()
