"""The dataset card (README.md): YAML metadata the Hub reads, then what the data is and how it was made.

The metadata declares one ``configs`` entry per uploaded format (so ``load_dataset(repo, "kto")`` picks
the right file, and the dataset viewer shows each), the license, task categories, size category and
tags. The body says exactly which files and columns were uploaded (read from the uploaded Parquet
files themselves, so a column left out never shows up) and embeds the run report with its figures.
"""

from __future__ import annotations

from typing import Any

import yaml
from huggingface_hub import DatasetCard, DatasetCardData

from synthpref.hub.select import UploadedFile

FORMAT_USES = {
    "preference": "TRL `DPOTrainer` (and ORPO, CPO, SimPO)",
    "kto": "TRL `KTOTrainer`",
    "reward": "TRL `RewardTrainer` (margin-aware loss)",
    "listwise": "listwise objectives",
    "pointwise": "regression reward models, rejection sampling",
    "records": "provenance and re-use: every prompt with its candidates, judgments and pairs",
}


def size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < limit:
            return name
    return "10M<n<100M"


def build_card(
    repo_id: str,
    files: list[UploadedFile],
    recipe: dict[str, Any],
    report_markdown: str,
    license: str = "other",
    fingerprint: str = "",
) -> str:
    """README.md text. ``files``: one per config, in order (the first is the default)."""
    formats = {f.config: f.rows for f in files}
    configs = []
    for i, f in enumerate(files):
        entry: dict[str, Any] = {
            "config_name": f.config,
            "data_files": [{"split": "train", "path": f.path}],
        }
        if i == 0:
            entry["default"] = True
        configs.append(entry)
    default = next(iter(formats), None)
    tags = ["synthetic", "preference", "synthpref"]
    tags += [
        t
        for f, t in (("preference", "dpo"), ("kto", "kto"), ("reward", "reward-modeling"))
        if f in formats
    ]
    name = str(recipe.get("name") or repo_id.split("/")[-1])
    data = DatasetCardData(
        license=license,
        task_categories=["text-generation"],
        tags=tags,
        size_categories=[size_category(formats.get(default, 0) if default else 0)],
        pretty_name=name,
        configs=configs,
    )
    body = _body(repo_id, name, files, recipe, report_markdown, fingerprint)
    text = f"---\n{data.to_yaml()}\n---\n\n{body}"
    DatasetCard(text)  # fails loudly if the metadata does not parse
    return text


def _body(repo_id, name, files, recipe, report_markdown, fingerprint) -> str:
    lines = [f"# {name}", ""]
    if recipe.get("description"):
        lines += [str(recipe["description"]), ""]
    lines += [
        "Synthetic preference data built with synthpref from the recipe in "
        f"[`recipe.yaml`](recipe.yaml) (run fingerprint `{fingerprint[:12]}`). Responses were "
        "generated and judged by the models listed below; the license of generated text also depends "
        "on their terms of use.",
        "",
        "## Configurations",
        "",
        "Exactly these data files were uploaded, with exactly these columns:",
        "",
        "| config | file | rows | columns | for |",
        "|---|---|---|---|---|",
    ]
    for f in files:
        columns = ", ".join(f"`{c}`" for c in f.columns)
        use = FORMAT_USES.get(f.config, "")
        lines.append(f"| `{f.config}` | `{f.path}` | {f.rows} | {columns} | {use} |")
    notes = [f"- `{f.path}`: {f.note}" for f in files if f.note]
    if notes:
        lines += ["", *notes]
    if "records" not in {f.config for f in files}:
        lines += ["", "The full records (candidates, raw judge output, source columns) were not "
                  "uploaded."]  # fmt: skip
    default = files[0].config if files else "preference"
    lines += [
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'ds = load_dataset("{repo_id}", "{default}", split="train")',
        "```",
        "",
        "## How it was made",
        "",
    ]
    models = recipe.get("models") or {}
    if models:
        lines += ["| model | backend | weights | system prompt |", "|---|---|---|---|"]
        for m, spec in models.items():
            spec = spec or {}
            weights = spec.get("model") or (
                "SmolLM2-135M-Instruct (embedded)"
                if spec.get("backend", "embedded") == "embedded"
                else ""
            )
            system = str(spec.get("system_prompt") or "").replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {m} | {spec.get('backend', 'embedded')} | {weights} | {system} |")
        lines.append("")
    stages = recipe.get("stages") or []
    if stages:
        lines += ["Stages, in order:", ""]
        for s in stages:
            params = {k: v for k, v in s.items() if k not in ("type", "name")}
            shown = yaml.safe_dump(params, default_flow_style=True, width=10_000).strip()
            title = f"`{s.get('name') or s.get('type')}` ({s.get('type')})"
            lines.append(f"1. {title}: `{shown}`" if params else f"1. {title}")
        lines.append("")
    lines += [report_markdown.strip(), "", "## Reproducing", "", "```bash", "pip install synthpref",
              "synthpref run recipe.yaml   # with the prompt source next to it", "```", ""]  # fmt: skip
    return "\n".join(lines)
