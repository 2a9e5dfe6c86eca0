"""dalle-hf Gradio app (minimal; the full app is tracked in its own issue)."""

import argparse
import os

import gradio as gr
import torch

from dalle_hf.pipeline_dalle import DallePipeline

CHECKPOINT = os.environ.get("DALLE_HF_CHECKPOINT", os.path.join(os.path.dirname(__file__), "checkpoints", "dalle-shapes"))


def build_demo(pipe: DallePipeline) -> gr.Blocks:
    def generate(prompt, seed):
        out = pipe(prompt, num_images_per_prompt=8, num_images_to_keep=4, generator=torch.Generator().manual_seed(int(seed)))
        return out.images

    with gr.Blocks(title="dalle-hf") as demo:
        prompt = gr.Textbox(label="Prompt", value="a red circle")
        seed = gr.Number(label="Seed", value=0, precision=0)
        run = gr.Button("Run")
        gallery = gr.Gallery(label="Best 4 of 8")
        run.click(generate, [prompt, seed], gallery)
    return demo


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args()
    build_demo(DallePipeline.from_pretrained(CHECKPOINT)).queue().launch(server_name=args.host, server_port=args.port)
