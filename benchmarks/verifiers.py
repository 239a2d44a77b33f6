"""Verifier throughput and RISE yield: checks per second of the ``math_verifier`` and
``code_verifier`` stages with one worker and with one per core, and the share of RISE edits
(``inject_errors``) the verifier confirms as wrong yet small.

Throughput. Responses are built deterministically from the shipped problem files: for math, each
problem of ``recipes/data/math_problems.jsonl`` answered in six shapes (the right answer boxed, the
right answer in a plain sentence, a wrong answer, a fraction or decimal equal to it, no answer, a
long worked solution); for code, each problem of ``recipes/data/code_problems.jsonl`` answered by a
correct solution (written below), a wrong one, one that loops until ``--code-timeout`` and one that
crashes. Each record is one problem with one candidate per shape (the problems cycle until there
are N responses); records go through the stage's ``process()`` in shards of ``--shard-size``
records, as the executor hands them over. Each setting (workers = 1, workers = all cores) runs in a
fresh process: one warm-up shard first (worker start-up, imports: printed as the first-shard time),
then only the ``process()`` calls of the measured shards are timed. Equal work: both settings print
their verdict counts per shape, which must be equal, and how many of each shape got the verdict the
shape is built to get; code adds the programs and tests run.

RISE. ``recipes/math_verified.yaml`` (first ``--rise-problems`` problems, the embedded model) runs
through ``synthpref.run`` in a fresh output directory in its own process; from ``summary.json`` the
``inject_errors`` counters give the share of requested edits kept (the verifier found them wrong and
they are at most ``max_edit_tokens`` tokens) and why the others were discarded; from
``data/records.parquet`` the median size of the kept edits. Slow on CPU: ``--skip-rise`` leaves it
out.

    python benchmarks/verifiers.py                       # math 2000, code 200, RISE on 24 problems
    python benchmarks/verifiers.py --math 64 --code 8 --rise-problems 2 --rise-max-tokens 48 \\
        --rise-allow-truncated                           # a smoke test: runs, figures meaningless
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

from _shared import child_job, run_job

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MATH_PROBLEMS = REPO / "recipes/data/math_problems.jsonl"
CODE_PROBLEMS = REPO / "recipes/data/code_problems.jsonl"
MATH_RECIPE = REPO / "recipes/math_verified.yaml"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# math responses ---------------------------------------------------------------------------------


def _long_solution(prompt: str, answer: str, k: int) -> str:
    """A worked solution of ~1.5 kB with many numbers before the boxed answer, so extraction has
    to pick the final answer out of competing ones."""
    numbers = re.findall(r"\d+", prompt)
    lines = [f"Let us work through this carefully. The problem says: {prompt}", ""]
    for i, n in enumerate(numbers, 1):
        lines.append(
            f"Step {i}: the problem gives the quantity {n}, which we write as $q_{i} = {n}$."
        )
    lines.append("")
    for i in range(4):
        lines.append(
            f"Check {i + 1}: rereading the question, nothing else is given, so the result depends "
            f"only on {', '.join(numbers) or 'the stated values'}; a quick estimate puts it "
            f"between {max(int(answer) - 10 - i, 0)} and {int(answer) + 10 + i}."
        )
    lines += ["", f"Combining the quantities as the question asks gives {answer}.", ""]
    lines.append(f"Attempt {k}: therefore the final answer is $\\boxed{{{answer}}}$.")
    return "\n".join(lines)


def _equivalent(answer: str, k: int) -> str:
    if k % 2 == 0:
        return f"The answer is $\\frac{{{2 * int(answer)}}}{{2}}$."
    return f"So the answer is {answer}.0 exactly."


#: shape -> (builder(answer, prompt, record index), the verdict it is built to get)
MATH_SHAPES = {
    "boxed": (lambda a, p, k: f"Adding it up, the answer is $\\boxed{{{a}}}$.", "correct"),
    "plain": (lambda a, p, k: f"The answer is {a}.", "correct"),
    "wrong": (lambda a, p, k: f"The answer is $\\boxed{{{int(a) + 1 + k % 3}}}$.", "wrong"),
    "equivalent": (lambda a, p, k: _equivalent(a, k), "correct"),
    "no_answer": (lambda a, p, k: "I am not sure how to solve this problem, sorry.", "wrong"),
    "long": (lambda a, p, k: _long_solution(p, a, k), "correct"),
}


# code responses ---------------------------------------------------------------------------------

#: problem id -> (a correct solution, a wrong one); written for this benchmark
CODE_SOLUTIONS = {
    "code-01": ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    return a - b\n"),
    "code-02": (
        "def is_even(n):\n    return n % 2 == 0\n",
        "def is_even(n):\n    return n % 2 == 1\n",
    ),
    "code-03": (
        "def reverse_string(s):\n    return s[::-1]\n",
        "def reverse_string(s):\n    return s\n",
    ),
    "code-04": (
        "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n"
        "    return out\n",
        "def factorial(n):\n    out = 1\n    for i in range(2, n):\n        out *= i\n"
        "    return out\n",
    ),
    "code-05": (
        "def largest(numbers):\n    best = numbers[0]\n    for x in numbers[1:]:\n"
        "        if x > best:\n            best = x\n    return best\n",
        "def largest(numbers):\n    return numbers[0]\n",
    ),
    "code-06": (
        "def count_vowels(s):\n    return sum(ch in 'aeiouAEIOU' for ch in s)\n",
        "def count_vowels(s):\n    return sum(ch in 'aeiou' for ch in s)\n",
    ),
    "code-07": (
        "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n"
        "        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
        "def fizzbuzz(n):\n    if n % 3 == 0:\n        return 'Fizz'\n    if n % 5 == 0:\n"
        "        return 'Buzz'\n    return str(n)\n",
    ),
    "code-08": (
        "def is_palindrome(s):\n    return s == s[::-1]\n",
        "def is_palindrome(s):\n    return len(s) % 2 == 1\n",
    ),
    "code-09": (
        "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n",
        "def celsius_to_fahrenheit(c):\n    return c * 5 / 9 + 32\n",
    ),
    "code-10": (
        "def square_all(numbers):\n    return [x * x for x in numbers]\n",
        "def square_all(numbers):\n    for i, x in enumerate(numbers):\n"
        "        numbers[i] = x * x\n    return numbers\n",
    ),
    "code-11": (
        "a, b = map(int, input().split())\nprint(a + b)\n",
        "a, b = map(int, input().split())\nprint(a * b)\n",
    ),
    "code-12": (
        "name = input().strip()\nprint(f'Hello, {name}!')\n",
        "name = input().strip()\nprint(f'Hello {name}')\n",
    ),
    "code-13": (
        "print(max(map(int, input().split())))\n",
        "print(sorted(input().split())[-1])\n",
    ),
}


def _def_line(solution: str) -> str | None:
    first = solution.splitlines()[0]
    return first if first.startswith("def ") else None


def _loops(solution: str) -> str:
    head = _def_line(solution)
    if head:
        return f"{head}\n    while True:\n        pass\n"
    return "import sys\ndata = sys.stdin.read()\nwhile True:\n    pass\n"


def _crashes(solution: str) -> str:
    head = _def_line(solution)
    if head:
        return f"{head}\n    raise RuntimeError('unexpected state')\n"
    return "import sys\nvalues = [int(x) for x in sys.stdin.read().split()]\nprint(values[99])\n"


def _fenced(code: str) -> str:
    return f"Here is my solution:\n\n```python\n{code}```\n\nIt follows the task as stated."


#: shape -> (builder(correct, wrong), the verdict it is built to get)
CODE_SHAPES = {
    "correct": (lambda right, wrong: _fenced(right), "all pass"),
    "wrong": (lambda right, wrong: _fenced(wrong), "some fail"),
    "loops": (lambda right, wrong: _fenced(_loops(right)), "none pass"),
    "crashes": (lambda right, wrong: _fenced(_crashes(right)), "none pass"),
}


# records and verdicts ---------------------------------------------------------------------------


def build_records(kind: str, n: int) -> list:
    """``n`` responses, one record per (problem, round) holding one candidate per shape; the last
    record holds fewer when ``n`` is not a multiple of the number of shapes."""
    from synthpref.records import Candidate, Message, Record

    shapes = list(MATH_SHAPES if kind == "math" else CODE_SHAPES)
    problems = _rows(MATH_PROBLEMS if kind == "math" else CODE_PROBLEMS)
    records = []
    for start in range(0, n, len(shapes)):
        k = start // len(shapes)
        problem = problems[k % len(problems)]
        candidates = []
        for shape in shapes[: n - start]:
            if kind == "math":
                text = MATH_SHAPES[shape][0](problem["answer"], problem["prompt"], k)
            else:
                text = CODE_SHAPES[shape][0](*CODE_SOLUTIONS[problem["id"]])
            candidates.append(Candidate(id=shape, model="bench", text=text))
        meta_key = "answer" if kind == "math" else "tests"
        records.append(
            Record(
                id=f"{problem['id']}-r{k:05d}",
                prompt=[Message(role="user", content=problem["prompt"])],
                source_row=k,
                metadata={meta_key: problem[meta_key]},
                candidates=candidates,
            )
        )
    return records


def verdict(kind: str, judgment) -> str:
    if judgment.status != "ok" or judgment.score is None:
        return "failed"
    if kind == "math":
        return "correct" if judgment.score >= 1.0 else "wrong"
    if judgment.score >= 1.0:
        return "all pass"
    return "none pass" if judgment.score <= 0.0 else "some fail"


def expected(kind: str, shape: str, got: str) -> bool:
    want = (MATH_SHAPES if kind == "math" else CODE_SHAPES)[shape][1]
    return got == want or (want == "some fail" and got == "none pass")


def _programs(details: dict) -> int:
    """Interpreters the code verifier started for one response: one for all its assert tests,
    one per stdin/stdout case."""
    runs = details.get("sandbox", {}).get("runs", {})
    return int("asserts" in runs) + len(runs.get("stdio", []))


def verifier_job(cfg: dict, out: str) -> None:
    """One setting: a warm-up shard, then the measured shards through the stage's process()."""
    kind = cfg["kind"]
    if kind == "math":
        from synthpref.judges.math_verifier import MathVerifier, MathVerifierParams

        stage = MathVerifier("math", MathVerifierParams(workers=cfg["workers"]))
    else:
        from synthpref.judges.code_verifier import CodeVerifier, CodeVerifierParams

        params = CodeVerifierParams(
            workers=cfg["workers"],
            allow_code_execution=True,
            timeout_seconds=cfg["code_timeout"],
        )
        stage = CodeVerifier("code", params)
    records = build_records(kind, cfg["n"])
    size = cfg["shard_size"]
    shards = [records[i : i + size] for i in range(0, len(records), size)]
    # the warm-up repeats the first shard's work (code: its correct and wrong responses only, a
    # loop costs a whole timeout and threads need no warming)
    warm = build_records(kind, cfg["n"])[:size]
    if kind == "code":
        warm = warm[:1]
        warm[0].candidates = [c for c in warm[0].candidates if c.id in ("correct", "wrong")]

    async def go() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        await stage.process(warm)
        first = time.perf_counter() - t0
        stage.counters.clear()
        times = []
        for shard in shards:
            t0 = time.perf_counter()
            await stage.process(shard)
            times.append(time.perf_counter() - t0)
        return first, times

    first, times = asyncio.run(go())
    counts: dict[str, Counter] = {}
    as_built: Counter = Counter()
    programs = tests = 0
    for record in records:
        judgments = {
            j.candidate_ids[0]: j for j in record.judgments_by("math" if kind == "math" else "code")
        }
        for candidate in record.candidates:
            judgment = judgments[candidate.id]
            got = verdict(kind, judgment)
            counts.setdefault(candidate.id, Counter())[got] += 1
            as_built[candidate.id] += expected(kind, candidate.id, got)
            if kind == "code" and judgment.status == "ok":
                programs += _programs(judgment.details)
                tests += judgment.details.get("total", 0)
    Path(out).write_text(
        json.dumps(
            {
                "workers": cfg["workers"],
                "records": len(records),
                "responses": sum(len(r.candidates) for r in records),
                "shards": len(shards),
                "first_shard_s": first,
                "seconds": sum(times),
                "counts": {shape: dict(c) for shape, c in counts.items()},
                "as_built": dict(as_built),
                "programs": programs,
                "tests": tests,
                "counters": dict(stage.counters),
            }
        )
    )


# RISE -------------------------------------------------------------------------------------------


def rise_recipe(cfg: dict, run_dir: Path) -> dict:
    """The shipped recipe, limited to the first problems and written to ``run_dir``."""
    import yaml

    recipe = yaml.safe_load(MATH_RECIPE.read_text())
    recipe["source"]["path"] = str(MATH_RECIPE.parent / recipe["source"]["path"])
    recipe["source"]["limit"] = cfg["problems"]
    recipe["output"]["dir"] = str(run_dir)
    generate = next(s for s in recipe["stages"] if s["type"] == "generate")
    inject = next(s for s in recipe["stages"] if s["type"] == "inject_errors")
    if cfg["max_tokens"] is not None:
        # the recipe's headroom of the editing model over the solutions it edits, kept
        headroom = inject["max_tokens"] - generate["max_tokens"]
        generate["max_tokens"] = cfg["max_tokens"]
        inject["max_tokens"] = cfg["max_tokens"] + headroom
    if cfg["allow_truncated"]:
        inject["allow_truncated"] = True
    return recipe


def rise_figures(run_dir: Path, recipe: dict) -> dict:
    """What the report needs from a finished run of ``recipe`` in ``run_dir``."""
    import pyarrow.parquet as pq

    from synthpref.records import records_from_arrow
    from synthpref.stages.inject_errors import InjectErrorsParams

    summary = json.loads((run_dir / "summary.json").read_text())
    stages = {s.get("type") or s["name"]: s for s in summary["stages"]}
    inject, verifier = stages["inject_errors"], stages["math_verifier"]
    records = records_from_arrow(pq.read_table(run_dir / "data" / "records.parquet"))
    edit_tokens = [
        c.origin.edit_tokens
        for r in records
        for c in r.candidates
        if c.origin is not None and c.origin.stage == inject["name"]
    ]
    by_type = {s["type"]: s for s in recipe["stages"]}
    default_size = InjectErrorsParams.model_fields["max_edit_tokens"].default
    return {
        "problems": summary["input_rows"],
        "inject": inject["counters"],
        "verifier": verifier["counters"],
        "edit_tokens": edit_tokens,
        "max_edit_tokens": by_type["inject_errors"].get("max_edit_tokens", default_size),
        "max_tokens": [by_type["generate"]["max_tokens"], by_type["inject_errors"]["max_tokens"]],
        "run_seconds": summary.get("seconds", 0.0),
    }


def rise_job(cfg: dict, out: str) -> None:
    """The recipe through synthpref.run in a fresh output directory (no cache to reuse)."""
    import synthpref

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        recipe = rise_recipe(cfg, run_dir)
        synthpref.run(recipe, progress=False)
        Path(out).write_text(json.dumps(rise_figures(run_dir, recipe)))


# reporting --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "n/a"


def report_throughput(kind: str, one: dict, many: dict) -> dict[str, tuple[float, float]]:
    """Print one setting pair's lines; the rates per unit as (workers=1, workers=K)."""
    same = one["counts"] == many["counts"]
    print(
        f"{kind}: {one['responses']} responses in {one['records']} records, {one['shards']} "
        f"shard(s); verdict counts workers=1 vs workers={many['workers']}: "
        f"{'equal' if same else 'DIFFER'}"
    )
    for shape, counts in one["counts"].items():
        total = sum(counts.values())
        other = many["counts"].get(shape, {})
        line = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        differ = "" if other == counts else f" (workers={many['workers']}: {other})"
        print(
            f"  {shape:<11} {line}{differ}; as built {one['as_built'][shape]}/{total}",
        )
    units = {"checks" if kind == "math" else "responses": one["responses"]}
    if kind == "code":
        same_work = (one["programs"], one["tests"]) == (many["programs"], many["tests"])
        units |= {"programs": one["programs"], "tests": one["tests"]}
        print(
            f"  programs run {one['programs']} / {many['programs']}, tests run {one['tests']} / "
            f"{many['tests']} ({'equal' if same_work else 'DIFFER'}); counters workers=1 "
            f"{one['counters']}"
        )
    rates = {}
    for unit, amount in units.items():
        r1, rk = amount / one["seconds"], amount / many["seconds"]
        rates[unit] = (r1, rk)
        print(
            f"  {unit}/s: workers=1 {r1:.1f} ({one['seconds']:.2f} s), workers={many['workers']} "
            f"{rk:.1f} ({many['seconds']:.2f} s): {rk / r1:.2f}x"
        )
    print(
        f"  first (warm-up) shard: workers=1 {one['first_shard_s']:.2f} s, "
        f"workers={many['workers']} {many['first_shard_s']:.2f} s"
    )
    return rates


#: inject_errors counts each edit it leaves out as ``dropped:<reason>``
DROPPED = "dropped:"
#: reasons for replies that hold no edit: the rest are edits the model produced
NOT_PRODUCED = ("truncated", "empty")
#: the other reasons, in the order inject_errors applies its checks
CHECK_ORDER = ("unchanged", "too_large", "duplicate", "verifier_failed", "still_correct")


def report_rise(rise: dict) -> dict[str, str]:
    c = Counter(rise["inject"])
    requested, kept = c["edits_requested"], c["edits_kept"]
    discards = {k.removeprefix(DROPPED): v for k, v in c.items() if k.startswith(DROPPED)}
    produced = requested - sum(discards.get(r, 0) for r in NOT_PRODUCED)
    accounted = kept + sum(discards.values())
    v = Counter(rise["verifier"])
    gen_max, edit_max = rise["max_tokens"]
    print(
        f"RISE: {rise['problems']} problems (max_tokens generate {gen_max}, edit {edit_max}); "
        f"sampled solutions verified correct {v['passed']} of {v['judgments']}; correct but cut at "
        f"max_tokens, not edited {c['skipped_truncated_parents']}; problems with no solution to "
        f"edit {c['records_without_correct_candidate']}"
    )
    print(
        f"  edits requested {requested}, kept {kept} ({_share(kept, requested)}: confirmed wrong "
        f"and <= {rise['max_edit_tokens']} tokens); kept + discarded = {accounted} "
        f"({'all accounted for' if accounted == requested else 'MISMATCH'})"
    )
    print(
        f"  the model produced {produced} edits (not truncated, not empty); of those, failing "
        "each check in the order applied:"
    )
    unknown = [r for r in discards if r not in CHECK_ORDER + NOT_PRODUCED]
    for reason in (*CHECK_ORDER, *unknown):
        n = discards.get(reason, 0)
        print(f"    {reason:<16}{n:>5}  {_share(n, produced)}")
    for reason in NOT_PRODUCED:
        n = discards.get(reason, 0)
        print(f"  not produced: {reason} {n} ({_share(n, requested)} of requested)")
    tokens = rise["edit_tokens"]
    median = f"{statistics.median(tokens):g}" if tokens else "n/a"
    same = "equal" if len(tokens) == kept else "MISMATCH"
    print(
        f"  median edit_tokens of kept edits (records.parquet, {len(tokens)} edits, {same} to "
        f"edits_kept): {median}; run {rise['run_seconds']:.1f} s"
    )
    return {"kept share": _share(kept, requested), "median edit tokens": median}


def main() -> None:
    if child_job("--verify", verifier_job) or child_job("--rise", rise_job):
        return
    from synthpref.verifiers.pool import default_workers

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--math", type=int, default=2000, help="math responses checked")
    ap.add_argument("--code", type=int, default=200, help="code responses checked")
    ap.add_argument("--shard-size", type=int, default=64, help="records per process() call")
    ap.add_argument(
        "--workers", type=int, default=default_workers(), help="the parallel setting (all cores)"
    )
    ap.add_argument(
        "--code-timeout", type=float, default=2.0, help="code_verifier timeout_seconds (loops)"
    )
    ap.add_argument("--rise-problems", type=int, default=24, help="math_verified.yaml problems")
    ap.add_argument(
        "--rise-max-tokens",
        type=int,
        default=None,
        help="generate max_tokens (inject_errors: this plus the recipe's headroom); default: the "
        "recipe's",
    )
    ap.add_argument(
        "--rise-allow-truncated",
        action="store_true",
        help="edit solutions cut at max_tokens too (a tiny --rise-max-tokens cuts most)",
    )
    ap.add_argument("--skip-rise", action="store_true", help="leave the slow RISE run out")
    args = ap.parse_args()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    me = [sys.executable, __file__]
    print(
        f"synthpref verifier benchmark, {datetime.now().isoformat(timespec='seconds')}; "
        f"{_cpu_model()}, {os.cpu_count()} cores ({default_workers()} usable); "
        f"Python {platform.python_version()}"
    )
    table: list[tuple[str, str, str, str]] = []
    for kind, n in (("math", args.math), ("code", args.code)):
        if n <= 0:
            continue
        results = []
        for workers in (1, args.workers):
            cfg = {
                "kind": kind,
                "n": n,
                "workers": workers,
                "shard_size": args.shard_size,
                "code_timeout": args.code_timeout,
            }
            results.append(run_job([*me, "--verify"], cfg, env, f"{kind} workers={workers}"))
        rates = report_throughput(kind, *results)
        for unit, (r1, rk) in rates.items():
            table.append((f"{kind} {unit}/s", f"{r1:.1f}", f"{rk:.1f}", f"{rk / r1:.2f}x"))
    rise = None
    if not args.skip_rise:
        cfg = {
            "problems": args.rise_problems,
            "max_tokens": args.rise_max_tokens,
            "allow_truncated": args.rise_allow_truncated,
        }
        rise = report_rise(run_job([*me, "--rise"], cfg, env, "RISE run"))
    print()
    print(f"{'figure':<22}{'workers=1':>12}{f'workers={args.workers}':>12}{'ratio':>8}")
    for row in table:
        print(f"{row[0]:<22}{row[1]:>12}{row[2]:>12}{row[3]:>8}")
    if rise is not None:
        for name, value in rise.items():
            print(f"{'RISE ' + name:<22}{value:>12}")


if __name__ == "__main__":
    main()
