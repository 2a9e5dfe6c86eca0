"""The selected model's world, from the `world.json` saved with it: its example prompts, the styles a prompt can
ask for (the style selector) and the words of its training captions (the unseen-word note). The app names no world.
"""

import dataclasses
import functools
import html
import logging
import os
import re
from pathlib import Path

import gradio as gr

from dalle_hf.app.inputs import MAX_PROMPT_CHARS, shown
from dalle_hf.data.world import caption_words, read_world_file

logger = logging.getLogger("dalle_hf.app")

# A model's example prompts, style selector and vocabulary come from the `world.json` it was shipped with. These are
# the examples of a model without one: made before checkpoints carried it, so trained on the shapes world.
EXAMPLES = ("a circle", "a square and a triangle", "three diamonds", "a red circle", "a circle left of a square",
            "a blue square and a yellow triangle")
NO_STYLE = "(any style)"  # the style selector's choice that leaves the style out of the prompt


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
    def read(cls, folder: str | os.PathLike, examples: tuple[str, ...] | None = None) -> "ModelWorld":
        """The `world.json` of a model folder; without one (or unreadable, logged), a world with `examples` (its
        family's, e.g. DALL·E mini's everyday prompts; else the shapes examples) and no vocabulary."""
        fallback = cls(examples=tuple(examples)) if examples else cls()
        try:
            world = read_world_file(str(folder))
            if world is None:
                return fallback
            styles = tuple(world.get("styles") or ())
            template = world.get("style_prompt") or cls.style_prompt
            if styles and ("{label}" not in template or "{style}" not in template):
                raise ValueError(f"style_prompt must contain {{label}} and {{style}}, got {template!r}")
            return cls(
                examples=tuple(world.get("examples") or fallback.examples),
                words=frozenset(world["words"]) if isinstance(world.get("words"), list) else None,
                styles=styles,
                style_aliases={s: tuple(world.get("style_aliases", {}).get(s, ())) for s in styles},
                style_prompt=template,
            )
        except (OSError, ValueError, TypeError, AttributeError) as e:  # the model itself may still load
            logger.warning("Ignoring the unreadable %s: %s", Path(folder) / "world.json", e)
            return fallback

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

