"""Assemble a shippable pipeline folder from separately trained parts.

    python scripts/assemble_checkpoint.py --transformer_run runs/dalle-shapes --clip_run runs/clip-shapes \
        --out checkpoints/dalle-shapes

The transformer run (`train_dalle --output_dir`) holds tokenizer/, transformer/, vae/ and model_index.json; the CLIP
run (`train_clip --output_dir`) holds clip_model/ and clip_processor/. The result is one `DallePipeline` saved with
`save_pretrained` (safetensors only), plus a README.md that stitches the three model cards together.
"""

import argparse
import os

from transformers import CLIPModel, CLIPProcessor

from dalle_hf.pipeline_dalle import DallePipeline


def read_card(path: str) -> str:
    if not os.path.isfile(path):
        return "(no model card)"
    text = open(path, encoding="utf-8").read()
    if text.startswith("---"):  # drop the YAML front matter of the part's card
        text = text.split("---", 2)[2]
    return ("\n" + text.strip()).replace("\n## ", "\n#### ").replace("\n# ", "\n### ").strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--transformer_run", required=True, action="append",
        help="train_dalle output folder; repeat for a run continued with --transformer_name_or_path (last is loaded)",
    )
    parser.add_argument("--vae_run", default=None, help="train_dvae output folder (for its model card)")
    parser.add_argument("--clip_run", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval_report", default=None, help="a ShapesEval report.json to quote in the card")
    args = parser.parse_args()

    pipe = DallePipeline.from_pretrained(args.transformer_run[-1])
    if args.clip_run:
        pipe.register_modules(
            clip_model=CLIPModel.from_pretrained(args.clip_run, subfolder="clip_model"),
            clip_processor=CLIPProcessor.from_pretrained(args.clip_run, subfolder="clip_processor"),
        )
    pipe.save_pretrained(args.out, safe_serialization=True)

    sections = [
        "---\nlibrary_name: diffusers\ntags:\n- dalle-hf\n- text-to-image\n---\n",
        "# dalle-shapes\n",
        "A DALL-E (Ramesh et al. 2021) pipeline trained from scratch on this repository's procedural shapes world, on a "
        "2-core CPU. Load it with `DallePipeline.from_pretrained(\"checkpoints/dalle-shapes\")`.\n",
        "Assembled with:\n\n```bash\npython scripts/assemble_checkpoint.py "
        + " ".join(f"--transformer_run {run}" for run in args.transformer_run)
        + (f" --vae_run {args.vae_run}" if args.vae_run else "")
        + (f" --clip_run {args.clip_run}" if args.clip_run else "") + f" --out {args.out}\n```\n",
    ]
    for stage, run in enumerate(args.transformer_run, 1):
        sections.append(f"## Transformer, stage {stage} ({run})\n\n" + read_card(os.path.join(run, "README.md")) + "\n")
    if args.vae_run:
        sections.append("## dVAE\n\n" + read_card(os.path.join(args.vae_run, "vae", "README.md")) + "\n")
    if args.clip_run:
        sections.append("## CLIP reranker\n\n" + read_card(os.path.join(args.clip_run, "clip_model", "README.md")) + "\n")
    if args.eval_report:
        import json

        report = json.load(open(args.eval_report))
        rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in report["accuracy"].items())
        sections.append(f"## ShapesEval\n\n`{report.get('config', {})}`\n\n| task | accuracy |\n|---|---|\n{rows}\n\n"
                        f"ShapesEval (six-task mean): {report['shapes_eval']:.3f}\n")
    with open(os.path.join(args.out, "README.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
