"""The handlers of the app's events: text to images, variations and edits (streamed through `sampling`), and the
small updates that follow the selected model (sliders, examples, style selector, unseen-word note) and move an
image between tabs. They use models only through `AppModel`.
"""

import time
import uuid

import gradio as gr
import PIL.Image
import torch

from dalle_hf.app.inputs import (
    check_negative_prompt,
    check_number,
    check_prompt,
    check_settings,
    expected_time,
    load_edit,
    load_image,
    open_image,
    refusal,
    request_limits,
    shown,
)
from dalle_hf.app.models import get_model, read_model_info
from dalle_hf.app.sampling import format_status, sample_with_previews, with_metadata
from dalle_hf.app.world import NO_STYLE, apply_style, split_style, unseen_words_note

# The Edit tab's rankings -> `DalleInpaintPipeline(rerank=...)`. CLIP alone ranked best on the shapes edit
# benchmark: 0.550 against 0.500 for CLIP + likelihood on its 240 test edits (docs/inpainting.md), so it is the
# default; the likelihood rankings stay one click away.
EDIT_RANKINGS = {"CLIP": "clip", "CLIP + likelihood": "both", "likelihood": "likelihood"}
DEFAULT_EDIT_RANKING = "CLIP"


def ranked_gallery(out, label: str, info: dict) -> list[tuple[PIL.Image.Image, str]]:
    scores = None if out.clip_scores is None else out.clip_scores.flatten().tolist()
    images = with_metadata(out.images, info, scores)
    return [(image, f"#{i + 1}" + ("" if scores is None else f" · {label} {scores[i]:.2f}"))
            for i, image in enumerate(images)]


def request_info(task: str, model_name, prompt: str, seed: int, kwargs: dict, **extra) -> dict:
    return {"task": task, "model": model_name, "prompt": prompt, "seed": seed, **kwargs, **extra,
            "request": uuid.uuid4().hex[:12]}


def checked_settings(models, model_name, *settings) -> tuple[dict, int, list[str], dict]:
    """`check_settings` within the limits of the model the request names (`request_limits`, from its configs: nothing
    loads); -> (pipeline kwargs, seed, notes, limits). An unknown model gets the defaults; `get_model` refuses it."""
    name = model_name if model_name not in (None, "") else next(iter(models), None)
    limits = request_limits(read_model_info(models[name]) if name in models else None)
    return *check_settings(*settings, limits=limits, model_name=name), limits


def generate(models, model_name, prompt, candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
             randomize_seed, negative_prompt="", progress=gr.Progress(track_tqdm=True)):
    """Text -> the CLIP-best k of N candidates. Yields (gallery, seed used, status): partial rows, then the grid."""
    kwargs, seed, notes, limits = checked_settings(models, model_name, candidates, keep, temperature, top_k, top_p,
                                                   guidance_scale, seed, randomize_seed)
    progress(0, desc="Loading the model")
    model = get_model(models, model_name)
    prompt, prompt_notes = check_prompt(model, prompt)
    notes += prompt_notes
    negative_prompt, negative_notes = check_negative_prompt(model, negative_prompt, kwargs["guidance_scale"])
    notes += negative_notes
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    for note in notes:
        gr.Warning(note.replace("**", ""))
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = f"Sampling {n} candidates (seed {seed})…{expected_time(limits, n)}"
    yield [], seed, format_status(notes, running)

    def call(callback):
        return model.text_to_image(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback,
                                   **kwargs)

    start = time.perf_counter()
    info = request_info("text-to-images", model_name or next(iter(models)), prompt, seed, kwargs)
    out = yield from sample_with_previews(model, call, k, "Text to images", seed, notes, running, info)
    ranked = "CLIP-ranked" if out.clip_scores is not None else "no CLIP model: the first"
    summary = f"**{n} candidates -> best {k}** ({ranked}) in {time.perf_counter() - start:.1f} s · seed {seed}"
    yield ranked_gallery(out, "CLIP", info), seed, format_status(notes, summary)


def vary(models, model_name, image, prompt, rows_to_keep, candidates, keep, temperature, top_k, top_p,
         guidance_scale, seed, randomize_seed, progress=gr.Progress(track_tqdm=True)):
    """Image -> variations: keep its top rows of dVAE codes, sample the rest, rank by CLIP similarity to it."""
    kwargs, seed, notes, limits = checked_settings(models, model_name, candidates, keep, temperature, top_k, top_p,
                                                   guidance_scale, seed, randomize_seed)
    progress(0, desc="Loading the model")
    model = get_model(models, model_name)
    grid = model.grid_size
    rows_to_keep = check_number("Rows kept", rows_to_keep, 0, grid - 1, integer=True)
    image, image_notes = load_image(image, model.image_size)
    prompt, prompt_notes = check_prompt(model, prompt)
    notes += image_notes + [n for n in prompt_notes if not n.startswith("Empty prompt")]
    for note in notes:
        gr.Warning(note)
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = (f"Keeping {rows_to_keep} of {grid} rows, sampling {n} candidates (seed {seed})…"
               f"{expected_time(limits, n)}")
    yield [], seed, format_status(notes, running)

    def call(callback):
        return model.variations(image, prompt=prompt, num_rows_to_keep=rows_to_keep, callback_on_step_end=callback,
                    generator=torch.Generator().manual_seed(seed), **kwargs)

    start = time.perf_counter()
    info = request_info("variations", model_name or next(iter(models)), prompt, seed, kwargs,
                        num_rows_to_keep=rows_to_keep)
    out = yield from sample_with_previews(model, call, k, "Image variations", seed, notes, running, info)
    ranked = "ranked by CLIP similarity to the input" if out.clip_scores is not None else "no CLIP model"
    summary = (f"**{rows_to_keep}/{grid} rows kept, {n} candidates -> best {k}** ({ranked}) in "
               f"{time.perf_counter() - start:.1f} s · seed {seed}")
    yield ranked_gallery(out, "sim", info), seed, format_status(notes, summary)


def edit(models, model_name, editor, prompt, grow_mask, candidates, keep, temperature, top_k, top_p, guidance_scale,
         seed, randomize_seed, rank_by=DEFAULT_EDIT_RANKING, progress=gr.Progress(track_tqdm=True)):
    """Image + painted mask + prompt -> the best k of N repaintings, ranked by CLIP (or by the whole image's
    likelihood, or both: `rank_by`); pixels outside the mask stay the input's."""
    kwargs, seed, notes, limits = checked_settings(models, model_name, candidates, keep, temperature, top_k, top_p,
                                                   guidance_scale, seed, randomize_seed)
    if not isinstance(grow_mask, bool):
        raise gr.Error(f"Grow the mask must be true or false, got {shown(grow_mask)}.")
    if not isinstance(rank_by, str) or rank_by not in EDIT_RANKINGS:
        raise refusal(f"Rank by must be one of: {', '.join(EDIT_RANKINGS)}; got {shown(rank_by)}.",
                      title="Unknown setting")
    progress(0, desc="Loading the model")
    model = get_model(models, model_name)
    inpaint = model.inpaint
    g = model.grid_size
    image, mask, n_cells, image_notes = load_edit(editor, model.image_size, g, int(grow_mask))
    prompt, prompt_notes = check_prompt(model, prompt)
    notes += image_notes + prompt_notes
    for note in notes:
        gr.Warning(note.replace("**", ""))
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = (f"Repainting {n_cells} of {g * g} cells, sampling {n} candidates (seed {seed})…"
               f"{expected_time(limits, n)}")
    yield [], seed, format_status(notes, running)

    def call(callback):
        return inpaint(prompt, image=image, mask_image=mask, mask_dilation=int(grow_mask),
                       rerank=EDIT_RANKINGS[rank_by], callback_on_step_end=callback,
                       generator=torch.Generator().manual_seed(seed), **kwargs)

    start = time.perf_counter()
    info = request_info("edit", model_name or next(iter(models)), prompt, seed, kwargs, mask_dilation=int(grow_mask))
    out = yield from sample_with_previews(model, call, k, "Edit", seed, notes, running, info)
    # each score only where its ranking computed it (`rank_by="CLIP"`: no likelihood; "likelihood": no CLIP)
    clip = [None] * k if out.clip_scores is None else out.clip_scores.flatten().tolist()
    likelihood = [None] * k if out.likelihood_scores is None else out.likelihood_scores.flatten().tolist()
    # the metadata's score: the likelihood where it was computed, else CLIP's (the scores the kept order came from)
    stored = out.likelihood_scores if out.likelihood_scores is not None else out.clip_scores
    images = with_metadata(out.images, info, None if stored is None else stored.flatten().tolist())
    gallery = [(im, f"#{i + 1}" + ("" if clip[i] is None else f" · CLIP {clip[i]:.2f}")
                + ("" if likelihood[i] is None else f" · LL {likelihood[i]:+.1f}"))
               for i, im in enumerate(images)]  # LL: log p(image codes | prompt) in nats
    ranked = {"both": "CLIP + likelihood", "likelihood": "likelihood", "clip": "CLIP"}.get(out.ranked_by,
                                                                                          "drawn order (no CLIP)")
    summary = (f"**{n_cells}/{g * g} cells repainted, {n} candidates -> best {k}** (ranked by {ranked}) in "
               f"{time.perf_counter() - start:.1f} s · seed {seed}")
    yield gallery, seed, format_status(notes, summary)


def on_select(evt: gr.SelectData) -> int:
    return evt.index


def on_model_change(models, name):
    """The rows, guidance, candidates and kept sliders and "how it works" follow the selected model's config (no
    weights are loaded): the candidates start at, and go up to, what the model's cost allows (`request_limits`)."""
    if name not in models:
        return (gr.skip(),) * 5
    info = read_model_info(models[name])
    g, limits = info["grid"], request_limits(info)
    rows = gr.Slider(maximum=g - 1, value=g // 2, label=f"Rows of image tokens kept (of {g})")
    candidates = gr.Slider(maximum=limits["max_candidates"], value=limits["candidates"])
    return (rows, gr.Slider(value=info["guidance_scale"]), candidates, gr.Slider(value=limits["keep"]),
            info["how_it_works"])


def on_model_world(models, worlds, name, prompt):
    """The examples (and the first as the placeholder of the prompt and of the Edit tab's prompt), the style selector
    (only for a world with styles, set to the style the prompt names) and the unseen-word note follow the selected
    model's `world.json`."""
    if name not in models:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    world = worlds[name]
    _, style = split_style(prompt, world)
    return (gr.Dataset(samples=[[p] for p in world.examples]),
            gr.Dropdown(choices=[NO_STYLE, *world.styles], value=style or NO_STYLE, visible=bool(world.styles)),
            on_prompt_change(models, worlds, name, prompt)[0], gr.Textbox(placeholder=world.examples[0]),
            gr.Textbox(placeholder=world.examples[0]))  # the Edit tab's prompt


def on_style(models, worlds, name, prompt, style):
    """A style chosen in the selector -> the prompt asking for it (replacing the style it asked for)."""
    if name not in models:
        return gr.skip()
    return apply_style(prompt if isinstance(prompt, str) else "", style, worlds[name])


def on_prompt_change(models, worlds, name, prompt):
    """As the prompt is typed: the unseen-word note (hidden when empty) and the style selector follows the style
    the prompt names."""
    if name not in models:
        return gr.skip(), gr.skip()
    world, prompt = worlds[name], prompt if isinstance(prompt, str) else ""
    note = unseen_words_note(name, prompt, world)
    style = split_style(prompt, world)[1] or NO_STYLE
    style = gr.Dropdown(choices=[NO_STYLE, *world.styles], value=style) if world.styles else gr.skip()
    return gr.Markdown(note, visible=bool(note)), style


def selected_item(gallery, index):
    """The selected (else the best) image of a gallery's value: a path (or a PIL image, from Python)."""
    index = index if isinstance(index, int) and not isinstance(index, bool) else 0
    return gallery[min(max(index, 0), len(gallery) - 1)][0]


def send_to_editor(gallery, index):
    """The selected (else the best) image of a gallery -> the edit tab's canvas, nothing painted yet."""
    if not gallery:
        gr.Warning("There is no image to edit yet.")
        return gr.skip(), gr.skip()
    image = open_image(selected_item(gallery, index), "The selected image")  # the size, before decoding
    try:
        image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError):
        raise refusal("The selected image could not be decoded.", title="Not an image") from None
    return {"background": image, "layers": [], "composite": image}, gr.Tabs(selected="edit")


def send_to_variations(gallery, index):
    """The selected (else the best) generated image -> the variations tab."""
    if not gallery:
        gr.Warning("Generate some images first.")
        return gr.skip(), gr.skip()
    image = selected_item(gallery, index)
    open_image(image, "The selected image")  # an image, and not too large: the variations tab would show it
    return image, gr.Tabs(selected="variations")

