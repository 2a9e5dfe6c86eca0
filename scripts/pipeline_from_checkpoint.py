"""A `DallePipeline` folder from a `train_dalle` checkpoint (`accelerator.save_state`) of a run still going, so that it
can be evaluated (`dalle-hf eval emoji --pipeline OUT`) without stopping the run.

    python scripts/pipeline_from_checkpoint.py --run /work/runs/dalle-emoji32 --checkpoint latest \
        --vae /work/runs/dvae-emoji32/vae --clip checkpoints/dalle-emoji --default_guidance_scale 3 --out OUT

The transformer's config is read off the checkpoint's tensor shapes (layers, width, text length, vocabularies, grid),
except the number of heads (`--n_head`), which no shape records; the state dict is then loaded strictly, so a wrong
guess of any of them is an error rather than a silently different model. The tokenizer is the run's own
(`RUN/tokenizer`, saved when the run starts), the dVAE the one the run trained on.
"""

import argparse
import os
import re

from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.training_utils import load_frozen_vae, resolve_resume_checkpoint


def config_from_state_dict(state: dict, n_head: int, pad_token_id: int) -> DalleConfig:
    """The `DalleConfig` whose parameter shapes are those of `state` (a `DalleForImageGeneration` state dict)."""
    n_layer = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"h\.(\d+)\.", k)))
    text_vocab_size, n_embd = state["text_embedding.weight"].shape
    image_vocab_size = state["image_embedding.weight"].shape[0]
    # One text position more than text_seq_len: the BOS position (modeling_dalle's text_position_embedding).
    text_seq_len = state["text_position_embedding.weight"].shape[0] - 1
    grid = state["image_row_embedding.weight"].shape[0]
    # The text embedding holds one padding token per position beyond the tokenizer's vocabulary (DALLE-pytorch).
    return DalleConfig(text_vocab_size=text_vocab_size - text_seq_len, text_seq_len=text_seq_len,
                       image_vocab_size=image_vocab_size, image_grid_size=grid, pad_token_id=pad_token_id,
                       n_layer=n_layer, n_head=n_head, n_embd=n_embd)  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="the train_dalle --output_dir (holds tokenizer/ and checkpoints)")
    parser.add_argument("--checkpoint", default="latest", help="checkpoint-N (in --run) or a path, or latest")
    parser.add_argument("--vae", required=True, help="the dVAE the run trained on (a vae/ folder or pipeline folder)")
    parser.add_argument("--clip", default=None, help="a pipeline folder whose clip_model/ and clip_processor/ to add")
    parser.add_argument("--n_head", type=int, default=4, help="attention heads (not recorded by any tensor shape)")
    parser.add_argument("--default_guidance_scale", type=float, default=1.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    checkpoint = resolve_resume_checkpoint(args.run, args.checkpoint)
    if checkpoint is None:
        raise ValueError(f"expected a checkpoint-N folder in {args.run!r}, found none")
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(args.run, "tokenizer"))
    state = load_file(os.path.join(checkpoint, "model.safetensors"))
    config = config_from_state_dict(state, args.n_head, tokenizer.pad_token_id)
    if config.text_vocab_size != len(tokenizer):
        raise ValueError(
            f"the checkpoint has {config.text_vocab_size} text tokens, the run's tokenizer {len(tokenizer)}"
        )
    transformer = DalleForImageGeneration(config)
    transformer.load_state_dict(state, strict=True)
    vae = load_frozen_vae(args.vae)
    if (vae.config.vocab_size, vae.config.grid_size) != (config.image_vocab_size, config.image_grid_size):
        raise ValueError(f"the dVAE has {vae.config.vocab_size} codes on a {vae.config.grid_size}-grid, the checkpoint "
                         f"{config.image_vocab_size} on a {config.image_grid_size}-grid")  # fmt: skip
    clip_model = clip_processor = None
    if args.clip:
        clip_model = CLIPModel.from_pretrained(args.clip, subfolder="clip_model").eval()
        clip_processor = CLIPProcessor.from_pretrained(args.clip, subfolder="clip_processor")
    pipe = DallePipeline(tokenizer=tokenizer, transformer=transformer.eval(), vae=vae, clip_model=clip_model,
                         clip_processor=clip_processor, default_guidance_scale=args.default_guidance_scale)  # fmt: skip
    pipe.save_pretrained(args.out, safe_serialization=True)
    print(f"{checkpoint} -> {args.out} ({config.n_layer}x{config.n_embd}, grid {config.image_grid_size})")


if __name__ == "__main__":
    main()
