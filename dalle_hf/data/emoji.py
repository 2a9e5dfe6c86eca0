"""The emoji world: about 1,700 everyday concepts (Unicode emoji), drawn by professional artists in up to 11 styles.

A concept is a base emoji (no skin tones, flags, keycaps, regional-indicator letters or components), named by its
English CLDR label from `emojibase-data`. A style is one pinned package of emoji art from npm or Debian. Every image
is the artwork scaled to fit 64 x 64 (aspect kept, centred) on white, RGB. Some `(concept, style)` pairs are held
out (`is_held_out`): they never appear in training and exist only for the `novel` evaluation (a concept drawn in a
style it was never shown in).

The packages are fetched once (`npm pack`, `apt-get download`: no package script runs, no root needed) and rendered
once into a compressed cache (`build_emoji_cache`, or `dalle-hf data emoji --cache DIR`); training and evaluation read
the cache (`EmojiRenders`).

Example:

```python
>>> from dalle_hf.data.emoji import concept_key, is_held_out, style_prompt
>>> concept_key("1F441-FE0F-200D-1F5E8-FE0F"), concept_key("0023-fe0f-20e3")
('1f441-200d-1f5e8', '23-20e3')
>>> style_prompt("red apple", "twemoji"), is_held_out("1f34e", "twemoji")
('red apple in twemoji style', False)
>>> from dalle_hf.data.emoji import EmojiRenders
>>> dataset = EmojiRenders("/work/emoji-cache", split="train")  # doctest: +SKIP
>>> dataset[0]["pixel_values"].shape, dataset[0]["text"]  # doctest: +SKIP
(torch.Size([3, 64, 64]), 'grinning face in noto style')
```
"""

from __future__ import annotations

import glob
import hashlib
import io
import itertools
import json
import os
import random
import re
import shutil
import subprocess
import tarfile
import time
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from .world import RankingSet, World, random_square_crop, sample_false_captions

# ----------------------------------------------------------------------------------------------------
# The world's constants. The evaluation, the cache and the checkpoints depend on these values: do not change them.

IMAGE_SIZE = 64  # every render is 64 x 64 RGB, the shapes world's size (8x8 or 16x16 dVAE grids)
BACKGROUND = (255, 255, 255)  # artwork is composited on white, as in the shapes world
HELD_OUT_MODULUS = 20  # (key, style) is held out iff sha256("key|style") % 20 == 0: about 5% of the pairs
SKIN_TONES = range(0x1F3FB, 0x1F3FF + 1)  # Fitzpatrick modifiers: a variant of a concept, not a concept
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F1FF + 1)  # letters that pair into country flags
KEYCAP = 0x20E3  # combining enclosing keycap: "#", "*" and digits in a box
VARIATION_SELECTOR_16 = "fe0f"  # emoji presentation selector: the same concept with or without it
EXCLUDED_GROUPS = frozenset({"component", "flags"})  # emojibase groups that are not concepts (skin tones, flags)
FONT_RENDER_PX = 96  # glyphs are drawn this large, cropped to ink and resized down to IMAGE_SIZE (measured ~1-3 ms)
# A ZWJ sequence the font draws as one ligature advances like one glyph; unshaped, it advances like two or more.
LIGATURE_ADVANCE_RATIO = 1.25
NOTDEF_PROBE = "\U0010fffd"  # a private-use code point no font maps: it draws the font's .notdef glyph
CACHE_IMAGES = "emoji.npz"  # images (N, 64, 64, 3) uint8, keys, labels, styles, held_out
CACHE_METADATA = "emoji.json"  # concepts (label, tags, group, subgroup), packages, licenses and build counts

EMOJIBASE = ("emojibase-data", "17.0.0", "MIT")  # labels, tags, groups and subgroups (Unicode CLDR)


@dataclass(frozen=True)
class StyleSource:
    """Where one style's art comes from and how it is rasterized.

    `kind` is `"png"` (composite on white), `"webp"` (composite, LANCZOS resize), `"iconify"` (an Iconify JSON set
    of SVG bodies rendered with resvg) or `"font"` (Pillow text, black on white, cropped to ink). `path` is the
    images folder, the `icons.json` or the font files' folder inside the unpacked package.
    """

    style: str
    registry: str  # "npm" or "debian"
    package: str
    version: str
    license: str
    kind: str
    path: str


# The 11 styles, in docs/emoji-world.md's table's order; the names are exact strings the prompts and the evaluation
# use.
STYLE_SOURCES: tuple[StyleSource, ...] = (
    StyleSource("noto", "npm", "emoji-datasource-google", "16.0.0", "Apache-2.0", "png", "img/google/64"),
    StyleSource("noto blob", "npm", "@iconify-json/noto-v1", "1.2.5", "Apache-2.0", "iconify", "icons.json"),
    StyleSource("noto mono", "npm", "@fontsource/noto-emoji", "5.3.2", "OFL-1.1", "font", "files"),
    StyleSource("twemoji", "npm", "emoji-datasource-twitter", "16.0.0", "CC-BY-4.0", "png", "img/twitter/64"),
    StyleSource("fluent 3d", "npm", "@lobehub/fluent-emoji-3d", "1.1.0", "MIT", "webp", "assets"),
    StyleSource("fluent flat", "npm", "@iconify-json/fluent-emoji-flat", "1.2.6", "MIT", "iconify", "icons.json"),
    StyleSource("fluent high contrast", "npm", "@iconify-json/fluent-emoji-high-contrast", "1.2.6", "MIT", "iconify",
                "icons.json"),  # fmt: skip
    StyleSource("emojione", "npm", "@iconify-json/emojione", "1.2.3", "CC-BY-4.0", "iconify", "icons.json"),
    StyleSource("fxemoji", "npm", "@iconify-json/fxemoji", "1.2.2", "Apache-2.0", "iconify", "icons.json"),
    StyleSource("streamline", "npm", "@iconify-json/streamline-emojis", "1.2.4", "CC-BY-4.0", "iconify", "icons.json"),
    StyleSource("symbola", "debian", "fonts-symbola", "2.60-1.1", "free for any use", "font",
                "usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf"),  # fmt: skip
)
STYLES: tuple[str, ...] = tuple(source.style for source in STYLE_SOURCES)
NOTO_MONO_WEIGHT = 400  # the regular weight of the Noto Emoji font's five

# ----------------------------------------------------------------------------------------------------
# Concepts: keys, labels, the held-out rule, prompts.


def concept_key(hexcode: str) -> str:
    """A code-point sequence -> its concept key: lowercase hex without leading zeros joined by `-`, `fe0f` removed.

    Accepts emojibase hexcodes (`"1F441-FE0F-200D-1F5E8"`) and file names' stems (`"0023-fe0f-20e3"`, also with `_`).
    """
    parts = [part for part in re.split(r"[-_ ]", hexcode.strip().lower()) if part]
    if not parts or not all(re.fullmatch(r"[0-9a-f]{1,6}", part) for part in parts):
        raise ValueError(f"expected hex code points joined by '-', like '1f468-200d-1f469', got {hexcode!r}")
    return "-".join(format(int(part, 16), "x") for part in parts if int(part, 16) != int(VARIATION_SELECTOR_16, 16))


def code_points(key: str) -> list[int]:
    """`"1f468-200d-1f469"` -> `[0x1F468, 0x200D, 0x1F469]`."""
    return [int(part, 16) for part in concept_key(key).split("-")]


def is_held_out(key: str, style: str) -> bool:
    """Whether `(key, style)` is a held-out pair: never in training, only in the `novel` evaluation (composition)."""
    return int(hashlib.sha256(f"{key}|{style}".encode()).hexdigest(), 16) % HELD_OUT_MODULUS == 0


def style_prompt(label: str, style: str) -> str:
    """The evaluation's styled prompt: `"red apple in twemoji style"`."""
    return f"{label} in {style} style"


def plain_prompt(label: str) -> str:
    """The evaluation's plain prompt: the label alone, `"red apple"`."""
    return label


def check_styles(styles: Iterable[str] | None) -> tuple[str, ...]:
    """`None` -> all 11 styles; otherwise the given names, each one of `STYLES`, in the table's order."""
    if styles is None:
        return STYLES
    styles = list(styles)
    unknown = [style for style in styles if style not in STYLES]
    if unknown or not styles:
        raise ValueError(f"expected style names among {', '.join(map(repr, STYLES))}, got {unknown or styles!r}")
    return tuple(style for style in STYLES if style in styles)


@dataclass(frozen=True)
class EmojiConcept:
    """One concept: its key, the emoji as text, the lowercased label, emojibase's tags, group and subgroup, and the
    Unicode character name (empty for sequences; some Iconify sets name icons by it)."""

    key: str
    emoji: str
    label: str
    tags: tuple[str, ...]
    group: str
    subgroup: str
    unicode_name: str = ""


def is_concept(key: str, group: str | None, subgroup: str | None) -> bool:
    """The issue's rule: base forms only; no skin tones anywhere, no flags, keycaps, regional indicators, components."""
    points = code_points(key)
    if any(p in SKIN_TONES or p in REGIONAL_INDICATORS or p == KEYCAP for p in points):
        return False
    return group is not None and group not in EXCLUDED_GROUPS and subgroup != "keycap"


def read_emojibase(package_dir: str) -> tuple[dict[str, EmojiConcept], set[str]]:
    """emojibase-data's English `data.json` -> (concepts by key in emojibase's order, every key it labels at all).

    The second set includes skin-tone variants, flags and components: a package file whose key is not in it is a
    sequence with no emojibase label (dropped and counted), one that is in it but not a concept is excluded by rule.
    """
    with open(os.path.join(package_dir, "en", "data.json"), encoding="utf-8") as f:
        entries = json.load(f)
    with open(os.path.join(package_dir, "en", "messages.json"), encoding="utf-8") as f:
        messages = json.load(f)
    names_path = os.path.join(package_dir, "meta", "unicode-names.json")
    unicode_names = {}
    if os.path.isfile(names_path):
        with open(names_path, encoding="utf-8") as f:
            unicode_names = {concept_key(hexcode): name for hexcode, name in json.load(f).items()}
    groups = {group["order"]: group["key"] for group in messages["groups"]}
    subgroups = {subgroup["order"]: subgroup["key"] for subgroup in messages["subgroups"]}
    concepts: dict[str, EmojiConcept] = {}
    labelled: set[str] = set()
    # emojibase's `order` (CLDR's, which keeps related concepts together), not data.json's hexcode order: the concept
    # that keeps a duplicate image is the first in CLDR's order (Noto: "family: man, man, boy" before "family")
    for entry in sorted(entries, key=lambda entry: entry.get("order", float("inf"))):
        for variant in [entry, *entry.get("skins", [])]:
            labelled.add(concept_key(variant["hexcode"]))
        key = concept_key(entry["hexcode"])
        group, subgroup = groups.get(entry.get("group")), subgroups.get(entry.get("subgroup"))
        if key in concepts or not is_concept(key, group, subgroup):
            continue
        concepts[key] = EmojiConcept(key, entry["emoji"], entry["label"].lower(), tuple(entry.get("tags", ())), group,
                                     subgroup, unicode_names.get(key, "").lower())  # fmt: skip
    return concepts, labelled


def kebab_name(label: str) -> str:
    """A CLDR label -> the Iconify icon name sets use: `"man: red hair"` -> `"man-red-hair"`, accents dropped."""
    ascii_label = unicodedata.normalize("NFKD", label).encode("ascii", "ignore").decode().lower()
    return re.sub(r"[^a-z0-9]+", "-", ascii_label).strip("-")


def icon_names(concept: EmojiConcept) -> list[str]:
    """Names an Iconify set may give the concept's icon when its `chars.json` does not map it, most specific first:
    the squashed Unicode name (fxemoji: `"alarmclock"`, `"aubergine"`), the kebab-case CLDR label (`"red-apple"`),
    the squashed label.

    fxemoji names a whole animal `"catside"` and its face `"cat"` (U+1F408 CAT and U+1F431 CAT FACE), so the
    Unicode name + `"side"` comes first: without it the cat would be drawn as a face.
    """
    squashed = kebab_name(concept.unicode_name).replace("-", "")
    names = [squashed + "side", squashed] if concept.unicode_name else []
    names += [kebab_name(concept.label), kebab_name(concept.label).replace("-", "")]
    return [name for name in dict.fromkeys(names) if name]


# ----------------------------------------------------------------------------------------------------
# Fetching the pinned packages (npm pack and apt-get download run no package script and need no root).


def npm_package_dir(download_dir: str, name: str, version: str) -> str:
    """The unpacked `package/` folder of `name@version` in `download_dir`; runs `npm pack` only when missing."""
    stem = f"{name.lstrip('@').replace('/', '-')}-{version}"
    unpacked = os.path.join(download_dir, stem)
    package = os.path.join(unpacked, "package")
    if os.path.isdir(package):
        return package
    tarball = os.path.join(download_dir, f"{stem}.tgz")
    if not os.path.isfile(tarball):
        if shutil.which("npm") is None:
            raise ValueError(f"expected npm on PATH to fetch {name}@{version} (or {tarball} already downloaded)")
        os.makedirs(download_dir, exist_ok=True)
        subprocess.run(["npm", "pack", "--silent", f"{name}@{version}", "--pack-destination", download_dir],
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    with tarfile.open(tarball) as archive:
        archive.extractall(unpacked + ".partial", filter="data")
    os.replace(unpacked + ".partial", unpacked)  # a half-unpacked folder never looks complete
    return package


def debian_package_dir(download_dir: str, name: str, version: str, inner_path: str) -> str:
    """The root of Debian package `name` unpacked in `download_dir` (`apt-get download` + `dpkg-deb -x`).

    An installed copy (`inner_path` under `/`) is used as is. `version` is the one recorded in the cache's metadata;
    `apt-get download` fetches the release's current one, which is checked against it.
    """
    unpacked = os.path.join(download_dir, name)
    if os.path.exists(os.path.join(unpacked, inner_path)):
        return unpacked
    if os.path.exists(os.path.join("/", inner_path)):
        return "/"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise ValueError(f"expected apt-get and dpkg-deb to fetch Debian {name} (or it installed: {inner_path})")
    os.makedirs(download_dir, exist_ok=True)
    subprocess.run(["apt-get", "download", name], cwd=download_dir, check=True, stdout=subprocess.DEVNULL)
    debs = sorted(glob.glob(os.path.join(download_dir, f"{name}_*.deb")))
    if not any(f"_{version}_" in deb for deb in debs):
        raise ValueError(f"expected Debian {name} {version}, apt-get downloaded {[os.path.basename(d) for d in debs]}")
    subprocess.run(["dpkg-deb", "-x", next(d for d in debs if f"_{version}_" in d), unpacked + ".partial"], check=True)
    os.replace(unpacked + ".partial", unpacked)
    return unpacked


def fetch_style(source: StyleSource, download_dir: str) -> str:
    """The path (folder, icons.json or font) holding `source`'s art, downloading the package if needed."""
    if source.registry == "npm":
        return os.path.join(npm_package_dir(download_dir, source.package, source.version), source.path)
    return os.path.join(debian_package_dir(download_dir, source.package, source.version, source.path), source.path)


# ----------------------------------------------------------------------------------------------------
# Rendering: every image ends as (64, 64, 3) uint8, the artwork fit and centred on white.


def fit_on_white(image: Image.Image, size: int = IMAGE_SIZE) -> np.ndarray:
    """Any PIL image -> `(size, size, 3)` uint8: scaled to fit (aspect kept, LANCZOS), centred, composited on white."""
    image = image.convert("RGBA")
    scale = size / max(image.size)
    if scale != 1:
        width, height = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        image = image.resize((width, height), Image.LANCZOS)  # Pillow resizes RGBA with premultiplied alpha
    canvas = Image.new("RGBA", (size, size), BACKGROUND + (255,))
    canvas.alpha_composite(image, ((size - image.width) // 2, (size - image.height) // 2))
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def render_file(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """A PNG or WebP file -> `(size, size, 3)` uint8 on white."""
    with Image.open(path) as image:
        return fit_on_white(image, size)


def iconify_svg(icon_set: dict, name: str) -> str:
    """One icon of an Iconify JSON set as a standalone SVG string.

    Resolves `aliases` (a chain of `parent`s, each adding `hFlip`, `vFlip` and quarter turns `rotate`); `left`,
    `top`, `width` and `height` default from the icon, then the set, then Iconify's 0, 0, 16, 16.
    """
    h_flip, v_flip, rotate, overrides = False, False, 0, {}
    seen = set()
    while name in icon_set.get("aliases", {}) and name not in seen:
        seen.add(name)
        alias = icon_set["aliases"][name]
        h_flip ^= bool(alias.get("hFlip", False))
        v_flip ^= bool(alias.get("vFlip", False))
        rotate += int(alias.get("rotate", 0))
        overrides = {k: alias[k] for k in ("left", "top", "width", "height") if k in alias} | overrides
        name = alias["parent"]
    if name not in icon_set.get("icons", {}):
        raise ValueError(f"expected an icon or alias named {name!r} in the Iconify set {icon_set.get('prefix')!r}")
    icon = icon_set["icons"][name]
    box = {k: icon_set.get(k, default) for k, default in (("left", 0), ("top", 0), ("width", 16), ("height", 16))}
    box |= {k: icon[k] for k in box if k in icon} | overrides
    left, top, width, height = box["left"], box["top"], box["width"], box["height"]
    h_flip ^= bool(icon.get("hFlip", False))
    v_flip ^= bool(icon.get("vFlip", False))
    rotate = (rotate + int(icon.get("rotate", 0))) % 4
    transforms = []
    if h_flip or v_flip:  # mirror about the view box's centre
        transforms.append(f"translate({(2 * left + width) if h_flip else 0} {(2 * top + height) if v_flip else 0}) "
                          f"scale({-1 if h_flip else 1} {-1 if v_flip else 1})")  # fmt: skip
    if rotate:  # quarter turns about the centre; an odd number swaps the box's sides
        transforms.insert(0, f"rotate({90 * rotate} {left + width / 2} {top + height / 2})")
        if rotate % 2:
            cx, cy = left + width / 2, top + height / 2
            width, height = height, width
            left, top = cx - width / 2, cy - height / 2
    body = icon["body"]
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    scale = IMAGE_SIZE / max(width, height)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{width * scale:g}" height="{height * scale:g}" viewBox="{left:g} {top:g} {width:g} {height:g}">'
            f"{body}</svg>")  # fmt: skip


def render_svg(svg: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """An SVG string -> `(size, size, 3)` uint8 on white, rasterized by resvg (rendering larger looks no different)."""
    import resvg_py  # the optional `data` extra: only building the cache needs it

    png = resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True)
    with Image.open(io.BytesIO(bytes(png))) as image:
        return fit_on_white(image, size)


def render_glyph(font: ImageFont.FreeTypeFont, text: str, size: int = IMAGE_SIZE) -> np.ndarray | None:
    """Text -> `(size, size, 3)` uint8, black on white, cropped to ink, padded square, resized; None if blank."""
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 2, bottom - top + 2), 255)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), text, font=font, fill=0)
    ink = Image.eval(canvas, lambda value: 255 - value).getbbox()
    if ink is None:
        return None
    glyph = canvas.crop(ink)
    side = max(glyph.size)
    square = Image.new("L", (side, side), 255)
    square.paste(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    return np.asarray(square.resize((size, size), Image.LANCZOS).convert("RGB"), dtype=np.uint8)


def font_draws(font: ImageFont.FreeTypeFont, text: str) -> bool:
    """Whether `font` has a glyph for `text`: not .notdef, and a ZWJ sequence shaped into one ligature."""
    first, notdef = text[0], bytes(font.getmask(NOTDEF_PROBE))
    if bytes(font.getmask(first)) == notdef:
        return False
    if len(text) == 1:
        return True
    if bytes(font.getmask(text)) == notdef:
        return False
    return font.getlength(text) <= LIGATURE_ADVANCE_RATIO * font.getlength(first)


# ----------------------------------------------------------------------------------------------------
# Per-style sources: each yields (key, image) for the concepts its package draws and counts what it drops.


def file_index(folder: str, extension: str) -> dict[str, str]:
    """Image files named by code points (`1f441-fe0f-200d-1f5e8-fe0f.png`) -> {key: path}; the first name wins."""
    index: dict[str, str] = {}
    for path in sorted(glob.glob(os.path.join(folder, f"*.{extension}"))):
        stem = os.path.basename(path)[: -len(extension) - 1]
        try:
            index.setdefault(concept_key(stem), path)
        except ValueError:
            continue  # not named by code points (sheets, READMEs)
    return index


def parse_unicode_ranges(ranges: str) -> list[tuple[int, int]]:
    """A CSS unicode-range (`"U+23,U+30-39,U+1f3f3-1f3f4"`) -> [(first, last), ...]."""
    out = []
    for part in ranges.split(","):
        match = re.fullmatch(r"\s*U\+([0-9a-fA-F]+)(?:-([0-9a-fA-F]+))?\s*", part)
        if match is None:
            raise ValueError(f"expected a CSS unicode-range like 'U+1f300-1f5ff', got {part!r}")
        out.append((int(match[1], 16), int(match[2] or match[1], 16)))
    return out


def noto_mono_fonts(files_dir: str) -> list[tuple[list[tuple[int, int]], str]]:
    """@fontsource/noto-emoji's subsets: [(unicode ranges, .woff path)] for the regular weight."""
    with open(os.path.join(os.path.dirname(files_dir), "unicode.json"), encoding="utf-8") as f:
        subsets = json.load(f)  # {"[0]": "U+1f1e6-1f1ff", ...}
    fonts = []
    for subset, ranges in subsets.items():
        path = os.path.join(files_dir, f"noto-emoji-{subset.strip('[]')}-{NOTO_MONO_WEIGHT}-normal.woff")
        if os.path.isfile(path):
            fonts.append((parse_unicode_ranges(ranges), path))
    if not fonts:
        raise ValueError(f"expected noto-emoji-*-{NOTO_MONO_WEIGHT}-normal.woff files in {files_dir!r}")
    return fonts


@dataclass
class StyleRenders:
    """One style's renders in concept order, with what was dropped: duplicates (same image) and unlabeled files."""

    keys: list[str]
    images: list[np.ndarray]
    duplicates: int = 0
    unlabeled: int = 0
    failed: int = 0


def style_images(
    source: StyleSource, art_path: str, concepts: dict[str, EmojiConcept], labelled: set[str]
) -> Iterator[tuple[str, np.ndarray | None] | tuple[None, str]]:
    """Yields `(key, image)` for every concept the style draws (image None if it failed to render), in concept order,
    and `(None, reason)` once per file dropped for having no emojibase label."""
    if source.kind in ("png", "webp"):
        index = file_index(art_path, source.kind)
        for key in index:
            if key not in labelled:
                yield None, "unlabeled"
        for key in concepts:
            if key in index:
                yield key, render_file(index[key])
    elif source.kind == "iconify":
        with open(art_path, encoding="utf-8") as f:
            icon_set = json.load(f)
        chars_path = os.path.join(os.path.dirname(art_path), "chars.json")
        chars = {}
        if os.path.isfile(chars_path):
            with open(chars_path, encoding="utf-8") as f:
                chars = {concept_key(hexcode): name for hexcode, name in json.load(f).items()}
        for key, name in chars.items():
            if key not in labelled:
                yield None, "unlabeled"
        names = set(icon_set.get("icons", {})) | set(icon_set.get("aliases", {}))
        for key, concept in concepts.items():
            # chars.json where the set has it, else a name (the first that the set has)
            name = chars.get(key) or next((n for n in icon_names(concept) if n in names), None)
            if name is not None:
                try:
                    yield key, render_svg(iconify_svg(icon_set, name))
                except ValueError:
                    yield key, None
    elif source.kind == "font":
        yield from font_images(source, art_path, concepts)
    else:
        raise ValueError(f"expected a style kind among png, webp, iconify, font; got {source.kind!r}")


def font_images(source: StyleSource, art_path: str, concepts: dict[str, EmojiConcept]):
    """Glyph renders: Noto Emoji (a .woff per unicode-range subset, ZWJ ligatures shaped) or Symbola (one font,
    single code points only: it has no emoji sequences)."""
    if os.path.isdir(art_path):
        fonts = [(ranges, ImageFont.truetype(path, FONT_RENDER_PX)) for ranges, path in noto_mono_fonts(art_path)]
    else:
        fonts = [([(0, 0x10FFFF)], ImageFont.truetype(art_path, FONT_RENDER_PX))]
    for key, concept in concepts.items():
        points = code_points(key)
        if len(fonts) == 1 and len(points) > 1:
            continue
        text = concept.emoji if len(fonts) > 1 else chr(points[0])
        for ranges, font in fonts:
            covered = all(any(a <= ord(c) <= b for a, b in ranges) for c in text)
            if covered and font_draws(font, text):
                image = render_glyph(font, text)
                if image is not None:
                    yield key, image
                break


def render_style(
    source: StyleSource, art_path: str, concepts: dict[str, EmojiConcept], labelled: set[str]
) -> StyleRenders:
    """All of one style's renders, deduplicated by image hash (the first concept in emojibase order keeps it)."""
    renders = StyleRenders([], [])
    seen: set[bytes] = set()
    for key, image in style_images(source, art_path, concepts, labelled):
        if key is None:
            renders.unlabeled += 1
        elif image is None:
            renders.failed += 1
        elif (digest := hashlib.sha256(image.tobytes()).digest()) in seen:
            renders.duplicates += 1
        else:
            seen.add(digest)
            renders.keys.append(key)
            renders.images.append(image)
    return renders


# ----------------------------------------------------------------------------------------------------
# The cache.


def build_emoji_cache(
    cache_dir: str, download_dir: str | None = None, styles: Iterable[str] | None = None, log=print
) -> dict:
    r"""
    Fetch the pinned packages, render every (concept, style) once, and write the compressed cache.

    Args:
        cache_dir (`str`):
            Folder for `emoji.npz` (images, keys, labels, styles, held_out) and `emoji.json` (concepts, packages,
            licenses, counts).
        download_dir (`str`, *optional*, defaults to `cache_dir/downloads`):
            Folder for the npm tarballs and the Debian package; packages already unpacked there are not fetched.
        styles (`Iterable[str]`, *optional*, defaults to all of `STYLES`):
            The styles to render.
        log (`Callable[[str], None]`, *optional*, defaults to `print`):
            Progress lines (one per style).

    Returns:
        `dict`: the summary written into `emoji.json["summary"]`.
    """
    styles = check_styles(styles)
    download_dir = download_dir or os.path.join(cache_dir, "downloads")
    start = time.perf_counter()
    concepts, labelled = read_emojibase(npm_package_dir(download_dir, *EMOJIBASE[:2]))
    sources = {source.style: source for source in STYLE_SOURCES}
    images, keys, style_names, per_style = [], [], [], {}
    for style in styles:
        style_start = time.perf_counter()
        renders = render_style(sources[style], fetch_style(sources[style], download_dir), concepts, labelled)
        images += renders.images
        keys += renders.keys
        style_names += [style] * len(renders.keys)
        per_style[style] = {
            "images": len(renders.keys),
            "held_out": sum(is_held_out(key, style) for key in renders.keys),
            "duplicates_dropped": renders.duplicates,
            "unlabeled_dropped": renders.unlabeled,
            "render_failures": renders.failed,
            "seconds": round(time.perf_counter() - style_start, 1),
        }
        log(f"{style}: {per_style[style]}")
    held_out = np.array([is_held_out(k, s) for k, s in zip(keys, style_names)], dtype=bool)
    os.makedirs(cache_dir, exist_ok=True)
    images_path = os.path.join(cache_dir, CACHE_IMAGES)
    np.savez_compressed(
        images_path + ".partial.npz",
        images=np.stack(images) if images else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),  # (N, 64, 64, 3)
        keys=np.array(keys, dtype=str),
        labels=np.array([concepts[k].label for k in keys], dtype=str),
        styles=np.array(style_names, dtype=str),
        held_out=held_out,
    )
    os.replace(images_path + ".partial.npz", images_path)
    styles_per_concept = list(Counter(keys).values())
    summary = {
        "concepts": len(set(keys)),
        "concepts_in_emojibase": len(concepts),
        "images": len(keys),
        "held_out_pairs": int(held_out.sum()),
        "median_styles_per_concept": float(np.median(styles_per_concept)) if styles_per_concept else 0.0,
        "cache_mb": round(os.path.getsize(images_path) / 2**20, 2),
        "seconds": round(time.perf_counter() - start, 1),
        "per_style": per_style,
    }
    used = {k: asdict(concepts[k]) for k in dict.fromkeys(keys)}
    metadata = {
        "concepts": {k: {field: v for field, v in c.items() if field != "key"} for k, c in used.items()},
        "packages": {s.style: {"registry": s.registry, "package": s.package, "version": s.version,
                               "license": s.license} for s in STYLE_SOURCES if s.style in styles},  # fmt: skip
        "captions": {"package": EMOJIBASE[0], "version": EMOJIBASE[1], "license": EMOJIBASE[2]},
        "held_out_rule": f"int(sha256(f'{{key}}|{{style}}').hexdigest(), 16) % {HELD_OUT_MODULUS} == 0",
        "summary": summary,
    }
    with open(os.path.join(cache_dir, CACHE_METADATA), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=1, ensure_ascii=False)
    return summary


@dataclass
class EmojiCache:
    """The cache in memory: `images` (N, 64, 64, 3) uint8 and per-image `keys`, `labels`, `styles`, `held_out`;
    `concepts` maps a key to its label, emoji, tags, group and subgroup; `packages` names each style's source."""

    images: np.ndarray
    keys: np.ndarray
    labels: np.ndarray
    styles: np.ndarray
    held_out: np.ndarray
    concepts: dict
    packages: dict
    summary: dict


def read_emoji_cache(cache_dir: str) -> EmojiCache:
    """Load the cache `build_emoji_cache` wrote."""
    images_path, metadata_path = os.path.join(cache_dir, CACHE_IMAGES), os.path.join(cache_dir, CACHE_METADATA)
    if not (os.path.isfile(images_path) and os.path.isfile(metadata_path)):
        raise ValueError(f"expected {CACHE_IMAGES} and {CACHE_METADATA} in {cache_dir!r}: build it with "
                         f"`dalle-hf data emoji --cache {cache_dir}`")  # fmt: skip
    with np.load(images_path) as data:
        arrays = {name: data[name] for name in ("images", "keys", "labels", "styles", "held_out")}
    with open(metadata_path, encoding="utf-8") as f:
        metadata = json.load(f)
    return EmojiCache(**arrays, concepts=metadata["concepts"], packages=metadata["packages"],
                      summary=metadata["summary"])  # fmt: skip


SPLITS = ("train", "novel", "all")  # train: never a held-out pair; novel: only held-out pairs


class EmojiRenders(Dataset):
    r"""
    The emoji world's renders as a map-style dataset, read from the cache.

    Args:
        cache_dir (`str`):
            A folder written by `build_emoji_cache` (`dalle-hf data emoji --cache DIR`).
        split (`str`, *optional*, defaults to `"train"`):
            `"train"`: every pair that is not held out; `"novel"`: the held-out pairs only; `"all"`: both.
        styles (`Iterable[str]`, *optional*, defaults to every style in the cache):
            Keep only these styles.

    Each item is `{"pixel_values": FloatTensor (3, 64, 64) in [0, 1], "text": "{label} in {style} style", "key",
    "label", "style"}`.

    Example:

    ```python
    >>> from dalle_hf.data.emoji import EmojiRenders
    >>> dataset = EmojiRenders("/work/emoji-cache", split="novel", styles=["twemoji"])  # doctest: +SKIP
    >>> dataset[0]["text"]  # doctest: +SKIP
    'grinning face with smiling eyes in twemoji style'
    ```
    """

    def __init__(self, cache_dir: str | EmojiCache, split: str = "train", styles: Iterable[str] | None = None):
        if split not in SPLITS:
            raise ValueError(f"expected `split` among {SPLITS}, got {split!r}")
        self.cache = cache_dir if isinstance(cache_dir, EmojiCache) else read_emoji_cache(cache_dir)
        held_out = self.cache.held_out
        keep = {"train": ~held_out, "novel": held_out.copy(), "all": np.ones_like(held_out)}[split]
        if styles is not None:
            keep &= np.isin(self.cache.styles, check_styles(styles))
        self.indices = np.flatnonzero(keep)
        self.split = split

    @classmethod
    def from_cache(cls, cache: EmojiCache, split: str = "train", styles: Iterable[str] | None = None) -> "EmojiRenders":
        """The same view of a cache already in memory (no second read)."""
        return cls(cache, split, styles)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        i = self.indices[index]
        image = torch.from_numpy(self.cache.images[i].copy()).permute(2, 0, 1).float() / 255.0  # (H, W, 3) -> (3, H, W)
        label, style = str(self.cache.labels[i]), str(self.cache.styles[i])
        return {"pixel_values": image, "text": style_prompt(label, style), "key": str(self.cache.keys[i]),
                "label": label, "style": style}  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The world interface (`dalle_hf.data.world`): captions, CLIP's hard negatives, the ranking set.

# Other names for each style that training captions use now and then (paraphrases such as "3d" or "black and
# white"), so that a user's own words reach the style; the evaluation uses the exact names only.
STYLE_ALIASES: dict[str, tuple[str, ...]] = {
    "noto": ("google",),
    "noto blob": ("blob", "android blob"),
    "noto mono": ("black and white", "monochrome"),
    "twemoji": ("twitter",),
    "fluent 3d": ("3d",),
    "fluent flat": ("flat", "microsoft"),
    "fluent high contrast": ("high contrast",),
    "emojione": ("emoji one",),
    "fxemoji": ("firefox",),
    "streamline": ("cartoon",),
    "symbola": ("outline", "line drawing"),
}
# The training caption mix: most captions are the evaluation's styled form; plain labels teach the style-free prompt
# (the model picks a style), aliases tie everyday words to the styles. Recorded in every card of an emoji run.
CAPTION_MIX: dict[str, float] = {"styled": 0.70, "plain": 0.15, "alias": 0.15}


def training_caption(label: str, style: str, rng: random.Random) -> str:
    """One training caption for a render of `label` in `style`, drawn from `CAPTION_MIX`."""
    form = rng.choices(list(CAPTION_MIX), list(CAPTION_MIX.values()))[0]
    if form == "plain":
        return plain_prompt(label)
    if form == "alias":
        return style_prompt(label, rng.choice(STYLE_ALIASES[style]))
    return style_prompt(label, style)


def caption_choices(label: str, style: str) -> list[tuple[str, float]]:
    """
    The distribution `training_caption` draws from, as `(caption, probability)` pairs summing to 1: the styled caption,
    the plain label and each alias of the style (the alias share split evenly). A trainer that draws captions on an
    accelerator (`benchmarks/gpu_train_emoji.py`) tokenizes these once instead of drawing strings per step.
    """
    aliases = STYLE_ALIASES[style]
    return [(style_prompt(label, style), CAPTION_MIX["styled"]), (plain_prompt(label), CAPTION_MIX["plain"]),
            *((style_prompt(label, a), CAPTION_MIX["alias"] / len(aliases)) for a in aliases)]  # fmt: skip


def true_captions(label: str, style: str) -> set[str]:
    """Every caption of the world that is true of a render of `label` in `style`."""
    return {plain_prompt(label), style_prompt(label, style), *(style_prompt(label, a) for a in STYLE_ALIASES[style])}


class EmojiTraining(Dataset):
    """
    Training renders (never a held-out pair) with a caption drawn from `CAPTION_MIX` at each access and, for CLIP,
    `num_negatives` hard negatives: the same concept in other styles, and other concepts of the same emojibase
    subgroup in the same style (the nearest confusions of concept and of style), in the caption's own form.

    Items: `{"pixel_values": (3, H, W) in [0, 1], "text", "negatives": list[str], "key", "label", "style"}`.
    """

    def __init__(self, world: "EmojiWorld", image_size: int, seed: int, num_negatives: int = 0):
        self.world, self.image_size, self.num_negatives = world, image_size, num_negatives
        self.renders = EmojiRenders.from_cache(world.cache, split="train")
        self.rng = random.Random(f"emoji-train/{seed}")

    def __len__(self) -> int:
        return len(self.renders)

    def text(self, index: int) -> str:
        """A fresh training caption of item `index` (what `__getitem__` would draw), without touching its pixels."""
        i = self.renders.indices[index]
        return training_caption(str(self.renders.cache.labels[i]), str(self.renders.cache.styles[i]), self.rng)

    def caption_choices(self, index: int) -> list[tuple[str, float]]:
        """Every caption `text(index)` can draw, with its probability (`caption_choices`)."""
        i = self.renders.indices[index]
        return caption_choices(str(self.renders.cache.labels[i]), str(self.renders.cache.styles[i]))

    def resize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(3, h, w)` -> `(3, image_size, image_size)`: bicubic with antialiasing, clamped to [0, 1]; the one resize of
        training renders and their crops."""
        if pixel_values.shape[-1] == self.image_size and pixel_values.shape[-2] == self.image_size:
            return pixel_values
        return F.interpolate(pixel_values[None], size=self.image_size, mode="bicubic", antialias=True)[0].clamp(0, 1)

    def augmented_pixel_values(self, index: int, variant: int, min_scale: float, seed: int) -> torch.Tensor:
        """Item `index`'s render cropped by `random_square_crop` at the render's 64 px, then resized as `__getitem__`
        resizes; no caption is drawn."""
        pixel_values = self.renders[index]["pixel_values"]  # (3, 64, 64)
        left, top, side = random_square_crop(pixel_values.shape[-1], index, variant, min_scale, seed)
        return self.resize(pixel_values[:, top : top + side, left : left + side])

    def __getitem__(self, index: int) -> dict:
        item = self.renders[index]
        item["pixel_values"] = self.resize(item["pixel_values"])
        label, style = item["label"], item["style"]
        item["text"] = training_caption(label, style, self.rng)
        if self.num_negatives:
            negatives = self.world.hard_negatives(item["key"], style, item["text"], self.num_negatives, self.rng)
            item["negatives"] = negatives
        return item


def reconstruction_metrics(drawn: dict) -> dict:
    """Mean PSNR (of each image's MSE; pixels in [0, 1]) and MSE of `EmojiWorld.held_out_reconstructions`' output."""
    mse = ((drawn["reconstructions"] - drawn["pixels"]) ** 2).flatten(1).mean(1)  # (n,)
    psnr = (10 * torch.log10(1 / mse.clamp_min(1e-10))).mean().item()
    return {"psnr_held_out": round(psnr, 2), "reconstruction_mse": round(mse.mean().item(), 5), "n": len(mse)}


class EmojiWorld(World):
    """
    The emoji world behind the `World` interface (`--dataset emoji --train_data_dir CACHE`).

    Args:
        data_dir (`str`): the cache `dalle-hf data emoji --cache DIR` wrote.
    """

    name = "emoji"
    needs_data_dir = True
    native_image_size = IMAGE_SIZE
    has_hard_negatives = True
    has_ranking_set = True
    has_held_out_examples = True
    hard_negatives_description = "the same concept in another style, other concepts of its subgroup in the same style"

    def __init__(self, data_dir: str | None = None):
        super().__init__(data_dir)
        self.cache = read_emoji_cache(data_dir)
        concepts = self.cache.concepts
        # Training pairs only: a held-out pair never appears in a training caption, a negative included.
        self.train_styles: dict[str, list[str]] = {}
        by_subgroup_style: dict[tuple[str, str], list[str]] = {}
        for key, style, held in zip(self.cache.keys.tolist(), self.cache.styles.tolist(), self.cache.held_out):
            if held:
                continue
            self.train_styles.setdefault(key, []).append(style)
            by_subgroup_style.setdefault((concepts[key]["subgroup"], style), []).append(key)
        self.by_subgroup_style = by_subgroup_style

    @classmethod
    def data_dir_help(cls) -> str:
        return "the emoji cache: build it with `dalle-hf data emoji --cache DIR`"

    def describe(self, for_clip: bool = False) -> str:
        summary = self.cache.summary
        return (f"the emoji world (`dalle_hf.data.emoji`, cache `{self.data_dir}`): {summary['concepts']:,} concepts, "
                f"{summary['images']:,} renders in {len(summary['per_style'])} styles, the "
                f"{summary['held_out_pairs']} held-out (concept, style) pairs never shown; captions "
                + ", ".join(f"{form} {share:.0%}" for form, share in CAPTION_MIX.items()))  # fmt: skip

    def label(self, key: str) -> str:
        return self.cache.concepts[key]["label"]

    def train_dataset(self, image_size: int, seed: int) -> Dataset:
        return EmojiTraining(self, image_size, seed)

    def clip_dataset(self, image_size: int, seed: int, num_negatives: int) -> Dataset:
        return EmojiTraining(self, image_size, seed, num_negatives)

    def caption_is_true(self, text: str, example: dict) -> bool:
        return text in true_captions(example["label"], example["style"])

    def hard_negatives(self, key: str, style: str, text: str, n: int, rng: random.Random) -> list[str]:
        """
        Up to `n` false captions of a render of `key` in `style` whose caption is `text`, half of each kind: the
        same concept in another training style, and another concept of the same subgroup in this style. A plain
        caption's negatives are other concepts' labels (a style is not named, so no style can be wrong).
        """
        label = self.label(key)
        neighbours = [k for k in self.by_subgroup_style.get((self.cache.concepts[key]["subgroup"], style), ())
                      if k != key]  # fmt: skip
        if text == plain_prompt(label):
            return [plain_prompt(self.label(k)) for k in rng.sample(neighbours, min(n, len(neighbours)))]
        other_styles = [s for s in self.train_styles[key] if s != style]
        styles = rng.sample(other_styles, min(len(other_styles), (n + 1) // 2))
        concepts = rng.sample(neighbours, min(len(neighbours), n - len(styles)))
        # The style word as the caption has it (a canonical name or an alias) for the concept negatives.
        style_word = text[len(label) + len(" in "): -len(" style")] if text.startswith(label + " in ") else style
        negatives = [style_prompt(label, s) for s in styles]
        negatives += [style_prompt(self.label(k), style_word) for k in concepts]
        truth = true_captions(label, style)
        return [c for c in dict.fromkeys(negatives) if c not in truth][:n]

    def tokenizer_captions(self, seed: int = 0) -> Iterable[str]:
        labels = sorted({self.label(k) for k in self.train_styles})
        words = [*STYLES, *(a for aliases in STYLE_ALIASES.values() for a in aliases)]
        yield from labels
        for key, styles in self.train_styles.items():
            for style in styles:
                yield style_prompt(self.label(key), style)
        for label, word in zip(labels, itertools.cycle(words)):
            yield style_prompt(label, word)
        for i, word in enumerate(words[len(labels) :]):  # a cache with fewer concepts than style words
            yield style_prompt(labels[i % len(labels)], word)

    def caption_ranking_set(self, n_images: int, n_captions: int, seed: int = 0, split: str = "all") -> RankingSet:
        """
        `n_images` renders (a fixed draw from `split`), each with its styled caption first and `n_captions - 1`
        styled captions of other (concept, style) pairs of the world drawn at random: top-1 retrieval of the true
        caption among `n_captions` (the evaluation uses 100). Groups are the styles.
        """
        if n_images < 1 or n_captions < 2:
            raise ValueError(f"need n_images >= 1 and n_captions >= 2, got {n_images} and {n_captions}")
        renders = EmojiRenders.from_cache(self.cache, split=split)
        rng = random.Random(f"emoji-caption-ranking/{split}/{seed}")
        chosen = rng.sample(range(len(renders)), min(n_images, len(renders)))
        pool = sorted({style_prompt(str(label), str(style))
                       for label, style in zip(self.cache.labels.tolist(), self.cache.styles.tolist())})  # fmt: skip
        pixels, candidates, groups = [], [], []
        for index in chosen:
            item = renders[index]
            pixels.append(item["pixel_values"])
            false = sample_false_captions(rng, pool, true_captions(item["label"], item["style"]), n_captions - 1)
            candidates.append([item["text"], *false])
            groups.append(item["style"])
        return RankingSet(torch.stack(pixels), candidates, groups)

    def held_out_examples(self, n: int, seed: int = 0) -> list[tuple[str, Image.Image, str]]:
        """Up to `n` renders of held-out pairs (the `novel` split: no model trained on them), a fixed draw for `seed`,
        each with its caption `"{label} in {style} style"`; grouped by style."""
        renders = EmojiRenders.from_cache(self.cache, split="novel")
        rng = random.Random(f"emoji-held-out/{seed}")
        chosen = rng.sample(range(len(renders)), min(n, len(renders)))
        examples = []
        for i in renders.indices[chosen]:
            label, style = str(self.cache.labels[i]), str(self.cache.styles[i])
            examples.append((style, Image.fromarray(self.cache.images[i]), style_prompt(label, style)))
        return examples

    @torch.no_grad()
    def held_out_reconstructions(self, vae, n: int, seed: int) -> dict:
        """
        `n` held-out renders (pairs the dVAE never trained on), chosen by `seed`, and their argmax-code
        reconstructions: `{"keys": (n,) concept keys, "originals": (n, 3, 64, 64), "pixels": the originals at the
        dVAE's image size, "reconstructions": (n, 3, size, size)}`, all in [0, 1] on the CPU. One draw for
        `evaluate_vae` (training) and `dalle-hf eval emoji`'s `vae` split, so both quote the same renders.
        """
        renders = EmojiRenders.from_cache(self.cache, split="novel")
        if n <= 0 or len(renders) == 0:
            raise ValueError(f"expected n > 0 and held-out renders in the cache, got n={n} and {len(renders)} renders")
        rng = random.Random(f"emoji-vae-eval/{seed}")
        chosen = rng.sample(range(len(renders)), min(n, len(renders)))
        originals = torch.stack([renders[i]["pixel_values"] for i in chosen])  # (n, 3, 64, 64)
        size = vae.config.image_size
        pixels = originals if size == originals.shape[-1] else \
            F.interpolate(originals, size=size, mode="bicubic", antialias=True).clamp(0, 1)  # fmt: skip
        reconstructions = torch.cat([
            vae.decode_code(vae.get_codebook_indices(batch.to(vae.device, vae.dtype))).float().clamp(0, 1).cpu()
            for batch in pixels.split(64)
        ])  # (n, 3, size, size)
        keys = [renders[i]["key"] for i in chosen]
        return {"keys": keys, "originals": originals, "pixels": pixels, "reconstructions": reconstructions}

    def evaluate_vae(self, vae, n: int, seed: int) -> dict:
        """PSNR of argmax-code reconstructions on `n` held-out renders (`held_out_reconstructions`)."""
        if n <= 0:
            return {}
        return reconstruction_metrics(self.held_out_reconstructions(vae, n, seed))

    def validation_prompts(self) -> list[str]:
        return ["red apple in twemoji style", "cat face in fluent 3d style", "rocket in noto mono style",
                "grinning face"]  # fmt: skip

    def metadata(self) -> dict:
        """Adds the styles (exact names, in the table's order, only those in the cache), their aliases and the
        styled prompt's template, so that the app can offer a style selector."""
        styles = [style for style in STYLES if style in set(self.cache.styles.tolist())]
        return {**super().metadata(), "styles": styles, "style_aliases": {s: list(STYLE_ALIASES[s]) for s in styles},
                "style_prompt": style_prompt("{label}", "{style}")}  # fmt: skip


__all__ = [
    "STYLES",
    "STYLE_SOURCES",
    "EmojiCache",
    "EmojiConcept",
    "EmojiRenders",
    "EmojiTraining",
    "EmojiWorld",
    "STYLE_ALIASES",
    "CAPTION_MIX",
    "build_emoji_cache",
    "caption_choices",
    "concept_key",
    "is_held_out",
    "plain_prompt",
    "read_emoji_cache",
    "reconstruction_metrics",
    "read_emojibase",
    "style_prompt",
]
