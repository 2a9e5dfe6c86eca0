"""dalle-hf Gradio app: prompt -> CLIP-ranked grid, image variations and editing, on the models in `checkpoints/`.

    python app.py [--checkpoints DIR] [--host 127.0.0.1] [--port 7860] [--concurrency 2] [--max-queue 24]

Every sub-folder of the checkpoints folder with a `model_index.json` is a model (or the folder itself, if it has
one); `DALLE_HF_CHECKPOINTS` overrides the folder like `--checkpoints`. A model's `world.json` (written with the
checkpoint) gives its example prompts, its styles (a style selector) and the words of its training captions (a note
names a prompt's others); the app itself names no world. Ready for a Hugging Face Space: the README
front matter names this file, and the `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` that Spaces set are respected.
Nothing happens at import: `build_demo()` makes the Blocks; pipelines load once per model, on first use or in
`main()`, and are shared by all requests.
"""

import argparse
import contextvars
import ctypes
import dataclasses
import functools
import html
import io
import json
import logging
import math
import numbers
import os
import queue
import random
import re
import threading
import time
import traceback
import unicodedata
import uuid
import warnings
import weakref
from pathlib import Path

import diffusers
import gradio as gr
import numpy as np
import PIL.Image
import pydantic
import torch
import transformers
from gradio.exceptions import InvalidPathError
from gradio.utils import get_upload_folder
from PIL import ImageOps

from dalle_hf.data.world import caption_words, read_world_file
from dalle_hf.image_processing import cell_mask, mask_to_tensor
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipeline
from dalle_hf.pipeline_dalle_variation import DalleImageVariationPipeline

logger = logging.getLogger("dalle_hf.app")

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------
CHECKPOINTS_ENV = "DALLE_HF_CHECKPOINTS"
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"  # next to app.py, so it runs from any cwd
DEFAULT_MODEL = "dalle-shapes"  # listed first when present
# A model's example prompts, style selector and vocabulary come from the `world.json` it was shipped with. These are
# the examples of a model without one: made before checkpoints carried it, so trained on the shapes world.
EXAMPLES = ("a circle", "a square and a triangle", "three diamonds", "a red circle", "a circle left of a square",
            "a blue square and a yellow triangle")
NO_STYLE = "(any style)"  # the style selector's choice that leaves the style out of the prompt
# The pipeline's defaults. The guidance slider starts at the selected model's own `default_guidance_scale` (its
# `model_index.json`; the shipped checkpoint's was chosen on ShapesEval dev prompts for CLIP-reranked sampling,
# see its card), and at the pipeline's 1.0 (no guidance) for a model that saved none.
DEFAULTS = dict(candidates=16, keep=4, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0)
MAX_CANDIDATES = 64  # N per request on a shared CPU server (the pipeline itself allows MAX_IMAGES_PER_PROMPT)
MAX_KEEP = 16
MAX_SEED = 2**31 - 1
MAX_PROMPT_CHARS = 1000  # longer text is cut before tokenizing; the model reads text_seq_len tokens anyway
MAX_UPLOAD_PIXELS = 50_000_000  # about 7000 x 7000: larger uploads are refused before decoding
MAX_FILE_SIZE = "20mb"  # gradio refuses larger uploads itself
PREVIEW_INTERVAL = 0.3  # seconds between streamed partial grids: decoding them costs dVAE passes
PREVIEW_GRAY = 0.5  # pixels of rows not sampled yet
# The Edit tab's rankings -> `DalleInpaintPipeline(rerank=...)`. The first (the pipeline's default: CLIP + the whole
# grid's likelihood, or the likelihood alone without CLIP) is the one issue 20 asks for; CLIP alone ranked best on
# the shapes edit benchmark (docs/inpainting.md), so it is one click away.
EDIT_RANKINGS = {"CLIP + likelihood": None, "CLIP": "clip", "likelihood": "likelihood"}
DEFAULT_EDIT_RANKING = "CLIP + likelihood"
EDIT_BRUSH_FRACTION = 12  # the edit brush starts 1/12 of the model's image side wide (5 px of 64: a small shape)
CSS = """
#gallery img, #var-gallery img { image-rendering: pixelated; }
#var-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
"""  # 64 px images, shown large and sharp


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and the pipeline cache
# ----------------------------------------------------------------------------------------------------------------
def checkpoints_root(checkpoints: str | os.PathLike | None = None) -> Path:
    """`checkpoints`, else `$DALLE_HF_CHECKPOINTS`, else `checkpoints/` next to this file."""
    return Path(checkpoints or os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINTS)


def find_checkpoints(root: str | os.PathLike) -> dict[str, Path]:
    """Model name -> folder: `root` itself if it holds a `model_index.json`, else its sub-folders that do
    (`dalle-shapes` first, then by name)."""
    root = Path(root)
    if (root / "model_index.json").is_file():
        return {root.resolve().name: root}
    if not root.is_dir():
        return {}
    found = sorted(p for p in root.iterdir() if (p / "model_index.json").is_file())
    found.sort(key=lambda p: p.name != DEFAULT_MODEL)
    return {p.name: p for p in found}


def no_checkpoint_message(root: Path | None = None) -> str:
    return (
        f"No model found in `{root or 'checkpoints/'}`: a model is a folder with a `model_index.json` "
        f"(`pipe.save_pretrained(DIR)`). Train one (see the README), or point the app at one with "
        f"`--checkpoints DIR` or `{CHECKPOINTS_ENV}=DIR`."
    )


def read_model_info(path: Path) -> dict:
    """The numbers the UI shows, read from the saved configs without loading weights."""

    def config(file):
        # Unreadable: no numbers to show; loading the model reports the error when it is used.
        try:
            return json.loads(file.read_text()) if file.is_file() else {}
        except (OSError, ValueError):
            return {}

    transformer, vae = config(path / "transformer" / "config.json"), config(path / "vae" / "config.json")
    return {
        "guidance_scale": config(path / "model_index.json").get("default_guidance_scale", DEFAULTS["guidance_scale"]),
        "grid": transformer.get("image_grid_size", 8),
        "text_seq_len": transformer.get("text_seq_len"),
        "n_layer": transformer.get("n_layer"),
        "n_embd": transformer.get("n_embd"),
        "image_vocab_size": transformer.get("image_vocab_size"),
        "image_size": vae.get("image_size"),
        "clip": (path / "clip_model").is_dir(),
    }


# ----------------------------------------------------------------------------------------------------------------
# The selected model's world (its world.json): example prompts, a style selector, the words it was trained on
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelWorld:
    """What the app reads from a model's `world.json` (`dalle_hf.data.world.write_world_file`), so that it names no
    world itself: the examples to show, the styles a prompt can ask for and the words of the training captions.

    A model without one (`ModelWorld()`, made before checkpoints carried it) gets the shapes examples, no style
    selector and no unseen-word note (its vocabulary is unknown).
    """

    examples: tuple[str, ...] = EXAMPLES
    words: frozenset[str] | None = None  # None: unknown, so no word is called unseen
    styles: tuple[str, ...] = ()  # exact names, in the world's order
    style_aliases: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # "fluent 3d" -> ("3d",)
    style_prompt: str = "{label} in {style} style"  # how a prompt asks for a style

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "ModelWorld":
        """The `world.json` of a model folder; `ModelWorld()` if it has none or it cannot be read (logged)."""
        try:
            world = read_world_file(str(folder))
            if world is None:
                return cls()
            styles = tuple(world.get("styles") or ())
            template = world.get("style_prompt") or cls.style_prompt
            if styles and ("{label}" not in template or "{style}" not in template):
                raise ValueError(f"style_prompt must contain {{label}} and {{style}}, got {template!r}")
            return cls(
                examples=tuple(world.get("examples") or EXAMPLES),
                words=frozenset(world["words"]) if isinstance(world.get("words"), list) else None,
                styles=styles,
                style_aliases={s: tuple(world.get("style_aliases", {}).get(s, ())) for s in styles},
                style_prompt=template,
            )
        except (OSError, ValueError, TypeError, AttributeError) as e:  # the model itself may still load
            logger.warning("Ignoring the unreadable %s: %s", Path(folder) / "world.json", e)
            return cls()

    @functools.cached_property
    def style_pattern(self) -> re.Pattern | None:
        """A whole prompt in `style_prompt`'s form naming one of the styles or their aliases (the longest first, so
        "noto mono" is not read as "noto"); None for a world without styles."""
        if not self.styles:
            return None
        names = sorted({*self.styles, *(a for s in self.styles for a in self.style_aliases.get(s, ()))}, key=len,
                       reverse=True)
        pattern = re.escape(self.style_prompt.strip())
        pattern = pattern.replace(re.escape("{label}"), "(?P<label>.*?)")
        pattern = pattern.replace(re.escape("{style}"), "(?P<style>" + "|".join(map(re.escape, names)) + ")")
        return re.compile(r"\s*" + pattern.replace(re.escape(" "), r"\s+"), re.IGNORECASE)


def split_style(prompt: str, world: ModelWorld) -> tuple[str, str | None]:
    """A prompt -> (its label, the style it asks for: a canonical name, also when it names an alias; None if none).

    `"red apple in twitter style"` -> `("red apple", "twemoji")`; `"red apple"` -> `("red apple", None)`.
    """
    prompt = (prompt or "").strip()
    # A space in front: a prompt that is only the style phrase ("in noto style") matches with an empty label.
    match = world.style_pattern.fullmatch(" " + prompt) if world.style_pattern else None
    if match is None:
        return prompt, None
    named = " ".join(match["style"].lower().split())
    style = next(s for s in world.styles if named in (s.lower(), *(a.lower() for a in world.style_aliases.get(s, ()))))
    return match["label"].strip(), style


def apply_style(prompt: str, style: str | None, world: ModelWorld) -> str:
    """The prompt asking for `style` in the world's form, replacing the style it named before (any style or alias);
    `NO_STYLE` (or None) removes it: `"red apple"` + `"twemoji"` -> `"red apple in twemoji style"`."""
    label, _ = split_style(prompt, world)
    if style in (None, "", NO_STYLE):
        return label
    if not world.styles:
        raise gr.Error(f"This model has no styles (its world.json names none), got {shown(style)}.")
    if style not in world.styles:
        raise gr.Error(f"Unknown style {shown(style)}: expected one of {', '.join(world.styles)}.")
    return world.style_prompt.format(label=label, style=style).strip()


def unseen_words(prompt: str, world: ModelWorld) -> list[str]:
    """The prompt's words (`caption_words`) that no training caption of the model had, once each, in order."""
    if world.words is None or not isinstance(prompt, str):
        return []
    return list(dict.fromkeys(w for w in caption_words(prompt[:MAX_PROMPT_CHARS]) if w not in world.words))


def unseen_words_note(model_name: str, prompt: str, world: ModelWorld) -> str:
    """The note under the prompt naming the words the model never saw; "" when there are none."""
    words = unseen_words(prompt, world)
    if not words:
        return ""
    listed = ", ".join(f'"{w}"' for w in words)
    return (f"The {html.escape(str(model_name), quote=False)} model never saw {listed} in training: it will draw "
            "what it knows instead.")


_PIPELINES: dict[Path, tuple[DallePipeline, DalleImageVariationPipeline]] = {}
_PIPELINES_LOCK = threading.Lock()  # one load per model, however many requests arrive at once


def load_pipelines(path: str | os.PathLike) -> tuple[DallePipeline, DalleImageVariationPipeline]:
    """Load a saved pipeline once per process and share it (and a variation pipeline on the same modules).

    Sampling only reads the weights (every request has its own KV cache and generator), so concurrent requests
    can share one pipeline.
    """
    key = Path(path).resolve()
    with _PIPELINES_LOCK:
        if key not in _PIPELINES:
            pipe = DallePipeline.from_pretrained(key)
            pipe.set_progress_bar_config(desc="Sampling image tokens", leave=False)
            variations = DalleImageVariationPipeline(**pipe.components)
            variations.set_progress_bar_config(desc="Sampling image tokens", leave=False)
            _PIPELINES[key] = (pipe, variations)
        return _PIPELINES[key]


_INPAINT_PIPELINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DallePipeline -> its inpainting one


def inpaint_pipeline(pipe: DallePipeline) -> DalleInpaintPipeline:
    """The inpainting pipeline on a loaded pipeline's modules, made once per model (with its default guidance)."""
    with _PIPELINES_LOCK:
        if pipe not in _INPAINT_PIPELINES:
            inpaint = DalleInpaintPipeline(**pipe.components, default_guidance_scale=pipe.config.default_guidance_scale)
            inpaint.set_progress_bar_config(desc="Sampling image tokens", leave=False)
            _INPAINT_PIPELINES[pipe] = inpaint
        return _INPAINT_PIPELINES[pipe]


def get_pipelines(models: dict[str, Path], name: str | None):
    if not models:
        raise gr.Error(no_checkpoint_message(), title="No model")
    if name not in models:
        name = next(iter(models)) if name in (None, "") else name
        if name not in models:
            raise gr.Error(f"Unknown model {name!r}; available: {', '.join(models)}.")
    try:
        return load_pipelines(models[name])
    except Exception as e:  # a broken checkpoint must not take the app down
        logger.exception("Loading %s failed", models[name])
        raise gr.Error(f"Could not load the model {name!r}: {type(e).__name__}: {e}", title="Model error") from None


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def limit_malloc_arenas(arenas: int = 2):
    """Share glibc's malloc arenas among the server's threads. With one arena per thread (up to 8 per core), the
    sampling buffers freed in each stay mapped: measured here, 8 clients left the server 15% above its warmed-up
    memory; with 2 arenas, 1-2%. Call before the server starts its threads (like the MALLOC_ARENA_MAX env var)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_memory():
    """Return freed sampling buffers to the OS after a request, so a long-running server's memory settles back.
    No `gc.collect()`: it costs most of a second here."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


# ----------------------------------------------------------------------------------------------------------------
# Input checks: clear messages instead of stack traces
# ----------------------------------------------------------------------------------------------------------------
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


def check_settings(candidates, keep, temperature, top_k, top_p, guidance_scale, seed, randomize_seed):
    """UI settings -> (pipeline kwargs, seed, notes). 0 top-k and 1.0 top-p mean "off"."""
    notes = []
    candidates = check_number("Candidates N", candidates, 1, MAX_CANDIDATES, integer=True)
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


def check_prompt(pipe: DallePipeline, prompt) -> tuple[str, list[str]]:
    """The prompt the model gets, and notes on what happens to it (empty, truncated, out of vocabulary)."""
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
    length, n_tokens = pipe.transformer.config.text_seq_len, pipe.prompt_token_count(prompt)
    if n_tokens > length:
        ids = pipe.tokenizer(prompt, truncation=True, max_length=length)["input_ids"]
        kept = pipe.tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "").strip()  # no half characters
        notes.append(f"The prompt is {n_tokens} tokens; the model reads {length}, so it was truncated to "
                     f"“{printable(kept)}”.")
    if not prompt.isascii():
        notes.append("The prompt has non-Latin characters or emoji: the model was trained on short English "
                     "captions, so they are encoded byte by byte and probably carry little meaning for it.")
    return prompt, notes


def check_negative_prompt(pipe: DallePipeline, negative_prompt, guidance_scale: float) -> tuple[str, list[str]]:
    """The negative prompt the model gets ("" = none), and notes on it, as for the prompt."""
    if negative_prompt is None or (isinstance(negative_prompt, str) and not negative_prompt.strip()):
        return "", []
    if guidance_scale <= 1:
        raise gr.Error("A negative prompt steers classifier-free guidance: set the guidance scale above 1 "
                       "(Advanced settings), or clear the negative prompt.")
    negative_prompt, notes = check_prompt(pipe, negative_prompt)
    return negative_prompt, [note.replace("The prompt", "The negative prompt", 1) for note in notes]


# ----------------------------------------------------------------------------------------------------------------
# Image inputs: only files this app received, of a bounded size
# ----------------------------------------------------------------------------------------------------------------
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


class ImageUpload(gr.Image):
    """A `gr.Image` that takes only files the app received (`check_uploaded_file`), and reports an upload it cannot
    read (not an image, a decompression bomb) as a message."""

    is_template = True  # drawn by the frontend's Image component

    def check_payload(self, payload):
        """Called on the request's JSON before Gradio touches its files (`CheckedBlocks`)."""
        check_uploaded_file(setting_name(self), payload)

    def preprocess(self, payload):
        self.check_payload(payload)
        if payload is not None:
            open_image(payload.path, setting_name(self))  # the size, before Gradio decodes anything
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except PIL.Image.DecompressionBombError:
            raise refusal("The image is too large to decode safely.", title="Image too large") from None
        except (OSError, ValueError, SyntaxError):  # PIL.UnidentifiedImageError is an OSError
            raise refusal("The upload is not an image this app can read (PNG, JPEG, WebP, GIF, BMP or TIFF).",
                          title="Not an image") from None


class CheckedImageEditor(gr.ImageEditor):
    """A `gr.ImageEditor` whose background and layers must be files the app received (or the canvas's own blobs)
    and at most MAX_UPLOAD_PIXELS each, checked before Gradio decodes them."""

    is_template = True  # drawn by the frontend's ImageEditor component

    def check_payload(self, payload):
        payload = as_json(payload)
        if payload is None:
            return
        if not isinstance(payload, dict) or not isinstance(payload.get("layers") or [], list):
            raise refusal(f"The image to edit must be {{\"background\": file, \"layers\": [file, ...], "
                          f"\"composite\": file}}, got {shown(payload)}.", title="Bad image")
        for key, files in (("background", [payload.get("background")]), ("layer", payload.get("layers") or []),
                           ("composite", [payload.get("composite")])):
            for file in files:
                check_uploaded_file(f"The image to edit ({key})", file, require_meta=True)

    def preprocess(self, payload):
        self.check_payload(payload)
        try:
            return super().preprocess(payload)
        except gr.Error:
            raise
        except PIL.Image.DecompressionBombError:
            raise refusal("The image to edit is too large to decode safely.", title="Image too large") from None
        except (OSError, ValueError, SyntaxError):
            raise refusal("The image to edit is not an image this app can read (PNG, JPEG, WebP, GIF, BMP or "
                          "TIFF).", title="Not an image") from None

    def convert_and_format_image(self, file, flatten_on_white: bool = False):
        if file is not None:  # a checked upload, or the bytes the browser's canvas sent
            open_image(file.path if hasattr(file, "path") else io.BytesIO(file), "The image to edit")
        return super().convert_and_format_image(file, flatten_on_white)


def output_gallery(label: str, elem_id: str) -> "CheckedGallery":
    """A gallery of results. It is the input of the "use this image" buttons, and Gradio gives any event input an
    upload area unless told otherwise: `interactive=False`, so a result gallery takes no uploads."""
    return CheckedGallery(label=label, interactive=False, columns=4, height="auto", format="png", object_fit="contain",
                          buttons=["download", "download_all", "fullscreen"], elem_id=elem_id)


class CheckedGallery(gr.Gallery):
    """An output gallery that is also the input of the "use this image" buttons: its items must be files the app
    received (its own outputs are), so a forged gallery cannot name another file."""

    is_template = True  # drawn by the frontend's Gallery component

    def check_payload(self, payload):
        payload = as_json(payload)
        if payload is None:
            return
        if not isinstance(payload, list):
            raise refusal(f"The gallery “{setting_name(self)}” must be a list of images, got {shown(payload)}.",
                          title="Bad gallery")
        for item in payload:
            if not isinstance(item, dict) or item.get("image") is None:
                raise refusal(f"The gallery “{setting_name(self)}” holds something not an image: {shown(item)}.",
                              title="Bad gallery")
            check_uploaded_file(f"An image of the gallery “{setting_name(self)}”", item["image"], require_meta=True)

    def preprocess(self, payload):
        self.check_payload(payload)
        return super().preprocess(payload)


# Gradio checks a slider's or number box's API input against its bounds before it looks at the type, so null,
# text or a list failed inside Gradio, before any handler ran, with its generic "the upstream Gradio app has raised
# an exception"; a textbox turned anything into text, a checkbox took anything. These components check the type
# and range first and answer with the setting's name (issue 22); the handlers check again for Python callers.
def setting_name(component: gr.components.Component) -> str:
    return (component.label or "The value").split(" (")[0]  # "Top-k (0 = off)" -> "Top-k"


class CheckedSlider(gr.Slider):
    """A `gr.Slider` whose input must be a number in its range: else a message with its name and range."""

    is_template = True  # drawn by the frontend's Slider component

    def preprocess(self, payload):
        check_number(setting_name(self), payload, self.minimum, self.maximum, integer=self.precision == 0)
        return super().preprocess(payload)


class CheckedNumber(gr.Number):
    """A `gr.Number` whose input must be empty (None, "") or a number in its range: else a message, as above."""

    is_template = True

    def preprocess(self, payload):
        if payload is None or payload == "":
            return None
        check_number(setting_name(self), payload, self.minimum, self.maximum, integer=self.precision == 0)
        return super().preprocess(payload)


class CheckedCheckbox(gr.Checkbox):
    """A `gr.Checkbox` whose input must be true or false."""

    is_template = True

    def preprocess(self, payload):
        if not isinstance(payload, bool):
            raise gr.Error(f"{setting_name(self)} must be true or false, got {shown(payload)}.")
        return super().preprocess(payload)


class CheckedTextbox(gr.Textbox):
    """A `gr.Textbox` whose input must be text or empty (None), not a number or a list turned into text."""

    is_template = True

    def preprocess(self, payload):
        if payload is not None and not isinstance(payload, str):
            raise gr.Error(f"{setting_name(self)} must be text, got {shown(payload)}.")
        return super().preprocess(payload)


def check_choice(component, payload):
    """A dropdown's or radio's input must be one of its choices: else a message naming the setting and its choices."""
    choices = [value for _, value in component.choices]
    if payload not in choices or not isinstance(payload, str):
        listed = ", ".join(map(str, choices)) or "none (no model was found)"
        raise refusal(f"{setting_name(component)} must be one of: {html.escape(listed, quote=False)}; got "
                      f"{shown(payload)}.", title="Unknown setting")


class CheckedDropdown(gr.Dropdown):
    """A `gr.Dropdown` (one choice, no custom values) whose input must be one of its choices or empty (None)."""

    is_template = True

    def preprocess(self, payload):
        if payload is not None:
            check_choice(self, payload)
        return super().preprocess(payload)


class CheckedRadio(gr.Radio):
    """A `gr.Radio` whose input must be one of its choices."""

    is_template = True

    def preprocess(self, payload):
        check_choice(self, payload)
        return super().preprocess(payload)


class StyleDropdown(gr.Dropdown):
    """The style selector: a `gr.Dropdown` whose input is checked by the handler against the styles of the model named
    in the same call (`apply_style`), not against the choices this session last showed (an API client can ask
    for a style of any model)."""

    is_template = True

    def preprocess(self, payload):
        if payload is not None and not isinstance(payload, str):
            raise gr.Error(f"{setting_name(self)} must be text, got {shown(payload)}.")
        return payload


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


# ----------------------------------------------------------------------------------------------------------------
# Handlers
# ----------------------------------------------------------------------------------------------------------------
class _Cancelled(Exception):
    """Raised inside the sampling loop when the request went away (the browser closed or the user stopped)."""


@torch.no_grad()
def preview_images(pipe: DallePipeline, tokens: torch.LongTensor, count: int) -> list[PIL.Image.Image]:
    """Decode the complete rows of the first `count` candidates; rows not sampled yet are gray.

    `vae.decode_code` needs a full grid, so the last complete row is repeated below and then painted over.
    """
    g = pipe.transformer.config.image_grid_size
    rows = tokens.shape[1] // g
    done = tokens[:count, : rows * g].view(-1, rows, g)  # (count, rows, g)
    grid = torch.cat([done, done[:, -1:].expand(-1, g - rows, -1)], dim=1)  # (count, g, g)
    images = pipe.decode_image_tokens(grid.reshape(grid.shape[0], -1))  # (count, 3, H, W)
    images[:, :, images.shape[2] * rows // g :] = PREVIEW_GRAY
    return pipe.postprocess(images, "pil")


def without_tracebacks(exc: BaseException) -> BaseException:
    """`exc` ready to outlive its thread: the traceback of `exc` and of the exceptions chained to it written into a
    note on `exc` (for the log) and dropped, their frames cleared.

    A traceback holds the frames it passed through, with their locals: the sampling loop's KV cache (two 54 MB
    buffers for the shipped model). An exception kept with its traceback (in the request's queue, or in the frame
    that re-raises it) closes a reference cycle that only a full garbage collection frees, and that rarely runs
    in this app: about 100 MB per cancelled request stayed until then (issue 22).
    """
    if exc.__traceback__ is not None:
        exc.add_note("Raised in the sampling thread:\n" + "".join(traceback.format_exception(exc)).rstrip())
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # frames still running (this thread's) are skipped
        e.__traceback__ = None
        pending += [e.__cause__, e.__context__]
    return exc


def stream_sampling(pipe: DallePipeline, call, preview_count: int):
    """Run `call(callback_on_step_end)` in a worker thread; yield partial images each time a row of tokens is
    complete (at most every PREVIEW_INTERVAL s); return the pipeline output.

    The worker runs in a copy of this context, so `gr.Progress(track_tqdm=True)` follows the pipeline's progress bar.
    """
    updates, cancelled = queue.Queue(), threading.Event()
    g = pipe.transformer.config.image_grid_size
    last_preview = [time.monotonic()]

    def callback(_pipe, _step, index, tensors):
        if cancelled.is_set():
            raise _Cancelled
        if (index + 1) % g == 0 and index + 1 < g * g and time.monotonic() - last_preview[0] > PREVIEW_INTERVAL:
            updates.put(("preview", preview_images(pipe, tensors["image_tokens"], preview_count)))
            last_preview[0] = time.monotonic()
        return tensors

    def work():
        try:
            updates.put(("done", call(callback)))
        except BaseException as e:
            without_tracebacks(e)  # (see there: a kept traceback keeps the request's KV cache)
            if not cancelled.is_set():  # handed to the request's thread, which reports it
                updates.put(("error", e))
        finally:
            if cancelled.is_set():  # the request's thread trimmed before this one let go of the KV cache
                release_memory()

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="dalle-hf-sampling",
                              daemon=True)
    worker.start()
    try:
        while True:
            kind, value = updates.get()
            if kind == "preview":
                yield value
            elif kind == "done":
                return value
            else:
                try:
                    raise value
                finally:
                    del value  # its new traceback holds this frame: no cycle through the frame's locals
    finally:
        cancelled.set()  # stops the worker if the request was cancelled mid-way


def with_metadata(images: list[PIL.Image.Image], info: dict, scores: list[float] | None = None) -> list:
    """Store `info` (and the rank and score) as a PNG text chunk, so a downloaded image says how it was made.

    `info` includes a request id: gradio caches outputs under their content hash and rewrites an existing file in
    place, so two identical requests at once would otherwise share (and truncate) each other's files.
    """
    for i, image in enumerate(images):
        extra = {} if scores is None else {"rank": i + 1, "score": round(scores[i], 4)}
        image.info["dalle-hf"] = json.dumps({**info, **extra})
    return images


def sample_with_previews(pipe, call, preview_count: int, label: str, seed: int, notes: list[str], running: str,
                         info: dict):
    """`stream_sampling` as (gallery, seed, status) outputs with "sampling…" captions; returns the pipeline output.
    The pipelines' errors become messages for the UI, and memory is released however the request ends."""
    sampling = stream_sampling(pipe, call, preview_count)
    try:
        while True:
            try:
                partial = next(sampling)
            except StopIteration as stop:
                return stop.value
            partial = with_metadata(partial, {"request": info["request"], "partial": True})
            yield [(image, "sampling…") for image in partial], seed, format_status(notes, running)
    except gr.Error:
        raise
    except ValueError as e:  # the pipelines' input checks
        raise gr.Error(html.escape(str(e), quote=False)) from None
    except Exception as e:
        logger.exception("%s failed", label)
        raise gr.Error(f"{label} failed ({type(e).__name__}: {html.escape(str(e), quote=False)}). The app is still "
                       "running; try fewer candidates.", title="Generation failed") from None
    finally:
        sampling.close()
        release_memory()


def format_status(notes: list[str], summary: str) -> str:
    return "\n".join([f"- {n}" for n in notes] + ([""] if notes else []) + [summary])


def ranked_gallery(out, label: str, info: dict) -> list[tuple[PIL.Image.Image, str]]:
    scores = None if out.clip_scores is None else out.clip_scores.flatten().tolist()
    images = with_metadata(out.images, info, scores)
    return [(image, f"#{i + 1}" + ("" if scores is None else f" · {label} {scores[i]:.2f}"))
            for i, image in enumerate(images)]


def request_info(task: str, model_name, prompt: str, seed: int, kwargs: dict, **extra) -> dict:
    return {"task": task, "model": model_name, "prompt": prompt, "seed": seed, **kwargs, **extra,
            "request": uuid.uuid4().hex[:12]}


def generate(models, model_name, prompt, candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
             randomize_seed, negative_prompt="", progress=gr.Progress(track_tqdm=True)):
    """Text -> the CLIP-best k of N candidates. Yields (gallery, seed used, status): partial rows, then the grid."""
    kwargs, seed, notes = check_settings(candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
                                         randomize_seed)
    progress(0, desc="Loading the model")
    pipe, _ = get_pipelines(models, model_name)
    prompt, prompt_notes = check_prompt(pipe, prompt)
    notes += prompt_notes
    negative_prompt, negative_notes = check_negative_prompt(pipe, negative_prompt, kwargs["guidance_scale"])
    notes += negative_notes
    if negative_prompt:
        kwargs["negative_prompt"] = negative_prompt
    for note in notes:
        gr.Warning(note.replace("**", ""))
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = f"Sampling {n} candidates (seed {seed})…"
    yield [], seed, format_status(notes, running)

    def call(callback):
        return pipe(prompt, generator=torch.Generator().manual_seed(seed), callback_on_step_end=callback, **kwargs)

    start = time.perf_counter()
    info = request_info("text-to-images", model_name or next(iter(models)), prompt, seed, kwargs)
    out = yield from sample_with_previews(pipe, call, k, "Text to images", seed, notes, running, info)
    ranked = "CLIP-ranked" if out.clip_scores is not None else "no CLIP model: the first"
    summary = f"**{n} candidates -> best {k}** ({ranked}) in {time.perf_counter() - start:.1f} s · seed {seed}"
    yield ranked_gallery(out, "CLIP", info), seed, format_status(notes, summary)


def vary(models, model_name, image, prompt, rows_to_keep, candidates, keep, temperature, top_k, top_p,
         guidance_scale, seed, randomize_seed, progress=gr.Progress(track_tqdm=True)):
    """Image -> variations: keep its top rows of dVAE codes, sample the rest, rank by CLIP similarity to it."""
    kwargs, seed, notes = check_settings(candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
                                         randomize_seed)
    progress(0, desc="Loading the model")
    _, pipe = get_pipelines(models, model_name)
    grid = pipe.transformer.config.image_grid_size
    rows_to_keep = check_number("Rows kept", rows_to_keep, 0, grid - 1, integer=True)
    image, image_notes = load_image(image, pipe.vae.config.image_size)
    prompt, prompt_notes = check_prompt(pipe, prompt)
    notes += image_notes + [n for n in prompt_notes if not n.startswith("Empty prompt")]
    for note in notes:
        gr.Warning(note)
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = f"Keeping {rows_to_keep} of {grid} rows, sampling {n} candidates (seed {seed})…"
    yield [], seed, format_status(notes, running)

    def call(callback):
        return pipe(image, prompt=prompt, num_rows_to_keep=rows_to_keep, callback_on_step_end=callback,
                    generator=torch.Generator().manual_seed(seed), **kwargs)

    start = time.perf_counter()
    info = request_info("variations", model_name or next(iter(models)), prompt, seed, kwargs,
                        num_rows_to_keep=rows_to_keep)
    out = yield from sample_with_previews(pipe, call, k, "Image variations", seed, notes, running, info)
    ranked = "ranked by CLIP similarity to the input" if out.clip_scores is not None else "no CLIP model"
    summary = (f"**{rows_to_keep}/{grid} rows kept, {n} candidates -> best {k}** ({ranked}) in "
               f"{time.perf_counter() - start:.1f} s · seed {seed}")
    yield ranked_gallery(out, "sim", info), seed, format_status(notes, summary)


def edit(models, model_name, editor, prompt, grow_mask, candidates, keep, temperature, top_k, top_p, guidance_scale,
         seed, randomize_seed, rank_by=DEFAULT_EDIT_RANKING, progress=gr.Progress(track_tqdm=True)):
    """Image + painted mask + prompt -> the best k of N repaintings, ranked by CLIP and the whole image's likelihood
    (or by either alone: `rank_by`); pixels outside the mask stay the input's."""
    kwargs, seed, notes = check_settings(candidates, keep, temperature, top_k, top_p, guidance_scale, seed,
                                         randomize_seed)
    if not isinstance(grow_mask, bool):
        raise gr.Error(f"Grow the mask must be true or false, got {shown(grow_mask)}.")
    if not isinstance(rank_by, str) or rank_by not in EDIT_RANKINGS:
        raise gr.Error(f"Rank by must be one of {', '.join(EDIT_RANKINGS)}, got {shown(rank_by)}.")
    progress(0, desc="Loading the model")
    pipe, _ = get_pipelines(models, model_name)
    inpaint = inpaint_pipeline(pipe)
    g = pipe.transformer.config.image_grid_size
    image, mask, n_cells, image_notes = load_edit(editor, pipe.vae.config.image_size, g, int(grow_mask))
    prompt, prompt_notes = check_prompt(pipe, prompt)
    notes += image_notes + prompt_notes
    for note in notes:
        gr.Warning(note.replace("**", ""))
    n, k = kwargs["num_images_per_prompt"], kwargs["num_images_to_keep"]
    running = f"Repainting {n_cells} of {g * g} cells, sampling {n} candidates (seed {seed})…"
    yield [], seed, format_status(notes, running)

    def call(callback):
        return inpaint(prompt, image=image, mask_image=mask, mask_dilation=int(grow_mask),
                       rerank=EDIT_RANKINGS[rank_by], callback_on_step_end=callback,
                       generator=torch.Generator().manual_seed(seed), **kwargs)

    start = time.perf_counter()
    info = request_info("edit", model_name or next(iter(models)), prompt, seed, kwargs, mask_dilation=int(grow_mask))
    out = yield from sample_with_previews(inpaint, call, k, "Edit", seed, notes, running, info)
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
    """The rows and guidance sliders and "how it works" follow the selected model's config (no weights are loaded)."""
    if name not in models:
        return gr.skip(), gr.skip(), gr.skip()
    info = read_model_info(models[name])
    g = info["grid"]
    rows = gr.Slider(maximum=g - 1, value=g // 2, label=f"Rows of image tokens kept (of {g})")
    return rows, gr.Slider(value=info["guidance_scale"]), how_it_works(info)


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


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------
def how_it_works(info: dict | None) -> str:
    numbers = ""
    if info:
        numbers = (
            f"\n\nThis model: {info['image_size']} px images as a {info['grid']}x{info['grid']} grid of "
            f"{info['image_vocab_size']} codes; a {info['n_layer']}-layer, {info['n_embd']}-wide transformer reading "
            f"{info['text_seq_len']} text tokens; {'a' if info['clip'] else 'no'} CLIP reranker."
        )
    return (
        "DALL-E ([Ramesh et al. 2021](https://arxiv.org/abs/2102.12092)) in three models:\n\n"
        "1. **dVAE**: a discrete VAE turns an image into a grid of codes (tokens) and back.\n"
        "2. **Transformer**: a decoder-only transformer reads the prompt's BPE tokens and samples image tokens one at "
        "a time, row by row (the partial images you see while it runs), with temperature, top-k / top-p and "
        "optional classifier-free guidance.\n"
        "3. **CLIP rerank**: the dVAE decodes all N candidates and CLIP keeps the k that match the prompt best "
        "(variations: the k closest to the input image).\n\n"
        "Variations keep the top rows of the input's codes and let the transformer complete the rest. Edits "
        "resample the code cells the painted mask touches (a kept cell is fed its own code), rank the candidates by "
        "CLIP and by the transformer's likelihood of the whole image, and paste the input back outside the mask."
        + numbers
    )


class CheckedBlocks(gr.Blocks):
    """`gr.Blocks` that answers every refused request with a message and logs it on one line.

    Before Gradio looks at a request's files, each input with a `check_payload` checks its JSON (an image input:
    only files the app received); what Gradio itself still refuses (a missing input, a malformed file object)
    becomes a message too, instead of `{"error": null}`. Refusals (`gr.Error`) log one line: the endpoint, the
    prompt (shortened, escaped) and the message; an unexpected error logs its traceback once and answers with a
    message that says so.
    """

    async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
        if len(inputs) < len(block_fn.inputs):
            names = ", ".join(setting_name(block) for block in block_fn.inputs)
            raise refusal(f"Expected {len(block_fn.inputs)} inputs ({names}), got {len(inputs)}.",
                          title="Missing inputs")
        for block, payload in zip(block_fn.inputs, inputs):
            if hasattr(block, "check_payload"):
                block.check_payload(payload)
        try:
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)
        except (InvalidPathError, pydantic.ValidationError) as e:
            raise refusal(f"A file of this request was refused ({type(e).__name__}): send files uploaded to this "
                          f"app, as {{\"path\": ..., \"meta\": {FILE_META}}}; {UPLOAD_HINT}.",
                          title="Not an uploaded file") from None

    async def process_api(self, block_fn, inputs, *args, **kwargs):
        try:
            return await super().process_api(block_fn, inputs, *args, **kwargs)
        except gr.Error as e:
            e.print_exception = False  # Gradio would print a traceback per refusal
            fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
            logger.warning("Refused %s (prompt %s): %s", fn.api_name or fn.name, logged(request_prompt(fn, inputs)),
                           " ".join(str(e.message).split()))
            raise
        except Exception as e:
            logger.exception("Unexpected error")
            raise refusal(f"The server failed on this request ({type(e).__name__}); it was logged. The app is still "
                          "running: try again.", title="Server error") from None


def request_prompt(fn, inputs: list):
    """The text of a request's first text input (its prompt), for the log; None if it has none."""
    return next((value for block, value in zip(fn.inputs, inputs) if isinstance(block, gr.Textbox)), None)


def build_demo(checkpoints: str | os.PathLike | None = None) -> gr.Blocks:
    """The app's Blocks for the models in `checkpoints` (see `checkpoints_root`). Loads no weights."""
    root = checkpoints_root(checkpoints)
    models = find_checkpoints(root)
    default = next(iter(models), None)
    info = read_model_info(models[default]) if models else None
    grid = info["grid"] if info else 8
    guidance_scale = info["guidance_scale"] if info else DEFAULTS["guidance_scale"]
    brush_px = max(2, ((info or {}).get("image_size") or 64) // EDIT_BRUSH_FRACTION)  # Gradio's "auto" fills 16 px
    worlds = {name: ModelWorld.read(path) for name, path in models.items()}  # small JSON files, read once
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
                                           info="CLIP alone ranked best on the shapes edit benchmark "
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
                candidates = CheckedSlider(1, MAX_CANDIDATES, value=DEFAULTS["candidates"], step=1,
                                           label="Candidates N")
                keep = CheckedSlider(1, MAX_KEEP, value=DEFAULTS["keep"], step=1, label="Images kept k")
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
        model.change(functools.partial(on_model_change, models), model, [rows, guidance, how], queue=False,
                     api_visibility="private")
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


# ----------------------------------------------------------------------------------------------------------------
# __main__
# ----------------------------------------------------------------------------------------------------------------
MAX_LOG_LINE = 300  # characters of a log message; the pipeline's truncation warning quotes a 1,000-character prompt


def short_lines(record: logging.LogRecord) -> bool:
    """A logging filter: a message (not a traceback) on one line of at most MAX_LOG_LINE characters, so that what a
    client sends cannot flood the server log."""
    message = " ".join(record.getMessage().split())
    if len(message) > MAX_LOG_LINE:
        message = message[: MAX_LOG_LINE - 1] + "…"
    record.msg, record.args = message, None
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The dalle-hf Gradio app.")
    parser.add_argument("--checkpoints", default=None,
                        help=f"Folder of models, or one model folder (default: ${CHECKPOINTS_ENV} or checkpoints/).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 to serve a network).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    parser.add_argument("--concurrency", type=int, default=2, help="Requests sampled at once (they share the CPU).")
    parser.add_argument("--max-queue", type=int, default=24, help="Requests waiting beyond that; more are refused.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per request (default: CPU cores // concurrency, at least 1).")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--concurrency, --max-queue and --threads must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    # What a user reads at start: our own lines (what loaded, from where, how fast) and Gradio's URL. Libraries log
    # at WARNING and up (httpx logs every request at INFO), and the per-file weight-loading bars are off.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(short_lines)
    logger.setLevel(logging.INFO)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    limit_malloc_arenas()
    # Concurrent requests each get their share of the cores: oversubscribed OpenMP threads spin against each
    # other (measured here: 16 candidates took 4.4 s with 1 thread, 117 s with 2 on 2 busy cores).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.concurrency))
    root = checkpoints_root(args.checkpoints)
    models = find_checkpoints(root)
    if not models:
        logger.warning(no_checkpoint_message(root) + " Starting anyway.")
    else:
        name = next(iter(models))
        logger.info("Models in %s: %s", root, ", ".join(models))
        try:
            start = time.perf_counter()
            pipe, _ = load_pipelines(models[name])  # warm: the first request does not wait for it
            config = pipe.transformer.config
            logger.info(
                "Loaded %s in %.1f s: transformer %d x %d, %d x %d image codes, CLIP reranking %s; %d torch thread(s)",
                name, time.perf_counter() - start, config.n_layer, config.n_embd, config.image_grid_size,
                config.image_grid_size, "on" if pipe.clip_model is not None else "off", torch.get_num_threads(),
            )
        except Exception:
            logger.exception("Loading %s failed; the app starts and reports it on each request", name)
    demo = build_demo(root)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE, theme=gr.themes.Soft(),
                css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
