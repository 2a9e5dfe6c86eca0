"""Checked Gradio components and the Blocks that applies them: each input checks its own JSON (type, range, an
uploaded file) and answers with its name and what it expects, before Gradio or a handler use it; every refused
request gets a message and one log line.
"""

import html
import io
import logging

import gradio as gr
import PIL.Image
import pydantic
from gradio.exceptions import InvalidPathError

from dalle_hf.app.inputs import (
    FILE_META,
    MAX_CANDIDATES,
    UPLOAD_HINT,
    as_json,
    check_number,
    check_uploaded_file,
    logged,
    open_image,
    refusal,
    shown,
)

logger = logging.getLogger("dalle_hf.app")


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
# and range first and answer with the setting's name; the handlers check again for Python callers.
def setting_name(component: gr.components.Component) -> str:
    return (component.label or "The value").split(" (")[0]  # "Top-k (0 = off)" -> "Top-k"


class CheckedSlider(gr.Slider):
    """A `gr.Slider` whose input must be a number in its range: else a message with its name and range."""

    is_template = True  # drawn by the frontend's Slider component

    def preprocess(self, payload):
        check_number(setting_name(self), payload, self.minimum, self.maximum, integer=self.precision == 0)
        return super().preprocess(payload)


class CandidatesSlider(gr.Slider):
    """The candidates slider. Its maximum follows the selected model (`on_model_change`), but a request may name any
    model: the input is checked against MAX_CANDIDATES here, and against the maximum of the model the request names
    by the handler (`check_settings`), whose message names the model."""

    is_template = True  # drawn by the frontend's Slider component: a template names its direct base class

    def preprocess(self, payload):
        check_number(setting_name(self), payload, self.minimum, MAX_CANDIDATES, integer=self.precision == 0)
        return gr.Number.round_to_precision(payload, self.precision)


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
            fn = self.fns[block_fn] if isinstance(block_fn, int) else block_fn
            logger.exception("Failed %s (prompt %s)", fn.api_name or fn.name, logged(request_prompt(fn, inputs)))
            raise refusal(f"The server failed on this request ({type(e).__name__}); it was logged. The app is still "
                          "running: try again.", title="Server error") from None


def request_prompt(fn, inputs: list):
    """The text of a request's first text input (its prompt), for the log; None if it has none."""
    return next((value for block, value in zip(fn.inputs, inputs) if isinstance(block, gr.Textbox)), None)

