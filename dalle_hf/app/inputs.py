"""Input checks: every value a request carries (settings, prompts, images, the editor's mask) becomes what the
pipelines take, or a `gr.Error` naming the input and what was expected. An API client can send anything.
"""

import html
import math
import numbers
import os
import random
import unicodedata
import warnings

import gradio as gr
import numpy as np
import PIL.Image
import pydantic
from gradio.utils import get_upload_folder
from PIL import ImageOps

from dalle_hf.image_processing import cell_mask, mask_to_tensor

# The pipeline's defaults. The guidance slider starts at the selected model's own `default_guidance_scale` (its
# `model_index.json`; the shipped checkpoint's was chosen on ShapesEval dev prompts for CLIP-reranked sampling,
# see its card), and at the pipeline's 1.0 (no guidance) for a model that saved none.
DEFAULTS = dict(candidates=16, keep=4, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0)
MAX_CANDIDATES = 64  # N per request on a shared CPU server (the pipeline itself allows MAX_IMAGES_PER_PROMPT)
# What one request may cost, in the selected model's estimated seconds per image (`read_model_info`): its default
# candidates fit REQUEST_SECONDS and its maximum MAX_REQUEST_SECONDS, within the defaults and MAX_CANDIDATES above
# (which the small models keep: 16 candidates of dalle-shapes take about 5 s on this CPU).
REQUEST_SECONDS = 60  # a first image within a minute of opening the Space
MAX_REQUEST_SECONDS = 240  # the most one request, forged or not, ties up a worker
SHOW_TIME_FROM = 30  # seconds: a request expected to take longer says so before sampling
MAX_KEEP = 16
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 1000  # longer text is cut before tokenizing; the model reads text_seq_len tokens anyway
MAX_UPLOAD_PIXELS = 50_000_000  # about 7000 x 7000: larger uploads are refused before decoding
MAX_FILE_SIZE = "20mb"  # gradio refuses larger uploads itself


def shown(value, limit: int = 60) -> str:
    """`repr(value)` for a message: HTML-escaped, and cut if long (an API client can send anything). `repr` writes
    control and bidirectional-override characters as escapes."""
    text = repr(value)
    return html.escape(text if len(text) <= limit else text[: limit - 1] + "…", quote=False)


def printable(text: str) -> str:
    """`text` safe to quote in a note or a toast: control characters and invisible formatting characters (the
    bidirectional overrides that reorder what follows them, U+202E) written as escapes (`\\u202e`), then
    HTML-escaped. The zero-width joiner stays: emoji sequences are made of it."""
    return html.escape("".join(
        c.encode("unicode_escape").decode("ascii") if unicodedata.category(c) in ("Cc", "Cf") and c != "\u200d" else c
        for c in text
    ), quote=False)


def logged(text, limit: int = 60) -> str:
    """A prompt (or any value) for one log line: cut to `limit` characters, its control and bidirectional characters
    escaped by `repr`."""
    if isinstance(text, str) and len(text) > limit:
        text = text[: limit - 1] + "…"
    return repr(text)


def check_number(name: str, value, low: float, high: float, integer: bool = False):
    """`value` as a number in [low, high] (an `int` if `integer`), else a `gr.Error` naming the setting and the range.

    Only numbers pass: text ("3", "nan"), lists and true/false are refused, not converted.
    """
    expected = f"{'a whole' if integer else 'a'} number in [{low}, {high}]"
    if value is None:
        raise gr.Error(f"{name} is missing: expected {expected}.")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise gr.Error(f"{name} must be {expected}, got {shown(value)}.")
    x = float(value)
    if not math.isfinite(x) or not low <= x <= high:
        raise gr.Error(f"{name} must be in [{low}, {high}], got {shown(value)}.")
    if integer:
        if x != int(x):
            raise gr.Error(f"{name} must be {expected}, got {shown(value)}.")
        return int(x)
    return x


def request_limits(info: dict | None) -> dict:
    """A model's candidates N and images kept k to start with, and the most candidates a request may ask, from its
    `seconds_per_image` (`read_model_info`; none: the defaults). At least one candidate, however slow a model is."""
    per_image = (info or {}).get("seconds_per_image") or 0.0

    def fitting(seconds: float, most: int) -> int:
        return most if per_image <= 0 else min(most, max(1, int(seconds / per_image)))

    candidates = fitting(REQUEST_SECONDS, DEFAULTS["candidates"])
    return {"candidates": candidates, "keep": min(DEFAULTS["keep"], candidates),
            "max_candidates": fitting(MAX_REQUEST_SECONDS, MAX_CANDIDATES), "seconds_per_image": per_image,
            "device": (info or {}).get("device", "cpu")}


def expected_time(limits: dict, candidates: int) -> str:
    """" About 40 s on this CPU." for a request expected to take SHOW_TIME_FROM seconds or more, else ""."""
    seconds = limits["seconds_per_image"] * candidates
    if seconds < SHOW_TIME_FROM:
        return ""
    when = f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
    return f" About {when} on this {limits['device'].upper()}."


def check_settings(candidates, keep, temperature, top_k, top_p, guidance_scale, seed, randomize_seed,
                   limits: dict | None = None, model_name: str | None = None):
    """UI settings -> (pipeline kwargs, seed, notes). 0 top-k and 1.0 top-p mean "off". `limits`
    (`request_limits`) bound the candidates of the model `model_name`: more are refused, never reduced."""
    notes = []
    limits = limits or request_limits(None)
    candidates = check_number("Candidates N", candidates, 1, MAX_CANDIDATES, integer=True)
    if candidates > limits["max_candidates"]:
        raise refusal(f"Candidates must be at most {limits['max_candidates']} for {model_name} on this "
                      f"{limits['device'].upper()} server (about {limits['seconds_per_image']:.0f} s an image); got "
                      f"{candidates}.", title="Too many candidates")
    keep = check_number("Images kept k", keep, 1, MAX_KEEP, integer=True)
    if keep > candidates:
        notes.append(f"Images kept k={keep} is more than the candidates N={candidates}: showing all {candidates}.")
        keep = candidates
    kwargs = dict(
        num_images_per_prompt=candidates,
        num_images_to_keep=keep,
        temperature=check_number("Temperature", temperature, 0.01, 5.0),
        top_k=check_number("Top-k", top_k, 0, 1_000_000, integer=True) or None,
        top_p=check_number("Top-p", top_p, 0.01, 1.0),
        guidance_scale=check_number("Guidance scale", guidance_scale, 1.0, 20.0),
    )
    if kwargs["top_p"] >= 1.0:
        kwargs["top_p"] = None
    if randomize_seed or seed is None or seed == "":
        seed = random.randint(0, MAX_SEED)
    else:
        seed = check_number("Seed", seed, 0, MAX_SEED, integer=True)
    return kwargs, seed, notes


def check_prompt(model, prompt) -> tuple[str, list[str]]:
    """The prompt `model` (an `AppModel`) gets, and notes on what happens to it (empty, cut, truncated, not
    English)."""
    if prompt is None:
        prompt = ""
    if not isinstance(prompt, str):
        raise gr.Error(f"The prompt must be text, got {type(prompt).__name__}.")
    notes = []
    if len(prompt) > MAX_PROMPT_CHARS:
        notes.append(f"The prompt is {len(prompt):,} characters: only its first {MAX_PROMPT_CHARS:,} are used.")
        prompt = prompt[:MAX_PROMPT_CHARS]
    if not prompt.strip():
        notes.append("Empty prompt: sampling **unconditionally** (all-padding text, as under caption dropout); "
                     "the CLIP scores then compare with empty text.")
        return "", notes
    length, n_tokens = model.text_seq_len, model.prompt_token_count(prompt)
    if n_tokens > length:
        kept = model.prompt_as_read(prompt)
        notes.append(f"The prompt is {n_tokens} tokens; the model reads {length}, so it was truncated to "
                     f"“{printable(kept)}”.")
    if not prompt.isascii():
        notes.append("The prompt has non-Latin characters or emoji: the model was trained on short English "
                     "captions, so they are encoded byte by byte and probably carry little meaning for it.")
    return prompt, notes


def check_negative_prompt(model, negative_prompt, guidance_scale: float) -> tuple[str, list[str]]:
    """The negative prompt the model gets ("" = none), and notes on it, as for the prompt."""
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt.strip()):
        return "", []
    if guidance_scale <= 1:
        raise gr.Error("A negative prompt steers classifier-free guidance: set the guidance scale above 1 "
                       "(Advanced settings), or clear the negative prompt.")
    negative_prompt, notes = check_prompt(model, negative_prompt)
    return negative_prompt, [note.replace("The prompt", "The negative prompt", 1) for note in notes]


# An API client names an image input's file by its server path. Gradio checks that the path is one it received
# only when the JSON carries `"meta": {"_type": "gradio.FileData"}`; without it `gr.Image` opened any path it was
# given. Every image input therefore checks the path itself, before Gradio or PIL open anything: it must lie in
# Gradio's upload folder (which also holds its cache of the app's outputs).
UPLOAD_HINT = "upload the file first (POST /gradio_api/upload, or gradio_client's `handle_file`)"
FILE_META = {"_type": "gradio.FileData"}


def refusal(message: str, title: str = "Error") -> gr.Error:
    """A `gr.Error` for a refused request: the app logs one line for it (`CheckedBlocks`), not a traceback."""
    return gr.Error(message, title=title, print_exception=False)


def as_json(payload):
    """A component's payload as the JSON it came from (Gradio hands pydantic models to `preprocess`)."""
    return payload.model_dump() if isinstance(payload, pydantic.BaseModel) else payload


def check_uploaded_file(name: str, file, require_meta: bool = False) -> str | None:
    """The server path of an uploaded file payload (`{"path": ..., "meta": ...}`), else a message naming the input.

    The path must resolve (symbolic links followed) to a file inside Gradio's upload folder; nothing is opened.
    Data URLs are refused too: the app's own frontend never sends them, and they would skip the size check.
    """
    file = as_json(file)
    if file is None:
        return None
    if not isinstance(file, dict):
        raise refusal(f"{name} must be an uploaded file, {{\"path\": ..., \"meta\": {FILE_META}}}, got "
                      f"{shown(file)}: {UPLOAD_HINT}.", title="Not an uploaded file")
    path, url = file.get("path"), file.get("url")
    if isinstance(url, str) and url.startswith("data:"):
        raise refusal(f"{name} must be an uploaded file, not a data URL: {UPLOAD_HINT}.", title="Not an uploaded file")
    if not isinstance(path, str) or not path:
        raise refusal(f"{name} has no file path: {UPLOAD_HINT}.", title="Not an uploaded file")
    if require_meta and file.get("meta") != FILE_META:
        raise refusal(f"{name} must carry \"meta\": {FILE_META}, as Gradio's uploaded files do.",
                      title="Not an uploaded file")
    folder = os.path.realpath(get_upload_folder())
    real = os.path.realpath(path) if "\0" not in path and "://" not in path else ""
    if not real or os.path.commonpath([folder, real]) != folder or not os.path.isfile(real):
        raise refusal(f"{name}: {shown(path)} is not a file this app received; {UPLOAD_HINT}.",
                      title="Not an uploaded file")
    return real


def open_image(image, name: str = "The image") -> PIL.Image.Image:
    """A path (already checked to be an upload) or a PIL image -> a PIL image whose size is checked before its
    pixels are decoded (opening reads only the header). Anything else gets a message naming the input."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise refusal(f"{name} is too large: at most {MAX_UPLOAD_PIXELS // 1_000_000} megapixels.",
                      title="Image too large") from None
    except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
        raise refusal(f"{name} is not an image this app can read (PNG, JPEG, WebP, GIF, BMP or TIFF).",
                      title="Not an image") from None
    width, height = img.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise refusal(f"{name} is too large ({width} x {height}): at most {MAX_UPLOAD_PIXELS // 1_000_000} "
                      "megapixels.", title="Image too large")
    if width < 1 or height < 1:
        raise refusal(f"{name} is empty ({width} x {height}).", title="Empty image")
    return img


def to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """A high-bit-depth gray image as uint8: by its format's range (16-bit, or [0, 1] floats), else min-max."""
    low, high = 0.0, 65535.0 if mode.startswith("I;16") else 1.0 if mode == "F" else 255.0
    if mode == "I" and array.max() > 255:
        high = 65535.0
    if array.min() < low or array.max() > high:
        low, high = float(array.min()), max(float(array.max()), float(array.min()) + 1e-8)
    return ((array - low) / (high - low) * 255).round().clip(0, 255).astype(np.uint8)


def load_image(image, image_size: int) -> tuple[PIL.Image.Image, list[str]]:
    """An upload (a path or PIL image) -> a bounded PIL image the pipeline converts, and notes on the conversion."""
    if image is None:
        raise refusal("Upload an image first, or pick a generated one (“Make variations of the selected image”).",
                      title="No image")
    img = open_image(image)
    width, height = img.size
    notes, mode = [], img.mode
    if getattr(img, "n_frames", 1) > 1:
        notes.append("Animated image: the first frame is used.")
    try:
        img.draft(None, (4 * image_size, 4 * image_size))  # JPEG: decode at a reduced scale
        img = ImageOps.exif_transpose(img)
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise refusal(f"The image could not be decoded ({printable(str(e))}); is the file complete?",
                      title="Not an image") from None
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):  # 16-bit / 32-bit / float gray -> 8-bit gray
        img = PIL.Image.fromarray(to_uint8(np.asarray(img, dtype=np.float64), img.mode), "L")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        notes.append("Transparent pixels were composited on white.")
    elif mode not in ("RGB", "P"):
        notes.append(f"{'Grayscale' if mode in ('L', '1') else mode} image converted to RGB.")
    if max(img.size) > 4 * image_size:  # bound the memory of the float conversion; the pipeline resizes anyway
        img.thumbnail((4 * image_size, 4 * image_size), PIL.Image.Resampling.LANCZOS)
    if width != height:
        side = min(width, height)
        notes.append(f"Center-cropped to a square ({width} x {height} -> {side} x {side}).")
    if min(width, height) != image_size:
        notes.append(f"Resized to the model's {image_size} x {image_size}.")
    return img, notes


def load_edit(editor, image_size: int, grid: int, dilation: int) -> tuple[PIL.Image.Image, PIL.Image.Image, int,
                                                                            list[str]]:
    """The image editor's value -> (image, mask ("L", white = repaint) of the image's size, cells repainted, notes).

    The mask is everything painted on the editor's layers (any opaque pixel). Bad masks get a message saying what
    to do: none painted, a layer not the image's size, or a mask that leaves no code cell of the image."""
    if not isinstance(editor, dict) or editor.get("background") is None:
        raise gr.Error("Upload an image to edit first, or pick a generated one (“Edit the selected image”).")
    background = editor["background"]
    if isinstance(background, (str, os.PathLike)):
        background = PIL.Image.open(background)
    layers = [layer for layer in editor.get("layers") or [] if layer is not None]
    layers = [PIL.Image.open(layer) if isinstance(layer, (str, os.PathLike)) else layer for layer in layers]
    for layer in layers:
        if layer.size != background.size:
            raise gr.Error(f"The painted mask is {layer.size[0]} x {layer.size[1]} but the image is "
                           f"{background.size[0]} x {background.size[1]}: paint on the image itself (no crop or "
                           "resize of the canvas).", title="Bad mask")
    painted = np.zeros((background.size[1], background.size[0]), dtype=bool)  # (H, W)
    for layer in layers:
        painted |= np.asarray(layer.convert("RGBA"))[..., 3] > 0
    if not painted.any():
        raise gr.Error("Nothing is painted: paint over the region to repaint with the brush, then press Edit.",
                       title="Empty mask")
    if background.mode == "RGBA" and background.getextrema()[3][0] == 255:  # the editor's opaque RGBA
        background = background.convert("RGB")
    image, notes = load_image(background, image_size)
    mask = PIL.Image.fromarray(painted.astype(np.uint8) * 255, "L")
    if mask.size != image.size:  # load_image bounded a large upload: the mask follows
        mask = mask.resize(image.size, PIL.Image.Resampling.BILINEAR)
    cells = cell_mask(mask_to_tensor(mask, (image.height, image.width), image_size), grid, dilation)  # (g, g)
    if cells.all():
        raise gr.Error(f"The mask touches all {grid} x {grid} cells of the image, so nothing of it would be kept: "
                       "erase part of it, or use “Text to images” for a new image.", title="Mask covers everything")
    return image, mask, int(cells.sum()), notes

