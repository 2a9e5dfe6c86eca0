"""A Hugging Face Space for a DALL-E model published with dalle-hf (`dalle-hf export-space` copies this file as the
Space's app.py). It needs diffusers, transformers and gradio, not dalle-hf: the model repository carries its own
pipeline and model code, loaded with `trust_remote_code=True`.

`export-space` fills in `SETTINGS` for the model: a dVAE model runs in float32 on the CPU; DALL·E mini / Mega runs
on the GPU in float16 when the card has room for it, in bitsandbytes int8 when it has not, and in `cpu_dtype`
(bfloat16) on a CPU (`precision`).

    python app.py            # DALLE_HF_MODEL=org/name overrides the model

Nothing happens at import: `build_demo()` makes the Blocks and the pipeline loads once, on the first request.
"""

import os

import gradio as gr
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

MODEL_ID = os.environ.get("DALLE_HF_MODEL", "")  # export-space writes the published repository id here
SETTINGS = {}
MAX_CANDIDATES = SETTINGS.get("max_candidates", 32)  # N per request: 32 on a shared cpu-basic Space (2 vCPUs)
MAX_SEED = 2**31 - 1
_PIPELINE = []  # the pipeline, loaded once and shared by all requests


def precision(gpu_memory_bytes: int | None) -> dict:
    """Where and how the model runs, given the GPU's memory (None: no GPU): `{"device", "dtype", "int8"}`."""
    if SETTINGS.get("family") != "dalle-mini":
        return {"device": "cpu", "dtype": "float32", "int8": False}  # a small dVAE model, made on a CPU
    if gpu_memory_bytes is None:
        return {"device": "cpu", "dtype": SETTINGS["cpu_dtype"], "int8": False}
    return {"device": "cuda", "dtype": "float16", "int8": gpu_memory_bytes < SETTINGS["fp16_min_gpu_bytes"]}


def pipeline_kwargs(choice: dict) -> dict:
    """`from_pretrained` keyword arguments for a `precision` choice."""
    kwargs = {"dtype": getattr(torch, choice["dtype"])}
    if choice["int8"]:  # LLM.int8 on the transformer's Linear layers; the head, which picks every token, stays float
        from diffusers import PipelineQuantizationConfig

        kwargs["quantization_config"] = PipelineQuantizationConfig(
            quant_backend="bitsandbytes_8bit", quant_kwargs={"load_in_8bit": True, "llm_int8_skip_modules":
            ["lm_head"]}, components_to_quantize=["transformer"],
        )  # fmt: skip
    return kwargs


def load_pipeline():
    if not _PIPELINE:
        gpu = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
        choice = precision(gpu)
        pipe = DiffusionPipeline.from_pretrained(MODEL_ID, trust_remote_code=True, **pipeline_kwargs(choice))
        if choice["device"] == "cuda":
            pipe.to("cuda")  # the int8 transformer is already there (bitsandbytes places it); the rest follows
        pipe.set_progress_bar_config(disable=True)
        _PIPELINE.append(pipe)
    return _PIPELINE[0]


def example_prompts() -> list[str]:
    """The model card's `widget` prompts (dalle-hf writes its sample-grid prompts there)."""
    try:
        widget = ModelCard.load(MODEL_ID).data.to_dict().get("widget") or []
    except Exception:  # examples are optional: a card that cannot be read must not stop the Space
        return []
    return [entry["text"] for entry in widget if isinstance(entry, dict) and entry.get("text")]


def generate(prompt: str, candidates: int, keep: int, guidance_scale: float, seed: int):
    """Sample `candidates` images for `prompt` and return the CLIP-best `keep` as (image, caption) pairs."""
    candidates, keep, seed = int(candidates), int(keep), int(seed)
    if not 1 <= candidates <= MAX_CANDIDATES:
        raise gr.Error(f"candidates must be in [1, {MAX_CANDIDATES}], got {candidates}")
    if not 1 <= keep <= candidates:
        raise gr.Error(f"keep must be in [1, candidates={candidates}], got {keep}")
    if not 0 <= seed <= MAX_SEED:
        raise gr.Error(f"seed must be in [0, {MAX_SEED}], got {seed}")
    out = load_pipeline()(
        prompt, num_images_per_prompt=candidates, num_images_to_keep=keep, guidance_scale=float(guidance_scale),
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    if out.clip_scores is None:
        return [(image, f"sample {i + 1}") for i, image in enumerate(out.images)]
    return [(image, f"CLIP {score:.2f}") for image, score in zip(out.images, out.clip_scores.flatten().tolist())]


def build_demo() -> gr.Blocks:
    with gr.Blocks(title=f"DALL-E: {MODEL_ID}") as demo:
        gr.Markdown(f"# DALL-E ({MODEL_ID})\n\nText to image with [{MODEL_ID}](https://huggingface.co/{MODEL_ID}): "
                    "the transformer samples N candidates, the dVAE (or VQGAN) decodes them and CLIP keeps the "
                    "best.")  # fmt: skip
        prompt = gr.Textbox(label="Prompt", lines=1)
        with gr.Row():
            candidates = gr.Slider(1, MAX_CANDIDATES, value=SETTINGS.get("candidates", 16), step=1,
                                   label="Candidates (N)")
            keep = gr.Slider(1, MAX_CANDIDATES, value=SETTINGS.get("keep", 4), step=1, label="Keep (CLIP-best k)")
            guidance = gr.Slider(1, SETTINGS.get("max_guidance", 6), value=SETTINGS.get("guidance", 3), step=0.5,
                                 label="Guidance scale (1 = none)")
            seed = gr.Number(value=0, precision=0, label="Seed")
        button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(label="Best first", columns=4)
        inputs = [prompt, candidates, keep, guidance, seed]
        button.click(generate, inputs=inputs, outputs=gallery)
        prompt.submit(generate, inputs=inputs, outputs=gallery)
        examples = example_prompts()
        if examples:
            gr.Examples([[text] for text in examples], inputs=[prompt])
    return demo


if __name__ == "__main__":
    build_demo().queue(max_size=16).launch()
