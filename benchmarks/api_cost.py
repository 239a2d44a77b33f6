"""What a hosted-API preference run costs: the pairwise recipe online vs in batch mode, and the share
of prompt tokens a provider's prompt cache serves when judge templates put their fixed text first.

No provider is reachable here, so the "provider" is the local fake of the OpenAI API and its Batch API
that the tests use (tests/fake_batch_server.py), reached through the official ``openai`` SDK exactly
as api.openai.com would be. It answers with scripted text (a generation of ~60 words per sample, a
judge verdict with one sentence of reasoning) and bills usage as OpenAI does: prompt tokens (here a
token is a whitespace word, plus one per message), completion tokens, and cached prompt tokens from a
simulated automatic prompt cache (OpenAI's rule: prompts of at least 1024 tokens, cached in 128-token
steps of the longest prefix seen before; ``--cache-min``/``--cache-block`` set a finer cache like
vLLM's automatic prefix caching, 16-token blocks). Dollars are synthpref's own accounting from that
usage at the shipped table's ``gpt-4o-mini`` price, checked here against a recomputation from the
summed usage.

The work is the pairwise recipe's: two candidates per prompt (one plain, one with a terse system
prompt), a pairwise judge in both orders with 2 samples per order, best/worst pairs; the same prompts,
templates, sampling and max tokens in every run, each on a fresh server (empty provider cache) and a
fresh run directory. Printed per run: requests the server answered, prompt / cached / output tokens,
dollars; then the ratios. (No times: they are not what this measures, and the scripted server says
nothing about a provider's speed.) Targets: batch <= 0.5x online; the prefix-first templates serve a larger
share of prompt tokens from cache than the content-first ones (the templates before issue 15, kept in
benchmarks/templates/).

    python benchmarks/api_cost.py                       # 200 prompts
    python benchmarks/api_cost.py --prompts 50 --cache-min 64 --cache-block 16
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHARED_PROMPTS = REPO.parent / "shared" / "evaldata" / "prompts" / "prompts.jsonl"
CONTENT_FIRST = Path(__file__).resolve().parent / "templates" / "pairwise_content_first.jinja"
WORDS = (
    "the a of to and in that is for it with as on be this by are or at from which can more "
    "answer example step first then result value because however also each one two three"
).split()


def load_prompts(n: int) -> list[dict]:
    """The first ``n`` prompts of the shared self-instruct/arena set, else the quickstart prompts
    repeated with a numbered variant (same shape, distinct texts)."""
    rows: list[dict] = []
    if SHARED_PROMPTS.exists():
        for line in SHARED_PROMPTS.open():
            row = json.loads(line)
            if isinstance(row.get("prompt"), str) and row["prompt"].strip():
                rows.append({"id": f"q{len(rows)}", "prompt": row["prompt"]})
            if len(rows) == n:
                return rows
    base = [json.loads(line)["prompt"] for line in (REPO / "recipes/data/quickstart.jsonl").open()]
    while len(rows) < n:
        k = len(rows)
        rows.append({"id": f"q{k}", "prompt": f"{base[k % len(base)]} (variant {k // len(base)})"})
    return rows


def reply(ask, index: int) -> str:
    """A judge prompt gets a verdict for the longer response and one sentence; anything else gets
    ~60 pseudo-words (fewer for a terse system prompt), fixed by the prompt and the sample."""
    text = ask.last("user")
    if "[Response A]" in text:
        a = text.split("[Response A]", 1)[1].split("[End of response A]", 1)[0]
        b = text.split("[Response B]", 1)[1].split("[End of response B]", 1)[0]
        return f"Verdict: {'A+' if len(a) >= len(b) else 'B+'}\nReasoning: it is more complete."
    system = next((m["content"] for m in ask.messages if m["role"] == "system"), "")
    seed = hashlib.sha256(f"{text}|{system}|{index}|{ask.seed}".encode()).digest()
    n = 12 if system else 60
    return " ".join(WORDS[seed[k % len(seed)] % len(WORDS)] for k in range(n))


def recipe(tmp: Path, base_url: str, mode: str, prompts: list[dict], template: Path | None) -> dict:
    from synthpref.backends.pricing import shipped_price

    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    price = shipped_price("openai", "gpt-4o-mini").model_dump()
    spec = {
        "backend": "openai",
        "model": "gpt-4o-mini-2024-07-18",
        "base_url": base_url,
        "mode": mode,
        "price": price,
    }
    judge = {
        "type": "pairwise_judge",
        "name": "pairwise",
        "model": "judge",
        "samples": 2,
        "temperature": 0.7,
        "max_tokens": 32,
    }
    if template is not None:
        judge["template"] = str(template)
    return {
        "name": "api-cost",
        "source": {"path": str(data), "id_field": "id"},
        "models": {
            "assistant": spec,
            "terse": {
                **spec,
                "system_prompt": "Reply in as few words as possible, even if that leaves the "
                "question unanswered.",
            },
            "judge": spec,
        },
        "stages": [
            {
                "type": "generate",
                "models": ["assistant", "terse"],
                "n": 1,
                "temperature": 0.8,
                "max_tokens": 96,
            },
            judge,
            {"type": "pairs", "judge": "pairwise", "rule": "best_worst"},
        ],
        "output": {"dir": str(tmp / "run")},
        "settings": {"shard_size": 64, "batch": {"poll_seconds": 0.2}},
    }


def measure(label: str, mode: str, prompts, template, cache_min: int, cache_block: int) -> dict:
    from rich.console import Console

    import synthpref
    from tests.fake_batch_server import FakeBatchProvider

    os.environ.setdefault("OPENAI_API_KEY", "sk-local")
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeBatchProvider(reply, cache_min_tokens=cache_min, cache_block=cache_block) as server,
    ):
        quiet = Console(file=io.StringIO())  # warnings and batch polling notes
        result = synthpref.run(
            recipe(Path(tmp), server.openai_base_url, mode, prompts, template),
            progress=False,
            console=quiet,
        )
        stages = json.loads((result.run_dir / "summary.json").read_text())["stages"]
        models = [m for s in stages for m in s.get("models", {}).values()]
        rows = sum(1 for _ in (result.run_dir / "data" / "preference.jsonl").open())
        answered = len(server.lines_answered) + len(server.online_requests)
        jobs = sum(server.batch_creations.values())
    out = {
        "label": label,
        "requests": answered,
        "jobs": jobs,
        "prompt_tokens": sum(
            m["input_tokens"] + m["cached_input_tokens"] + m["cache_write_tokens"] for m in models
        ),
        "cached_tokens": sum(m["cached_input_tokens"] for m in models),
        "output_tokens": sum(m["output_tokens"] for m in models),
        "dollars": sum(m["dollars"] for m in models),
        "pairs": rows,
    }
    from synthpref.backends.pricing import shipped_price

    price = shipped_price("openai", "gpt-4o-mini")
    recomputed = (
        (
            (out["prompt_tokens"] - out["cached_tokens"]) * price.input
            + out["cached_tokens"] * price.cached_input
            + out["output_tokens"] * price.output
        )
        / 1e6
        * (price.batch_discount if mode == "batch" else 1.0)
    )
    assert abs(recomputed - out["dollars"]) < 1e-9, (recomputed, out["dollars"])
    return out


def show(r: dict) -> None:
    share = r["cached_tokens"] / r["prompt_tokens"] if r["prompt_tokens"] else 0.0
    print(
        f"{r['label']:<38} {r['requests']:>6} req {r['jobs']:>3} jobs  prompt {r['prompt_tokens']:>9,}"
        f"  cached {r['cached_tokens']:>9,} ({share:5.1%})  output {r['output_tokens']:>8,}"
        f"  ${r['dollars']:.4f}  {r['pairs']} pairs"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--cache-min", type=int, default=1024, help="provider cache: minimum prompt")
    ap.add_argument("--cache-block", type=int, default=128, help="provider cache: block size")
    ap.add_argument(
        "--fine-cache",
        type=int,
        nargs=2,
        default=(32, 16),
        metavar=("MIN", "BLOCK"),
        help="the finer cache the template comparison also runs with (vLLM-like)",
    )
    args = ap.parse_args()
    prompts = load_prompts(args.prompts)
    from synthpref.backends.pricing import table_date

    print(
        f"pairwise recipe, {len(prompts)} prompts, 2 candidates, judge both orders x 2 samples; "
        f"gpt-4o-mini at the shipped prices (table of {table_date()}); provider cache "
        f"min {args.cache_min} / block {args.cache_block} tokens"
    )
    coarse = (args.cache_min, args.cache_block)
    online = measure("online", "online", prompts, None, *coarse)
    batch = measure("batch", "batch", prompts, None, *coarse)
    for r in (online, batch):
        show(r)
    print(
        f"batch / online dollars: {batch['dollars'] / online['dollars']:.3f} (target <= 0.5); "
        f"same requests: {online['requests'] == batch['requests']}, same tokens: "
        f"{online['prompt_tokens'] == batch['prompt_tokens']}"
    )
    fine = tuple(args.fine_cache)
    print(
        f"\ntemplate order, online: the cache above, then a fine cache (min {fine[0]} / block "
        f"{fine[1]} tokens, like vLLM's prefix caching):"
    )
    results = []
    for label, template, cache in [
        ("prefix-first templates (shipped)", None, coarse),
        ("content-first templates (before)", CONTENT_FIRST, coarse),
        ("prefix-first, fine cache", None, fine),
        ("content-first, fine cache", CONTENT_FIRST, fine),
    ]:
        r = measure(label, "online", prompts, template, *cache)
        results.append(r)
        show(r)
    for a, b in ((results[0], results[1]), (results[2], results[3])):
        share_a = a["cached_tokens"] / a["prompt_tokens"]
        share_b = b["cached_tokens"] / b["prompt_tokens"]
        print(
            f"cached share {a['label']}: {share_a:.1%} vs {share_b:.1%}; dollars "
            f"{a['dollars'] / b['dollars']:.3f}x"
        )


if __name__ == "__main__":
    main()
