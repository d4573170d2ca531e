"""Where a peer's greedy tokens leave the reference's, is it a near-tie? For a run of
benchmarks/run.py (its results.json).

Peers whose arithmetic differs on purpose (bf16 inference, an f16 KV cache, another
summation order) cannot match float32 token for token; what can be checked is that they
part only where two tokens were nearly tied. For every sequence where a peer differs
from the reference peer, this takes the first differing position, runs transformers in
float32 (the project's oracle) on the prompt plus the tokens both agreed on, and prints
the margin there: log p(reference's token) - log p(peer's token), in nats. One JSON
line per divergence, then one summary line per peer and workload.

    .venv/bin/python benchmarks/greedy_ties.py benchmarks/results/<stamp>/results.json

Run it with a Python that has transformers and torch (the dev venv). The prompts are
rendered again from benchmarks/prompts.json as run.py did (the run's --prompts cut
included); results.json does not store them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import _render_prompts  # noqa: E402


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the two sequences differ (None where they are equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def divergences(
    report: dict[str, Any], reference: str, prompts: dict[str, list[list[int]]]
) -> list[dict[str, Any]]:
    """Every (workload, peer, prompt) whose tokens differ from ``reference``'s: the
    position, both tokens and the context (prompt + agreed tokens) to score."""
    found = []
    for workload, peers in report["results"].items():
        ref = peers.get(reference, {}).get("token_ids")
        if ref is None:
            continue
        for name, res in peers.items():
            if name == reference or "token_ids" not in res:
                continue
            for i, (a, b) in enumerate(zip(ref, res["token_ids"], strict=True)):
                k = first_difference(a, b)
                if k is None or k >= min(len(a), len(b)):
                    continue
                found.append(
                    {
                        "workload": workload,
                        "peer": name,
                        "prompt": i,
                        "position": k,
                        "reference_token": a[k],
                        "peer_token": b[k],
                        "context": prompts[workload][i] + a[:k],
                    }
                )
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="benchmarks/results/<stamp>/results.json")
    parser.add_argument(
        "--reference", default=None, help="peer to compare against (default: the run's)"
    )
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    reference = args.reference or report["args"]["reference"]
    model_dir = Path(report["args"]["model"])
    prompts = _render_prompts(model_dir)
    if report["args"].get("prompts") is not None:
        prompts["throughput"] = prompts["throughput"][: report["args"]["prompts"]]

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()  # type: ignore[no-untyped-call]
    margins: dict[tuple[str, str], list[float]] = {}
    for d in divergences(report, reference, prompts):
        with torch.no_grad():
            logits = model(torch.tensor([d.pop("context")])).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1)
        d["margin_nats"] = round(float(logp[d["reference_token"]] - logp[d["peer_token"]]), 4)
        d["oracle_argmax"] = int(logits.argmax())
        margins.setdefault((d["workload"], d["peer"]), []).append(d["margin_nats"])
        print(json.dumps(d))
    for workload, peers in report["results"].items():
        ref = peers.get(reference, {}).get("token_ids")
        for name, res in peers.items():
            if name == reference or ref is None or "token_ids" not in res:
                continue
            same = sum(a == b for a, b in zip(ref, res["token_ids"], strict=True))
            found = margins.get((workload, name), [])
            print(
                json.dumps(
                    {
                        "summary": f"{workload} {name} vs {reference}",
                        "identical": f"{same}/{len(ref)}",
                        "max_margin_nats": max(found) if found else None,
                    }
                )
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
