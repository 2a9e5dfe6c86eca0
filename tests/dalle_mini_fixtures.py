"""A tiny DALL·E-mini-shaped pipeline on disk, for the precision, memory and CUDA tests."""

from transformers import BartTokenizerFast

from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline
from tests.dalle_bart_reference import randomize, tiny_bart_config, tiny_vqgan, write_tiny_bart_tokenizer


def save_tiny_mini_pipeline(folder):
    """Save a float32 `DalleMiniPipeline` under `folder / "pipe"` and return that path: width 128 (bitsandbytes'
    kernels want K and N multiples of 32 and of two 4-bit blocks of 64), 2 + 2 layers, the real image vocabulary,
    a 16 x 16 grid of codes on 32 x 32 images, no CLIP."""
    write_tiny_bart_tokenizer(folder / "tokenizer-src")
    tokenizer = BartTokenizerFast.from_pretrained(folder / "tokenizer-src", model_max_length=64)
    transformer = randomize(DalleBartForImageGeneration(tiny_bart_config(d_model=128, glu_dim=256)), std=0.05)
    DalleMiniPipeline(tokenizer=tokenizer, transformer=transformer, vae=tiny_vqgan()).save_pretrained(folder / "pipe")
    return folder / "pipe"
