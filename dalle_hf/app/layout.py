"""The page: three tabs (text to images, variations, edit) sharing one model selector and the advanced settings,
wired to the handlers. `build_demo()` reads the model folders' small JSON files and loads no weights.
"""

import functools
import os
from pathlib import Path

import gradio as gr

from dalle_hf.app.components import (
    CandidatesSlider,
    CheckedBlocks,
    CheckedCheckbox,
    CheckedDropdown,
    CheckedImageEditor,
    CheckedNumber,
    CheckedRadio,
    CheckedSlider,
    CheckedTextbox,
    ImageUpload,
    StyleDropdown,
    output_gallery,
)
from dalle_hf.app.handlers import (
    DEFAULT_EDIT_RANKING,
    EDIT_RANKINGS,
    edit,
    generate,
    on_model_change,
    on_model_world,
    on_prompt_change,
    on_select,
    on_style,
    send_to_editor,
    send_to_variations,
    vary,
)
from dalle_hf.app.inputs import DEFAULTS, MAX_KEEP, MAX_PROMPT_CHARS, MAX_SEED, request_limits
from dalle_hf.app.models import checkpoints_root, find_checkpoints, how_it_works, no_checkpoint_message, read_model_info
from dalle_hf.app.world import NO_STYLE, ModelWorld

EDIT_BRUSH_FRACTION = 12  # the edit brush starts 1/12 of the model's image side wide (5 px of 64: a small shape)
CSS = """
#gallery img, #var-gallery img { image-rendering: pixelated; }
#var-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""  # 64 px images, shown large and sharp


def build_demo(checkpoints: str | os.PathLike | None = None, models: dict[str, Path] | None = None) -> gr.Blocks:
    """The app's Blocks for the models in `checkpoints` (see `checkpoints_root`), or for `models` (name -> folder,
    `find_models`: the first is the default) when given. Loads no weights."""
    root = checkpoints_root(checkpoints)
    models = find_checkpoints(root) if models is None else models
    default = next(iter(models), None)
    info = read_model_info(models[default]) if models else None
    grid = info["grid"] if info else 8
    guidance_scale = info["guidance_scale"] if info else DEFAULTS["guidance_scale"]
    limits = request_limits(info)  # the candidates and kept sliders: the default model's
    brush_px = max(2, ((info or {}).get("image_size") or 64) // EDIT_BRUSH_FRACTION)  # Gradio's "auto" fills 16 px
    worlds = {name: ModelWorld.read(path, read_model_info(path).get("examples"))  # small JSON files, read once
              for name, path in models.items()}
    world = worlds[default] if models else ModelWorld()

    with CheckedBlocks(title="dalle-hf", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# dalle-hf\nDALL-E (v1) rebuilt the Hugging Face way: a prompt becomes N sampled candidates, "
                    "CLIP keeps the best k. Small enough to run on a CPU.")
        if not models:
            gr.Markdown(f"**{no_checkpoint_message(root)}**", elem_id="no-model")
        model = CheckedDropdown(list(models), value=default, label="Model", visible=len(models) > 1, elem_id="model")
        selected = gr.State(0)
        edit_selected = gr.State(0)
        with gr.Tabs() as tabs:
            with gr.Tab("Text to images", id="text"):
                with gr.Row(equal_height=True):
                    prompt = CheckedTextbox(label="Prompt", placeholder=world.examples[0],
                                            max_lines=1, max_length=MAX_PROMPT_CHARS, show_label=False,
                                            container=False, scale=5, elem_id="prompt")
                    run = gr.Button("Run", variant="primary", scale=0, min_width=120, elem_id="run")
                unseen = gr.Markdown(visible=False, elem_id="unseen-words")
                with gr.Row(equal_height=True):
                    style = StyleDropdown([NO_STYLE, *world.styles], value=NO_STYLE, label="Style",
                                         info="writes the style into the prompt", visible=bool(world.styles),
                                         scale=1, elem_id="style")  # only for a world with styles (its world.json)
                    negative = CheckedTextbox("", label="Negative prompt (optional)", max_lines=1,
                                              max_length=MAX_PROMPT_CHARS, scale=2,
                                              placeholder="what to steer away from: the prompt without the "
                                                          "attribute that comes out wrong",
                                              elem_id="negative-prompt")
                gallery = output_gallery("Best k of N (CLIP score)", "gallery")
                with gr.Row():
                    seed_used = gr.Number(label="Seed used", precision=0, interactive=False)
                    send = gr.Button("Make variations of the selected image", size="sm")
                    send_edit = gr.Button("Edit the selected image", size="sm", elem_id="send-edit")
                status = gr.Markdown(label="Status", elem_id="status")
                examples = gr.Dataset(components=[prompt], samples=[[p] for p in world.examples], label="Examples",
                                      elem_id="examples")  # the selected model's, from its world.json
            with gr.Tab("Image variations", id="variations"):
                with gr.Row():
                    with gr.Column():
                        image = ImageUpload(label="Image", type="filepath", image_mode=None, height=256,
                                            sources=["upload", "clipboard"], elem_id="var-image")
                        var_prompt = CheckedTextbox(label="Prompt (optional)", max_lines=1, max_length=MAX_PROMPT_CHARS)
                        rows = CheckedSlider(0, grid - 1, value=grid // 2, step=1,
                                              label=f"Rows of image tokens kept (of {grid})")
                        var_run = gr.Button("Make variations", variant="primary", elem_id="var-run")
                    with gr.Column():
                        var_gallery = output_gallery("Variations (CLIP similarity to the input)", "var-gallery")
                        var_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                        var_status = gr.Markdown(label="Status")
            with gr.Tab("Edit", id="edit"):
                with gr.Row():
                    with gr.Column():
                        editor = CheckedImageEditor(label="Image: paint over the region to repaint", type="pil",
                                                image_mode="RGBA", height=320, sources=["upload", "clipboard"],
                                                transforms=(), layers=False, format="png",
                                                brush=gr.Brush(default_size=brush_px, colors=["#ff00ff"],
                                                               color_mode="fixed"),
                                                elem_id="edit-image")
                        edit_prompt = CheckedTextbox(label="Prompt: the whole edited image", max_lines=1,
                                                     max_length=MAX_PROMPT_CHARS, elem_id="edit-prompt",
                                                     placeholder=world.examples[0])
                        grow = CheckedCheckbox(label="Also repaint the cells around the mask (a softer seam)",
                                               value=False)
                        rank_by = CheckedRadio(list(EDIT_RANKINGS), value=DEFAULT_EDIT_RANKING, label="Rank by",
                                             info="CLIP ranked best on the shapes edit benchmark "
                                                  "(docs/inpainting.md)", elem_id="edit-rank")
                        edit_run = gr.Button("Edit", variant="primary", elem_id="edit-run")
                    with gr.Column():
                        edit_gallery = output_gallery("Edits, best first", "edit-gallery")
                        with gr.Row():
                            edit_seed = gr.Number(label="Seed used", precision=0, interactive=False)
                            reuse = gr.Button("Use the selected edit as input", size="sm", elem_id="edit-reuse")
                        edit_status = gr.Markdown(label="Status", elem_id="edit-status")
        with gr.Accordion("Advanced settings", open=False):
            with gr.Row():
                candidates = CandidatesSlider(1, limits["max_candidates"], value=limits["candidates"], step=1,
                                              label="Candidates N")
                keep = CheckedSlider(1, MAX_KEEP, value=limits["keep"], step=1, label="Images kept k")
            with gr.Row():
                temperature = CheckedSlider(0.05, 2.0, value=DEFAULTS["temperature"], step=0.05, label="Temperature")
                top_k = CheckedSlider(0, 512, value=DEFAULTS["top_k"], step=1, label="Top-k (0 = off)")
                top_p = CheckedSlider(0.05, 1.0, value=DEFAULTS["top_p"], step=0.01, label="Top-p (1 = off)")
                guidance = CheckedSlider(1.0, 10.0, value=guidance_scale, step=0.5,
                                          label="Guidance scale (1 = off)")
            with gr.Row():
                seed = CheckedNumber(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED)
                randomize = CheckedCheckbox(label="Randomize seed", value=True)
        with gr.Accordion("How it works", open=False):
            how = gr.Markdown(how_it_works(info))

        settings = [candidates, keep, temperature, top_k, top_p, guidance, seed, randomize]
        gr.on([run.click, prompt.submit, negative.submit], functools.partial(generate, models),
              [model, prompt, *settings, negative],
              [gallery, seed_used, status], api_name="generate", concurrency_id="sampling",
              show_progress_on=[status])  # the gallery stays visible: it streams the rows as they are sampled
        gr.on([var_run.click, var_prompt.submit], functools.partial(vary, models),
              [model, image, var_prompt, rows, *settings], [var_gallery, var_seed, var_status],
              api_name="variations", concurrency_id="sampling", show_progress_on=[var_status])
        model.change(functools.partial(on_model_change, models), model, [rows, guidance, candidates, keep, how],
                     queue=False, api_visibility="private")
        # The style selector, the examples and the unseen-word note: cheap, unqueued; callable by API clients but
        # not listed among the app's tasks.
        model.change(functools.partial(on_model_world, models, worlds), [model, prompt],
                     [examples, style, unseen, prompt, edit_prompt], queue=False, api_name="model_world",
                     api_visibility="undocumented")
        style.input(functools.partial(on_style, models, worlds), [model, prompt, style], prompt, queue=False,
                    api_name="apply_style", api_visibility="undocumented")
        prompt.change(functools.partial(on_prompt_change, models, worlds), [model, prompt], [unseen, style],
                      queue=False, trigger_mode="always_last", api_name="prompt_notes", api_visibility="undocumented")
        examples.click(lambda sample: sample[0], examples, prompt, queue=False, api_visibility="private")
        gallery.select(on_select, None, selected, queue=False, api_visibility="private")
        send.click(send_to_variations, [gallery, selected], [image, tabs], queue=False, api_visibility="private")
        gr.on([edit_run.click, edit_prompt.submit], functools.partial(edit, models),
              [model, editor, edit_prompt, grow, *settings, rank_by], [edit_gallery, edit_seed, edit_status],
              api_name="edit",
              concurrency_id="sampling", show_progress_on=[edit_status])
        edit_gallery.select(on_select, None, edit_selected, queue=False, api_visibility="private")
        send_edit.click(send_to_editor, [gallery, selected], [editor, tabs], queue=False, api_visibility="private")
        reuse.click(send_to_editor, [edit_gallery, edit_selected], [editor, tabs], queue=False,
                    api_visibility="private")
    return demo

