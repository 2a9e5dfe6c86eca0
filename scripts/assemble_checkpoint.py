"""Assemble a shippable pipeline folder from separately trained parts.

    python scripts/assemble_checkpoint.py --transformer_run runs/dalle-shapes --clip_run runs/clip-shapes \
        --out checkpoints/dalle-shapes

The transformer run (`train_dalle --output_dir`) holds tokenizer/, transformer/, vae/ and model_index.json; the CLIP
run (`train_clip --output_dir`) holds clip_model/ and clip_processor/. Each `--*_run` can repeat for a model trained
in stages (continued or fine-tuned): the last one is shipped, every stage's card is quoted. The last `--vae_run`
replaces the transformer run's dVAE only if its encoder is the same (a decoder fine-tuned with
`train_dvae --train_decoder_only`): the transformer was trained on that encoder's codes. The result is one
`DallePipeline` saved with `save_pretrained` (safetensors only), plus `card_data.json` (every stage's card, the
assembly command, the evaluation report and notes, and what `--card_info` says about the world: name, license, data
sources, limitations, sample prompts) and the README.md that `dalle_hf.model_card` writes from it, the same
generator `dalle-hf push` publishes with.
"""

import argparse
import json
import os

import torch
from transformers import CLIPModel, CLIPProcessor

from dalle_hf.data.world import load_world, write_world_file
from dalle_hf.model_card import CARD_DATA_NAME, write_model_card
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline


def read_card(path: str) -> str:
    if not os.path.isfile(path):
        return "(no model card)"
    text = open(path, encoding="utf-8").read()
    if text.startswith("---"):  # drop the YAML front matter of the part's card
        text = text.split("---", 2)[2]
    return ("\n" + text.strip()).replace("\n## ", "\n#### ").replace("\n# ", "\n### ").strip()


def stage(component: str, number: int, run: str, card_path: str) -> dict:
    """One training stage of the card: which model, which run folder, and that run's own card."""
    return {"component": component, "stage": number, "run": run, "card": read_card(card_path)}


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
    parser.add_argument(
        "--card_info", default=None,
        help="a JSON of the card's world-specific fields (name, summary, license, data_sources, limitations, "
        "sample_prompts, evaluation name/mean_key/mean_label), e.g. the previous checkpoint's card_data.json",
    )
    parser.add_argument(
        "--dataset", default=None,
        help="the world the model was trained on (shapes, emoji, ...): writes its world.json (examples, styles, the "
        "words of its captions) for the app",
    )
    parser.add_argument("--train_data_dir", default=None, help="the world's data (emoji: the cache), with --dataset")
    parser.add_argument(
        "--storage_dtype", choices=["float32", "bfloat16"], default="float32",
        help="dtype of the saved transformer and CLIP weights (bfloat16 halves them; measure the evaluation first)",
    )
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
    if args.storage_dtype == "bfloat16":
        pipe.transformer.to(torch.bfloat16)
        if pipe.clip_model is not None:
            pipe.clip_model.to(torch.bfloat16)
    pipe.save_pretrained(args.out, safe_serialization=True)
    if args.dataset:
        write_world_file(load_world(args.dataset, args.train_data_dir), args.out)

    command = (
        "python scripts/assemble_checkpoint.py "
        + " ".join(f"--transformer_run {run}" for run in args.transformer_run)
        + "".join(f" --vae_run {run}" for run in args.vae_run)
        + "".join(f" --clip_run {run}" for run in args.clip_run)
        + (f" --eval_report {args.eval_report}" if args.eval_report else "")
        + (f" --notes {args.notes}" if args.notes else "")
        + (f" --card_info {args.card_info}" if args.card_info else "")
        + (f" --dataset {args.dataset}" if args.dataset else "")
        + (f" --train_data_dir {args.train_data_dir}" if args.train_data_dir else "")
        + ("" if args.storage_dtype == "float32" else f" --storage_dtype {args.storage_dtype}")
        + ("" if args.default_guidance_scale is None else f" --default_guidance_scale {args.default_guidance_scale:g}")
        + f" --out {args.out}"
    )
    card_data = {}
    if args.card_info:
        with open(args.card_info, encoding="utf-8") as f:
            card_data = {k: v for k, v in json.load(f).items() if k not in ("assembly_command", "stages", "notes")}
        card_data.get("evaluation", {}).pop("report", None)  # the previous checkpoint's numbers are not this one's
    card_data["assembly_command"] = command
    card_data["stages"] = (
        [stage("Transformer", i, run, os.path.join(run, "README.md")) for i, run in enumerate(args.transformer_run, 1)]
        + [stage("dVAE", i, run, os.path.join(run, "vae", "README.md")) for i, run in enumerate(args.vae_run, 1)]
        + [stage("CLIP reranker", i, run, os.path.join(run, "clip_model", "README.md"))
           for i, run in enumerate(args.clip_run, 1)]
    )  # fmt: skip
    if args.eval_report:
        if "evaluation" not in card_data:
            raise ValueError("--eval_report needs --card_info with an 'evaluation' entry (name, mean_key, mean_label)")
        with open(args.eval_report, encoding="utf-8") as f:
            card_data["evaluation"]["report"] = json.load(f)
    if args.notes:
        card_data["notes"] = open(args.notes, encoding="utf-8").read().strip()
    with open(os.path.join(args.out, CARD_DATA_NAME), "w", encoding="utf-8") as f:
        json.dump(card_data, f, indent=2, ensure_ascii=False)
        f.write("\n")
    write_model_card(args.out, name_or_path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
