"""The distilabel side of benchmarks/vs_distilabel.py; runs inside distilabel's own venv.

    LoadDataFromDicts -> TextGeneration(num_generations=N) -> UltraFeedback(aspect=helpfulness)

both tasks on distilabel's TransformersLLM pointed at a local safetensors model directory, on CPU.
Reads its settings as JSON from argv[1], writes a JSON result to argv[2]. Not meant to be run by hand.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    t_import = time.perf_counter()
    from distilabel.models.llms import TransformersLLM
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts
    from distilabel.steps.tasks import TextGeneration, UltraFeedback

    import_s = time.perf_counter() - t_import

    def llm(max_new_tokens: int, temperature: float, do_sample: bool) -> TransformersLLM:
        kwargs = dict(max_new_tokens=max_new_tokens, repetition_penalty=1.0, do_sample=do_sample)
        if do_sample:
            kwargs.update(temperature=temperature, top_p=cfg["top_p"], top_k=0)
        return TransformersLLM(
            model=cfg["model"],
            device="cpu",
            torch_dtype="float32",
            generation_kwargs=kwargs,
        )

    data = [{"instruction": p} for p in cfg["prompts"]]
    with tempfile.TemporaryDirectory() as cache_dir:
        with Pipeline(name="vs-synthpref", cache_dir=cache_dir) as pipeline:
            load = LoadDataFromDicts(data=data, batch_size=len(data))
            generate = TextGeneration(
                llm=llm(cfg["max_tokens"], cfg["temperature"], True),
                num_generations=cfg["n"],
                group_generations=True,
                input_batch_size=len(data),
            )
            judge = UltraFeedback(
                llm=llm(cfg["judge_max_tokens"], 0.0, False),
                aspect="helpfulness",
                input_batch_size=len(data),
                # TextGeneration(group_generations=True) writes the list of candidates to
                # `generation`; UltraFeedback reads `generations`
                input_mappings={"generations": "generation"},
            )
            load >> generate >> judge
        t0 = time.perf_counter()
        distiset = pipeline.run(use_cache=False)
        run_s = time.perf_counter() - t0
    rows = distiset["default"]["train"].to_list()
    if os.environ.get("SYNTHPREF_BENCH_DUMP"):  # inspect what distilabel produced
        with open(os.environ["SYNTHPREF_BENCH_DUMP"], "w") as fh:
            json.dump(rows, fh, indent=1, default=str)

    # UltraFeedback's metadata replaces TextGeneration's, so the generation statistics are gone from
    # the output: count the candidates' tokens with the model's tokenizer (outside the timing)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    gen_tokens = judge_tokens = judge_prompt_tokens = 0
    n_generations = n_ratings = 0
    # one request per prompt for its n generations, the chat template applied as TransformersLLM does
    gen_prompt_tokens = sum(
        len(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in cfg["prompts"]
    )
    for row in rows:
        texts = [g for g in row.get("generation") or [] if g is not None]
        n_generations += len(texts)
        gen_tokens += sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
        n_ratings += sum(r is not None for r in (row.get("ratings") or []))
        metas = row.get("distilabel_metadata") or {}
        # grouped generations leave a list of per-generation metadata dicts
        for meta in metas if isinstance(metas, list) else [metas]:
            for key, stats in (meta or {}).items():
                if not key.startswith("statistics_") or not isinstance(stats, dict):
                    continue
                tokens = stats.get("output_tokens") or []
                total = sum(tokens) if isinstance(tokens, list) else int(tokens)
                inputs = stats.get("input_tokens") or []
                prompt = sum(inputs) if isinstance(inputs, list) else int(inputs)
                if "ultra_feedback" in key:
                    judge_tokens += total
                    judge_prompt_tokens += prompt
    result = {
        "run_s": run_s,
        "import_s": import_s,
        "rows": len(rows),
        "generations": n_generations,
        "ratings_parsed": n_ratings,
        "generation_tokens": gen_tokens,
        "judge_tokens": judge_tokens,
        "generation_prompt_tokens": gen_prompt_tokens,
        "judge_prompt_tokens": judge_prompt_tokens,
        "pid": os.getpid(),
    }
    with open(out_path, "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
