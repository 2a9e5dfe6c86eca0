"""Assemble a shippable pipeline folder from separately trained parts.

    python scripts/assemble_checkpoint.py --transformer_run runs/dalle-shapes --clip_run runs/clip-shapes \
        --out checkpoints/dalle-shapes

The transformer run (`train_dalle --output_dir`) holds tokenizer/, transformer/, vae/ and model_index.json; the CLIP
run (`train_clip --output_dir`) holds clip_model/ and clip_processor/. Each `--*_run` can repeat for a model trained
in stages (continued or fine-tuned): the last one is shipped, every stage's card is quoted. The last `--vae_run`
replaces the transformer run's dVAE only if its encoder is the same (a decoder fine-tuned with
`train_dvae --train_decoder_only`): the transformer was trained on that encoder's codes. The result is one
`DallePipeline` saved with `save_pretrained` (safetensors only), plus a README.md that stitches the three model cards
together.
"""

import argparse
import json
import os

import torch
from transformers import CLIPModel, CLIPProcessor

from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline


def read_card(path: str) -> str:
    if not os.path.isfile(path):
        return "(no model card)"
    text = open(path, encoding="utf-8").read()
    if text.startswith("---"):  # drop the YAML front matter of the part's card
        text = text.split("---", 2)[2]
    return ("\n" + text.strip()).replace("\n## ", "\n#### ").replace("\n# ", "\n### ").strip()


def eval_section(report: dict) -> str:
    """A ShapesEval report.json as a markdown table: best-of-1 per task, CLIP best-of-N when it was run, and the
    checker's best-of-N (a prompt passes if any candidate does: the ceiling of any reranker) when reported."""
    columns = [("best-of-1", report["accuracy"], report["shapes_eval"])]
    if report.get("reranked_accuracy"):
        columns.append(("CLIP best-of-N", report["reranked_accuracy"], report["shapes_eval_reranked"]))
    if report.get("best_of_n_oracle"):
        columns.append(("checker best-of-N", report["best_of_n_oracle"], report["shapes_eval_best_of_n_oracle"]))
    rows = ["| task | " + " | ".join(name for name, _, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for task in report["accuracy"]:
        rows.append(f"| {task} | " + " | ".join(f"{values[task]:.3f}" for _, values, _ in columns) + " |")
    rows.append("| **six-task mean** | " + " | ".join(f"**{mean:.3f}**" for _, _, mean in columns) + " |")
    return f"## ShapesEval\n\n`{json.dumps(report.get('config', {}))}`\n\n" + "\n".join(rows) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--transformer_run", required=True, action="append",
        help="train_dalle output folder; repeat for a run continued with --transformer_name_or_path (last is loaded)",
    )
    parser.add_argument(
        "--vae_run", action="append", default=[],
        help="train_dvae output folder; the last one's vae/ is shipped (its encoder must match the transformer run's)",
    )
    parser.add_argument("--clip_run", action="append", default=[], help="train_clip output folder; the last is shipped")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval_report", default=None, help="a ShapesEval report.json to quote in the card")
    parser.add_argument(
        "--default_guidance_scale", type=float, default=None,
        help="the guidance the pipeline uses when a call does not give one (saved in model_index.json)",
    )
    parser.add_argument("--notes", default=None, help="a markdown file appended to the card (e.g. evaluation commands)")
    args = parser.parse_args()

    pipe = DallePipeline.from_pretrained(args.transformer_run[-1])
    if args.vae_run:
        vae = DalleVAE.from_pretrained(os.path.join(args.vae_run[-1], "vae"))
        trained_on = pipe.vae.encoder.state_dict()
        if vae.encoder.state_dict().keys() != trained_on.keys() or not all(
            torch.equal(value, trained_on[key]) for key, value in vae.encoder.state_dict().items()
        ):
            raise ValueError(
                f"{args.vae_run[-1]}/vae has another encoder than {args.transformer_run[-1]}/vae: the "
                "transformer was trained on the codes of its own (fine-tune only the decoder)."
            )
        pipe.register_modules(vae=vae)
    if args.clip_run:
        pipe.register_modules(
            clip_model=CLIPModel.from_pretrained(args.clip_run[-1], subfolder="clip_model"),
            clip_processor=CLIPProcessor.from_pretrained(args.clip_run[-1], subfolder="clip_processor"),
        )
    if args.default_guidance_scale is not None:
        pipe = DallePipeline(**pipe.components, default_guidance_scale=args.default_guidance_scale)
    pipe.save_pretrained(args.out, safe_serialization=True)

    sections = [
        "---\nlibrary_name: diffusers\ntags:\n- dalle-hf\n- text-to-image\n---\n",
        "# dalle-shapes\n",
        "A DALL-E (Ramesh et al. 2021) pipeline trained from scratch on this repository's procedural shapes world, "
        "on a 2-core CPU. Load it with `DallePipeline.from_pretrained(\"checkpoints/dalle-shapes\")`.\n",
        "Assembled with:\n\n```bash\npython scripts/assemble_checkpoint.py "
        + " ".join(f"--transformer_run {run}" for run in args.transformer_run)
        + "".join(f" --vae_run {run}" for run in args.vae_run)
        + "".join(f" --clip_run {run}" for run in args.clip_run)
        + (f" --eval_report {args.eval_report}" if args.eval_report else "")
        + (f" --notes {args.notes}" if args.notes else "")
        + ("" if args.default_guidance_scale is None else f" --default_guidance_scale {args.default_guidance_scale:g}")
        + f" --out {args.out}\n```\n",
    ]
    for stage, run in enumerate(args.transformer_run, 1):
        sections.append(f"## Transformer, stage {stage} ({run})\n\n" + read_card(os.path.join(run, "README.md")) + "\n")
    for stage, run in enumerate(args.vae_run, 1):
        sections.append(f"## dVAE, stage {stage} ({run})\n\n" + read_card(os.path.join(run, "vae", "README.md")) + "\n")
    for stage, run in enumerate(args.clip_run, 1):
        card = read_card(os.path.join(run, "clip_model", "README.md"))
        sections.append(f"## CLIP reranker, stage {stage} ({run})\n\n" + card + "\n")
    if args.eval_report:
        sections.append(eval_section(json.load(open(args.eval_report))))
    if args.notes:
        sections.append(open(args.notes, encoding="utf-8").read().strip() + "\n")
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
