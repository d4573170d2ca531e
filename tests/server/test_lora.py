"""LoRA adapters on a real `kvrun serve`: listed in /v1/models, chosen by ``model``, loaded
and unloaded at run time under VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 from the allowed
directories only, every refusal a 400 that names no server path, the server alive after
each. Outputs are checked against peft on transformers (a random tiny Qwen2)."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from kvrun.server.app import build_app
from kvrun.server.config import ServerConfig
from tests.server.conftest import API_KEY, Server, kvrun_runs, launch
from tests.support.lora import make_adapter, merged_checkpoint, peft_greedy

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [10, 20, 30, 40]]
STEPS = 6


@pytest.fixture(scope="module")
def base(random_checkpoint: Callable[..., Path]) -> Path:
    return random_checkpoint("qwen2", seed=5, num_layers=2)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")
    out = {"allowed": root / "allowed", "outside": root / "outside"}
    for path in out.values():
        path.mkdir()
    return out


@pytest.fixture(scope="module")
def adapters(base: Path) -> dict[str, Path]:
    return {
        "static": make_adapter(base, seed=1, r=8, targets=("q_proj", "v_proj", "down_proj")),
        "runtime": make_adapter(base, seed=2, r=4, targets=("k_proj", "o_proj", "up_proj")),
        "rank16": make_adapter(base, seed=3, r=16, targets=("q_proj",)),
    }


@pytest.fixture(scope="module")
def srv(
    base: Path,
    adapters: dict[str, Path],
    dirs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    args = [
        "--model", str(base),
        "--served-model-name", "base",
        "--dtype", "float32",
        "--enable-lora",
        "--max-loras", "2",
        "--max-lora-rank", "8",
        "--lora-modules", f"static={adapters['static']}",
        "--allowed-lora-paths", str(dirs["allowed"]),
    ]  # fmt: skip
    server = launch(
        tmp_path_factory.mktemp("lora-server"),
        args=args,
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1", "VLLM_CPU_KVCACHE_SPACE": "0.1"},
    )
    yield server
    status = server.stop()
    server.cleanup()
    assert status == 0, server.log()


def _complete(srv: Server, model: str, prompt: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": STEPS, "temperature": 0.0}
    with srv.http() as http:
        return http.post("/v1/completions", json={**body, "ignore_eos": True})


def _text(srv: Server, model: str, prompt: list[int]) -> str:
    answer = _complete(srv, model, prompt)
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"] == model
    text: str = answer.json()["choices"][0]["text"]
    return text


def _decoded(base: Path, tokens: list[list[int]]) -> list[str]:
    from kvrun.tokenizer import load_tokenizer_from_dir

    tokenizer = load_tokenizer_from_dir(base)
    return [tokenizer.decode(t) for t in tokens]


def _post(srv: Server, path: str, body: dict[str, object]) -> httpx.Response:
    with srv.http() as http:
        return http.post(path, json=body)


def _alive(srv: Server) -> None:
    with srv.http() as http:
        assert http.get("/health").status_code == 200
    assert _complete(srv, "base", PROMPTS[0]).status_code == 200


def test_adapters_are_listed_with_the_base_model_as_parent(
    srv: Server, adapters: dict[str, Path]
) -> None:
    with srv.http() as http:
        data = http.get("/v1/models").json()["data"]
    assert [card["id"] for card in data] == ["base", "static"]
    assert data[1]["parent"] == "base" and data[0]["parent"] is None
    assert data[1]["root"] == str(adapters["static"])


def test_the_model_name_chooses_the_adapter_in_a_shared_batch(
    srv: Server, base: Path, adapters: dict[str, Path]
) -> None:
    """Base and adapter requests sent at once (one engine batch) each equal peft."""
    want_base = _decoded(base, peft_greedy(base, None, PROMPTS, STEPS))
    want_static = _decoded(base, peft_greedy(base, adapters["static"], PROMPTS, STEPS))
    assert want_base != want_static

    async def run() -> list[str]:
        jobs = [
            asyncio.to_thread(_text, srv, model, prompt)
            for model in ("base", "static")
            for prompt in PROMPTS
        ]
        return list(await asyncio.gather(*jobs))

    got = asyncio.run(run())
    assert got == [*want_base, *want_static]
    chat = _post(
        srv,
        "/v1/chat/completions",
        {"model": "static", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert chat.status_code == 200 and chat.json()["model"] == "static"
    unknown = _complete(srv, "nope", PROMPTS[0])
    assert unknown.status_code == 404 and "`static`" in unknown.json()["error"]["message"]


def test_beam_search_and_embeddings_with_an_adapter(
    srv: Server, base: Path, adapters: dict[str, Path]
) -> None:
    """use_beam_search and /v1/embeddings with ``model`` naming the adapter equal
    transformers on the merged weights (beams: transformers' beam search; embeddings: the
    last token's hidden state, normalised)."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModel

    from tests.engine.test_beam_search import hf_beam_search

    merged = merged_checkpoint(base, adapters["static"])
    [want] = hf_beam_search(merged, PROMPTS[:1], 3, 1.0, STEPS)
    [plain] = hf_beam_search(base, PROMPTS[:1], 3, 1.0, STEPS)
    assert [ids for ids, _ in want] != [ids for ids, _ in plain]
    for model, ref in (("static", want), ("base", plain)):
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": STEPS, "n": 2, "best_of": 3}
        beams = _post(srv, "/v1/completions", {**body, "use_beam_search": True})
        assert beams.status_code == 200, beams.text
        assert beams.json()["model"] == model
        texts = [c["text"] for c in beams.json()["choices"]]
        assert texts == _decoded(base, [[t for t in ids if t != 2] for ids, _ in ref[:2]])
    for model, directory in (("static", merged), ("base", base)):
        answer = _post(srv, "/v1/embeddings", {"model": model, "input": PROMPTS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model
        reference = AutoModel.from_pretrained(str(directory), dtype=torch.float32)
        for item, ids in zip(answer.json()["data"], PROMPTS, strict=True):
            with torch.no_grad():
                hidden = reference(torch.tensor([ids])).last_hidden_state[0, -1]
            got = torch.tensor(item["embedding"])
            assert float(F.cosine_similarity(got, F.normalize(hidden, dim=-1), dim=0)) > 0.9999


def test_runtime_load_and_unload(
    srv: Server, base: Path, adapters: dict[str, Path], dirs: dict[str, Path]
) -> None:
    target = dirs["allowed"] / "runtime"
    shutil.copytree(adapters["runtime"], target)
    loaded = _post(srv, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(target)})
    assert loaded.status_code == 200, loaded.text
    with srv.http() as http:
        ids = [card["id"] for card in http.get("/v1/models").json()["data"]]
    assert ids == ["base", "static", "rt"]
    want = _decoded(base, peft_greedy(base, adapters["runtime"], PROMPTS[:1], STEPS))[0]
    assert _text(srv, "rt", PROMPTS[0]) == want
    again = _post(srv, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": str(target)})
    assert again.status_code == 400 and "already loaded" in again.json()["error"]["message"]
    gone = _post(srv, "/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert gone.status_code == 200, gone.text
    assert _complete(srv, "rt", PROMPTS[0]).status_code == 404
    assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "rt"}).status_code == 404
    # the same directory under another name: a new adapter id, the same answers
    reloaded = _post(srv, "/v1/load_lora_adapter", {"lora_name": "rt2", "lora_path": str(target)})
    assert reloaded.status_code == 200, reloaded.text
    assert _text(srv, "rt2", PROMPTS[0]) == want
    assert _post(srv, "/v1/unload_lora_adapter", {"lora_name": "rt2"}).status_code == 200


def _copy(src: Path, dst: Path, edit: Callable[[Path], None] | None = None) -> Path:
    if not dst.exists():
        shutil.copytree(src, dst)
        if edit is not None:
            edit(dst)
    return dst


def test_every_refusal_is_a_400_that_names_no_server_path(
    srv: Server, adapters: dict[str, Path], dirs: dict[str, Path]
) -> None:
    allowed, outside = dirs["allowed"], dirs["outside"]
    good = adapters["runtime"]
    elsewhere = _copy(good, outside / "adapter")
    linked_dir = allowed / "link-out"
    if not linked_dir.exists():
        linked_dir.symlink_to(elsewhere, target_is_directory=True)
    linked_file = allowed / "file-link-out"
    if not linked_file.exists():
        linked_file.mkdir()
        shutil.copy(good / "adapter_config.json", linked_file)
        (linked_file / "adapter_model.safetensors").symlink_to(
            elsewhere / "adapter_model.safetensors"
        )

    def set_config(key: str, value: object) -> Callable[[Path], None]:
        def edit(path: Path) -> None:
            config = json.loads((path / "adapter_config.json").read_text())
            config[key] = value
            (path / "adapter_config.json").write_text(json.dumps(config))

        return edit

    cases = {
        "traversal": (f"{allowed}/../outside/adapter", "'..' is not accepted"),
        "dot-dot": ("../../etc", "'..' is not accepted"),
        "symlink out": (str(linked_dir), "not inside the directories"),
        "file symlink out": (str(linked_file), "links outside"),
        "url": ("http://169.254.169.254/latest/meta-data", "URLs are not accepted"),
        "file url": ("file:///etc/passwd", "URLs are not accepted"),
        "absolute elsewhere": (str(elsewhere), "not inside the directories"),
        "etc": ("/etc", "not inside the directories"),
        "missing file": (
            str(
                _copy(
                    good,
                    allowed / "noweights",
                    lambda p: (p / "adapter_model.safetensors").unlink(),
                )
            ),
            "adapter_model.safetensors is missing",
        ),
        "no config": (
            str(_copy(good, allowed / "noconfig", lambda p: (p / "adapter_config.json").unlink())),
            "adapter_config.json is missing",
        ),
        "rank too high": (
            str(_copy(adapters["rank16"], allowed / "rank16")),
            "rank r=16 is above max_lora_rank=8",
        ),
        "unknown module": (
            str(_copy(good, allowed / "lmhead", set_config("target_modules", ["lm_head"]))),
            "target module 'lm_head' is not a projection",
        ),
        "malformed": (
            str(
                _copy(
                    good,
                    allowed / "garbage",
                    lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x00" * 99),
                )
            ),
            "not a valid safetensors file",
        ),
        "not a directory": (str(allowed / "absent"), "lora_path is not a directory"),
    }
    for i, (case, (path, reason)) in enumerate(cases.items()):
        answer = _post(srv, "/v1/load_lora_adapter", {"lora_name": f"bad{i}", "lora_path": path})
        assert answer.status_code == 400, (case, answer.text)
        message = answer.json()["error"]["message"]
        assert reason in message, (case, message)
        for secret in (str(dirs["allowed"].parent), "/etc", "169.254"):
            assert secret not in message, (case, message)
    with srv.http() as http:
        assert [c["id"] for c in http.get("/v1/models").json()["data"]] == ["base", "static"]
    _alive(srv)


def test_runtime_routes_need_the_key(srv: Server, adapters: dict[str, Path]) -> None:
    body = {"lora_name": "x", "lora_path": str(adapters["runtime"])}
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        assert httpx.post(srv.base_url + path, json=body).status_code == 401


def test_runtime_routes_do_not_exist_without_the_variable() -> None:
    app = build_app(ServerConfig(api_key=API_KEY, allowed_lora_paths=("/tmp",)))
    with TestClient(app) as client:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            answer = client.post(
                path, json={"lora_name": "x", "lora_path": "/tmp/x"}, headers=headers
            )
            assert answer.status_code == 404
            assert client.post(path, json={}).status_code == 401  # the key is checked first


def test_lora_modules_need_enable_lora_and_good_entries(tmp_path: Path) -> None:
    cases = {
        ("--lora-modules", "a=/x"): "--lora-modules needs --enable-lora",
        ("--enable-lora", "--lora-modules", "nopath"): "is not accepted; accepted: name=path",
        ("--enable-lora", "--lora-modules", '{"name": "a"}'): "is not accepted",
        ("--allowed-lora-paths", str(tmp_path / "none")): "is not a directory",
    }
    runs = {argv: (["serve", *argv], {"VLLM_TARGET_DEVICE": "cpu"}) for argv in cases}
    with kvrun_runs(runs, timeout=120) as started:
        for argv, message in cases.items():
            result = started[argv].result()
            assert result.returncode != 0 and message in result.stderr, (argv, result.stderr)
