"""The model card of a saved `DallePipeline`: one generator for the shipped `checkpoints/*/README.md` and for the card
published by `push_to_hub` / `dalle-hf push`, so the two never drift.

    python -m dalle_hf.model_card checkpoints/dalle-shapes             # rewrites checkpoints/dalle-shapes/README.md
    python -m dalle_hf.model_card checkpoints/dalle-shapes --sample-grid   # and draws samples.png

The generator knows no world. It reads `card_data.json` beside `model_index.json` (written by
`scripts/assemble_checkpoint.py`): the name and summary, the license, the data sources with their licenses, the
assembly command, each training stage's own card (command, seed, steps, wall time, hyperparameters, evaluation),
the world's benchmark report (the per-task table), free-form evaluation notes, the limitations, and the prompts of
the sample grid. The YAML front matter is a `huggingface_hub.ModelCardData` (license, `library_name`,
`pipeline_tag: text-to-image`, tags, data sources), so `ModelCard.load(...).data` reads it back.

A converted model (DALL·E mini / Mega: `dalle_mini_card_data`) has no training stages; its card data names the
`base_model` (a Hub id, in the front matter) and a `conversion`: the sources with their authors and licenses, the
command that converted them and what parity was verified. Its limitations are its own (the lines about models trained
here on a CPU do not apply).
"""

import argparse
import importlib
import json
import os
import re

from huggingface_hub import ModelCard, ModelCardData

CARD_DATA_NAME = "card_data.json"  # the structured source of a checkpoint's card
SAMPLE_GRID_NAME = "samples.png"  # the sample grid shown in the card
DEFAULT_LICENSE = "mit"  # dalle-hf's own license (pyproject.toml); a checkpoint's card_data.json may say otherwise
BASE_TAGS = ["dalle-hf", "dall-e", "text-to-image"]
# What every DALL-E-sized-for-a-CPU checkpoint shares; a world adds its own lines in card_data.json.
BASE_LIMITATIONS = [
    "It draws only what its training data showed: captions outside that data give images unrelated to the text.",
    "Small, low-resolution images from a model trained on a CPU; not a general-purpose text-to-image model.",
]
SAMPLE_GRID_DEFAULTS = {"images_per_prompt": 4, "candidates": 8, "seed": 0}  # `sample_grid`'s defaults
_WALL_TIME = re.compile(r"Wall time: [^(\n]*\((\d+) s\)")


def read_card_data(folder: str) -> dict:
    """`card_data.json` of a pipeline folder, or `{}` when it has none (a freshly trained pipeline)."""
    path = os.path.join(folder, CARD_DATA_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def total_wall_time_s(card_data: dict) -> int | None:
    """The sum of the stages' wall times ("Wall time: 26m20s (1580 s)" in each stage's card), or None."""
    times = [int(m) for stage in card_data.get("stages", []) for m in _WALL_TIME.findall(stage.get("card", ""))]
    return sum(times) if times else None


def format_duration(seconds: float) -> str:
    """`1580` -> `"26m20s"`, `40245` -> `"11h10m45s"` (the stage cards' format too)."""
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def card_metadata(card_data: dict) -> ModelCardData:
    """The front matter: license, library, pipeline tag, tags, the data sources with their licenses, example prompts."""
    sources = card_data.get("data_sources", [])
    return ModelCardData(
        license=card_data.get("license", DEFAULT_LICENSE),
        base_model=card_data.get("base_model"),
        library_name="diffusers",
        pipeline_tag="text-to-image",
        tags=BASE_TAGS + [t for t in card_data.get("tags", []) if t not in BASE_TAGS],
        datasets=card_data.get("datasets") or None,  # Hub dataset ids only; other sources go to data_sources
        data_sources=[{"name": s["name"], "license": s["license"]} for s in sources] or None,
        # The Hub's widget examples; the Space made by `dalle-hf export-space` offers them as its examples.
        widget=[{"text": p} for p in card_data.get("sample_prompts", []) if p] or None,
    )


def eval_section(evaluation: dict) -> str:
    """A benchmark report as a markdown table: best-of-1 per task, CLIP best-of-N when it was run, and the checker's
    best-of-N (a prompt passes if any candidate does: the ceiling of any reranker) when reported.

    `evaluation` holds `name` (the heading), `report` (the benchmark's report.json), `mean_key` (the report's key of
    the headline mean, e.g. `shapes_eval`; `<mean_key>_reranked` and `<mean_key>_best_of_n_oracle` for the other
    columns) and `mean_label` (its row name).
    """
    report, mean_key = evaluation["report"], evaluation["mean_key"]
    columns = [("best-of-1", report["accuracy"], report[mean_key])]
    if report.get("reranked_accuracy"):
        columns.append(("CLIP best-of-N", report["reranked_accuracy"], report[f"{mean_key}_reranked"]))
    if report.get("best_of_n_oracle"):
        columns.append(("checker best-of-N", report["best_of_n_oracle"], report[f"{mean_key}_best_of_n_oracle"]))
    rows = ["| task | " + " | ".join(name for name, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for task in report["accuracy"]:
        rows.append(f"| {task} | " + " | ".join(f"{values[task]:.3f}" for _, values, _ in columns) + " |")
    label = evaluation.get("mean_label", "mean")
    rows.append(f"| **{label}** | " + " | ".join(f"**{mean:.3f}**" for _, _, mean in columns) + " |")
    config = json.dumps(report.get("config", {}))
    return f"## {evaluation['name']}\n\n`{config}`\n\n" + "\n".join(rows) + "\n"


def usage_section(
    name_or_path: str,
    repo_id: str | None,
    prompt: str = "...",
    pipeline_class: str = "DallePipeline",
    carries_code: bool = False,
):
    if repo_id is None and carries_code:
        return (
            f"Load it with `{pipeline_class}.from_pretrained(\"{name_or_path}\")`. The folder carries the pipeline "
            "and model code too, so diffusers loads it without dalle-hf installed, running that code (read it "
            "first); diffusers asks `trust_remote_code=True` for any pipeline class it does not ship:\n"
            "\n```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("
            f"\"{name_or_path}\", trust_remote_code=True)\n```\n"
        )
    if repo_id is None:
        return (
            f"Load it with `{pipeline_class}.from_pretrained(\"{name_or_path}\")`. A copy published with "
            "`dalle-hf push` carries the pipeline and model code, so it also loads without dalle-hf installed:\n"
            "\n```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained("
            "\"<org>/<name>\", trust_remote_code=True)\n```\n"
        )
    return (
        "## Usage\n\nWith diffusers and transformers (no dalle-hf needed: the repository carries the pipeline and "
        "model code, so read it before you trust it):\n\n```python\nimport torch\nfrom diffusers import "
        f"DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained(\"{repo_id}\", trust_remote_code=True)\n"
        f"out = pipe({json.dumps(prompt)}, num_images_per_prompt=16, num_images_to_keep=4, generator=torch.Generator()."
        "manual_seed(0))\nout.images[0].save(\"best.png\")\n```\n"
    )


def conversion_section(conversion: dict) -> str:
    """Where a converted model's weights come from (authors, licenses), the command and the parity checks."""
    rows = ["| source | authors | license |", "|---|---|---|"]
    rows += [f"| [{s['name']}]({s['url']}) | {s['authors']} | {s['license']} |" for s in conversion["sources"]]
    lines = ["## Conversion\n", "The weights are the authors', converted, not retrained:\n", "\n".join(rows) + "\n",
             f"Converted with:\n\n```bash\n{conversion['command']}\n```\n"]  # fmt: skip
    if conversion.get("parity"):
        lines.append("Verified:\n\n" + "\n".join(f"- {line}" for line in conversion["parity"]) + "\n")
    return "\n".join(lines)


def make_model_card(
    card_data: dict,
    name_or_path: str,
    repo_id: str | None = None,
    sample_grid: bool = False,
    pipeline_class: str = "DallePipeline",
    carries_code: bool = False,
):
    """The card of a pipeline folder as a `huggingface_hub.ModelCard`.

    Args:
        card_data (`dict`): the folder's `card_data.json` (`{}` gives a minimal card).
        name_or_path (`str`): how the folder is named in the shipped card's load line.
        repo_id (`str`, *optional*, defaults to `None`): the Hub repository the card is published to; it adds the
            usage section for `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`.
        sample_grid (`bool`, *optional*, defaults to `False`): show `samples.png` (the folder has one).
        pipeline_class (`str`, *optional*, defaults to `"DallePipeline"`): the dalle-hf class in the load line.
        carries_code (`bool`, *optional*, defaults to `False`): the folder carries its code (a converted DALL·E mini
            / Mega): the load line shows `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` too.
    """
    title = card_data.get("name", os.path.basename(os.path.normpath(name_or_path)))
    summary = card_data.get("summary", "A DALL-E (Ramesh et al. 2021) pipeline made with dalle-hf.")
    prompts = [p for p in card_data.get("sample_prompts", []) if p]
    usage = usage_section(name_or_path, repo_id, prompts[0] if prompts else "...", pipeline_class, carries_code)
    sections = [f"# {title}\n", f"{summary} {usage}" if repo_id is None else f"{summary}\n\n{usage}"]
    if sample_grid:
        settings = {**SAMPLE_GRID_DEFAULTS, **card_data.get("sample_grid", {})}
        prompts = ", ".join(f'"{p}"' for p in card_data.get("sample_prompts", [""]))
        sections.append(
            f"![samples]({SAMPLE_GRID_NAME})\n\nOne row per prompt ({prompts}): the CLIP-best "
            f"{settings['images_per_prompt']} of {settings['candidates']} samples, seed {settings['seed']}, the "
            "pipeline's default sampling settings.\n"
        )
    if card_data.get("conversion"):
        sections.append(conversion_section(card_data["conversion"]))
    if card_data.get("data_sources"):
        rows = ["| data | license | what |", "|---|---|---|"]
        rows += [f"| {s['name']} | {s['license']} | {s.get('description', '')} |" for s in card_data["data_sources"]]
        sections.append("## Training data\n\n" + "\n".join(rows) + "\n")
    wall = total_wall_time_s(card_data)
    if card_data.get("stages"):
        lines = ["## Training\n"]
        if wall is not None:
            lines.append(f"Wall time of all training stages together: {format_duration(wall)} ({wall} s), the sum of "
                         "the stage cards below (each summed over its resumes).\n")
        if card_data.get("assembly_command"):
            lines.append(f"Assembled with:\n\n```bash\n{card_data['assembly_command']}\n```\n")
        sections.append("\n".join(lines))
        for stage in card_data["stages"]:
            heading = f"## {stage['component']}, stage {stage['stage']} ({stage['run']})"
            sections.append(f"{heading}\n\n{stage['card'].strip()}\n")
    if card_data.get("evaluation", {}).get("report"):
        sections.append(eval_section(card_data["evaluation"]))
    if card_data.get("notes"):
        sections.append(card_data["notes"].strip() + "\n")
    limitations = ([] if card_data.get("conversion") else BASE_LIMITATIONS) + card_data.get("limitations", [])
    sections.append("## Limitations\n\n" + "\n".join(f"- {line}" for line in limitations) + "\n")
    return ModelCard(f"---\n{card_metadata(card_data).to_yaml()}\n---\n\n" + "\n".join(sections))


# Everyday prompts for a model trained on web captions: the card's widget and the Space's examples.
DALLE_MINI_SAMPLE_PROMPTS = [
    "sunset over a lake in the mountains",
    "an armchair in the shape of an avocado",
    "a watercolor painting of a fox in a snowy forest",
    "a red bicycle leaning against a brick wall",
]
DALLE_MINI_REPOS = {False: "dalle-mini/dalle-mini", True: "dalle-mini/dalle-mega"}
VQGAN_REPO = "dalle-mini/vqgan_imagenet_f16_16384"


def dalle_mini_card_data(
    *, mega: bool, command: str, from_min_dalle: bool = False, vae_has_encoder: bool = True, parity=None
) -> dict:
    r"""
    The card data (`card_data.json`) of a converted DALL·E mini or Mega folder: `make_model_card` turns it into the
    README that `dalle-hf push` publishes.

    Args:
        mega (`bool`): DALL·E Mega (`dalle-mini/dalle-mega`) rather than DALL·E mini (`dalle-mini/dalle-mini`).
        command (`str`): the conversion command, as it was run.
        from_min_dalle (`bool`, *optional*, defaults to `False`): the weights came through min-dalle's files
            (credited beside the original authors) rather than the Flax snapshots.
        vae_has_encoder (`bool`, *optional*, defaults to `True`): `False` for a VQGAN converted without its encoder
            (min-dalle's `detoker.pt`): the card says which features that turns off.
        parity (`list[str]`, *optional*, defaults to `None`): what the converter checked on these weights, added to
            what dalle-hf's tests verify for every conversion.
    """
    name = "DALL·E Mega" if mega else "DALL·E mini"
    sources = [
        {"name": DALLE_MINI_REPOS[mega], "url": f"https://huggingface.co/{DALLE_MINI_REPOS[mega]}",
         "authors": "Boris Dayma et al. (DALL·E mini, github.com/borisdayma/dalle-mini)", "license": "apache-2.0"},
        {"name": VQGAN_REPO, "url": f"https://huggingface.co/{VQGAN_REPO}",
         "authors": "the dalle-mini team (Suraj Patil's vqgan-jax port), after Esser, Rombach and Ommer's VQGAN "
                    "(taming-transformers, CompVis)",
         "license": "apache-2.0 (published with DALL·E mini); taming-transformers' code and ImageNet checkpoint: mit"},
    ]  # fmt: skip
    if from_min_dalle:
        sources.append({"name": "kuprel/min-dalle", "url": "https://github.com/kuprel/min-dalle",
                        "authors": "Brett Kuprel (the PyTorch port these files come from)", "license": "mit"})
    checks = [
        "Every tensor copied key for key, each key and shape checked against the model: a missing, extra or "
        "mis-shaped tensor stops the conversion.",
        "The transformer against min-dalle 0.4.11's classes with the same random weights (dalle-hf's tests): encoder "
        "states and the decoder's logits at every step within 1e-4, and super-conditioned greedy generation from "
        "start token 16384 equal token for token.",
    ]
    limitations = [
        "Trained on image-caption pairs from the web: it reproduces their biases and stereotypes; faces, hands and "
        "written text often come out distorted.",
        "256 x 256 images; English prompts (dalle-mini's text normalizer runs before the BPE tokenizer).",
    ]
    if not vae_has_encoder:
        limitations.append(
            "This conversion's VQGAN has its decoder only (min-dalle's files hold no encoder): it draws images from "
            "codes, but variations, inpainting, scores of images and compression of images are refused. Convert "
            "the Flax snapshots (`dalle-hf convert-dalle-mini --flax DIR --vqgan DIR`) for those."
        )
    return {
        "name": f"{name} (dalle-hf)",
        "summary": f"{name} (Boris Dayma et al.) converted to a dalle-hf pipeline: a BART encoder-decoder writes 256 "
                   "VQGAN codes for a prompt (a 16 x 16 grid), the VQGAN f16 16384 (diffusers' `VQModel`) decodes "
                   "them to 256 x 256 pixels. It runs on diffusers and transformers, with dalle-hf's "
                   "super-conditioning, CLIP or likelihood ranking, variations, inpainting, scores and compression.",
        "license": "apache-2.0",
        "base_model": DALLE_MINI_REPOS[mega],
        "tags": ["dalle-mini", "vqgan"],
        "sample_prompts": list(DALLE_MINI_SAMPLE_PROMPTS),
        "conversion": {"sources": sources, "command": command, "parity": checks + list(parity or [])},
        "limitations": limitations,
    }


SAMPLE_GRID_MIN_CELL = 64  # px: smaller samples (a 32 px model's) are enlarged by a whole factor, nearest neighbour


def sample_grid(pipe, prompts: list[str], images_per_prompt: int = 4, candidates: int = 8, seed: int = 0):
    """One row per prompt: the CLIP-best `images_per_prompt` of `candidates` samples (seed `seed`), as a PIL image.
    Samples under `SAMPLE_GRID_MIN_CELL` pixels a side are enlarged by a whole factor with nearest-neighbour
    resampling, so each of their pixels shows as drawn (as the app shows them) instead of a thumbnail."""
    import torch
    from PIL import Image

    out = pipe(prompts, num_images_per_prompt=candidates, num_images_to_keep=images_per_prompt,
               generator=torch.Generator().manual_seed(seed))  # fmt: skip
    scale = max(1, -(-SAMPLE_GRID_MIN_CELL // min(out.images[0].size)))  # ceil
    w, h = (side * scale for side in out.images[0].size)
    grid = Image.new("RGB", (w * images_per_prompt, h * len(prompts)), "white")
    for i, image in enumerate(out.images):
        grid.paste(image.resize((w, h), Image.Resampling.NEAREST),
                   ((i % images_per_prompt) * w, (i // images_per_prompt) * h))  # fmt: skip
    return grid


def pipeline_class_name(folder: str) -> str:
    """The pipeline class `folder/model_index.json` names (`["module", "Class"]` in a copy that carries its code)."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        name = json.load(f)["_class_name"]
    return name[1] if isinstance(name, list) else name


def folder_carries_code(folder: str) -> bool:
    """Whether `folder` holds the pipeline's code file that its `model_index.json` names (`add_remote_code`)."""
    with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
        name = json.load(f)["_class_name"]
    return isinstance(name, list) and os.path.isfile(os.path.join(folder, f"{name[0]}.py"))


def write_model_card(folder: str, name_or_path: str | None = None, repo_id: str | None = None) -> ModelCard:
    """Write `folder/README.md` from `folder/card_data.json` (and show `samples.png` if the folder has one)."""
    card = make_model_card(
        read_card_data(folder),
        folder if name_or_path is None else name_or_path,
        repo_id=repo_id,
        sample_grid=os.path.isfile(os.path.join(folder, SAMPLE_GRID_NAME)),
        pipeline_class=pipeline_class_name(folder),
        carries_code=folder_carries_code(folder),
    )
    card.save(os.path.join(folder, "README.md"))
    return card


def load_pipeline(folder: str):
    """The pipeline saved in `folder`, of the dalle-hf class its `model_index.json` names (as diffusers resolves
    `_class_name`). The card's code names no pipeline class: pipelines import it to publish themselves."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(f"expected a saved pipeline folder (with model_index.json), got {folder!r}")
    class_name = pipeline_class_name(folder)  # a folder that carries its code names `["module", "Class"]`
    # the package, not `__name__`: run as `python -m dalle_hf.model_card`, this module is `__main__`
    pipeline_class = getattr(importlib.import_module(__package__), class_name, None)
    if pipeline_class is None:
        raise ValueError(f"{index_path} names {class_name!r}, which is not a dalle-hf pipeline")
    return pipeline_class.from_pretrained(folder)


def write_sample_grid(folder: str, pipe=None) -> str:
    """Draw `folder/samples.png` from the card data's `sample_prompts` (`[""]`, unconditional, without any)."""
    card_data = read_card_data(folder)
    if pipe is None:
        pipe = load_pipeline(folder)
        pipe.set_progress_bar_config(disable=True)
    settings = {**SAMPLE_GRID_DEFAULTS, **card_data.get("sample_grid", {})}
    grid = sample_grid(pipe, card_data.get("sample_prompts", [""]), **settings)
    path = os.path.join(folder, SAMPLE_GRID_NAME)
    grid.save(path)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a pipeline folder's README.md from its card_data.json.")
    parser.add_argument("folder")
    parser.add_argument("--sample-grid", dest="sample_grid", action="store_true", help="also draw samples.png")
    args = parser.parse_args(argv)
    if args.sample_grid:
        print(f"wrote {write_sample_grid(args.folder)}")
    write_model_card(args.folder, os.path.relpath(args.folder) if os.path.isdir(args.folder) else args.folder)
    print(f"wrote {os.path.join(args.folder, 'README.md')}")


if __name__ == "__main__":
    main()
