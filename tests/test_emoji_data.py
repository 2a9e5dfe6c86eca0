"""The emoji world's data (dalle_hf/data/emoji.py) on a tiny fixture built here: packages laid out as npm and Debian
unpack them, never the network (subprocess is patched to fail)."""

import inspect
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from dalle_hf.cli import main as cli_main
from dalle_hf.data import emoji
from dalle_hf.data.emoji import (
    STYLES,
    EmojiRenders,
    build_emoji_cache,
    concept_key,
    fit_on_white,
    iconify_svg,
    is_held_out,
    plain_prompt,
    read_emoji_cache,
    read_emojibase,
    render_svg,
    style_prompt,
)

DEJAVU = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"  # stands in for the emoji fonts (has ❤ and ☕, no 🍎)
GROUPS = ["smileys-emotion", "people-body", "component", "animals-nature", "food-drink", "travel-places",
          "activities", "objects", "symbols", "flags"]  # fmt: skip
SUBGROUPS = ["hand-fingers-open", "family", "skin-tone", "food-fruit", "food-vegetable", "heart", "keycap",
             "alphanum", "country-flag", "drink-hot"]  # fmt: skip


def entry(hexcode, label, group, subgroup, skins=(), emoji_text=None):
    text = emoji_text or "".join(chr(int(p, 16)) for p in hexcode.split("-"))
    row = {"label": label, "hexcode": hexcode, "emoji": text, "tags": [label.split()[0].lower()]}
    if group is not None:
        row |= {"group": GROUPS.index(group), "subgroup": SUBGROUPS.index(subgroup)}
    if skins:
        row["skins"] = [{"label": f"{label}: {tone}", "hexcode": code} for code, tone in skins]
    return row


EMOJIBASE_ENTRIES = [
    entry("1F34E", "Red Apple", "food-drink", "food-fruit"),
    entry("1F44B", "waving hand", "people-body", "hand-fingers-open", skins=[("1F44B-1F3FB", "light skin tone")]),
    entry("1F1FA-1F1F8", "flag: United States", "flags", "country-flag"),
    entry("0023-FE0F-20E3", "keycap: #", "symbols", "keycap"),
    entry("2764-FE0F", "red heart", "smileys-emotion", "heart"),
    entry("1F1E6", "regional indicator A", None, None),
    entry("1F3FB", "light skin tone", "component", "skin-tone"),
    entry("1F468-200D-1F469-200D-1F467", "family: man, woman, girl", "people-body", "family"),
    entry("1F346", "eggplant", "food-drink", "food-vegetable"),
    entry("2615", "hot beverage", "food-drink", "drink-hot"),
]
CONCEPTS = ["1f34e", "1f44b", "2764", "1f468-200d-1f469-200d-1f467", "1f346", "2615"]


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


def rgba_art(color, box=(8, 4, 56, 60)):
    """A 64x64 transparent PNG with one coloured block (margins like emoji-datasource's images)."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), color + (255,)), box[:2])
    return image


@pytest.fixture
def downloads(tmp_path, monkeypatch):
    """Packages as `npm pack` + tar and `dpkg-deb -x` leave them in the download folder."""

    def no_network(*args, **kwargs):
        raise AssertionError(f"the emoji tests must not fetch anything: {args}")

    monkeypatch.setattr(subprocess, "run", no_network)
    root = tmp_path / "downloads"
    base = root / "emojibase-data-17.0.0" / "package"
    write_json(base / "en" / "data.json", EMOJIBASE_ENTRIES)
    write_json(base / "en" / "messages.json", {
        "groups": [{"key": k, "message": k, "order": i} for i, k in enumerate(GROUPS)],
        "subgroups": [{"key": k, "message": k, "order": i} for i, k in enumerate(SUBGROUPS)],
    })  # fmt: skip
    write_json(base / "meta" / "unicode-names.json", {"1F346": "AUBERGINE", "1F34E": "RED APPLE"})

    # noto: emoji-datasource layout, PNG per code-point sequence (fe0f kept in names, as in the package)
    pngs = root / "emoji-datasource-google-16.0.0" / "package" / "img" / "google" / "64"
    pngs.mkdir(parents=True)
    rgba_art((220, 30, 30)).save(pngs / "1f34e.png")
    rgba_art((220, 30, 30)).save(pngs / "1f346.png")  # the same image as the apple: a duplicate within the style
    rgba_art((250, 200, 40)).save(pngs / "1f44b.png")
    rgba_art((240, 180, 140)).save(pngs / "1f44b-1f3fb.png")  # a skin tone: labelled, excluded
    rgba_art((200, 0, 0), box=(0, 16, 64, 48)).save(pngs / "2764-fe0f.png")
    rgba_art((0, 0, 200)).save(pngs / "1f1fa-1f1f8.png")  # a flag: labelled, excluded
    rgba_art((0, 120, 200)).save(pngs / "1f9ff-200d-1f34e.png")  # no emojibase label: dropped and counted
    (pngs / "sheet_google_64.png").write_bytes(b"")  # not named by code points: ignored

    # noto blob: an Iconify set; chars.json maps the heart, the rest joins by name (the alias has hFlip)
    iconify = root / "iconify-json-noto-v1-1.2.5" / "package"
    write_json(iconify / "icons.json", {
        "prefix": "noto-v1", "width": 32, "height": 32,
        "icons": {
            "red-apple": {"body": '<path fill="#d01010" d="M0 0h16v32H0z"/>'},  # the left half only
            "heart-shape": {"body": '<path fill="#e02020" d="M4 8h24v16H4z"/>'},
            "aubergine": {"body": '<path fill="#602080" d="M8 2h16v28H8z"/>', "width": 32, "height": 16},
        },
        "aliases": {"waving-hand": {"parent": "red-apple", "hFlip": True}},
    })  # fmt: skip
    write_json(iconify / "chars.json", {"2764-fe0f": "heart-shape", "1f9ff": "heart-shape"})

    # noto mono: fontsource's .woff subsets with their unicode ranges (DejaVu Sans in the subset's place)
    # symbola: the Debian package unpacked (DejaVu Sans again)
    if os.path.isfile(DEJAVU):
        files = root / "fontsource-noto-emoji-5.3.2" / "package" / "files"
        files.mkdir(parents=True)
        shutil.copy(DEJAVU, files / "noto-emoji-0-400-normal.woff")
        write_json(files.parent / "unicode.json", {"[0]": "U+20-7e,U+2600-27bf,U+fe0f,U+200d,U+1f300-1f6ff"})
        font = root / "fonts-symbola" / "usr" / "share" / "fonts" / "truetype" / "ancient-scripts"
        font.mkdir(parents=True)
        shutil.copy(DEJAVU, font / "Symbola_hint.ttf")
    return str(root)


def test_concept_key_normalises_code_points():
    assert concept_key("1F34E") == "1f34e"
    assert concept_key("2764-FE0F") == "2764"
    assert concept_key("0023-fe0f-20e3") == "23-20e3"  # leading zeros and every fe0f removed
    assert concept_key("1F441-FE0F-200D-1F5E8-FE0F") == "1f441-200d-1f5e8"
    assert concept_key("1f468_200d_1f469") == "1f468-200d-1f469"
    for bad in ("", "apple", "1f34e-xyz", "1234567"):
        with pytest.raises(ValueError, match="expected hex code points"):
            concept_key(bad)


def test_held_out_rule_on_known_pairs():
    # sha256("2764|noto blob") % 20 == 0 (computed by hand with hashlib), and so on
    held_out = [("2764", "noto blob"), ("2764", "streamline"), ("1f346", "streamline"), ("1f600", "emojione"),
                ("1f408", "fluent flat"), ("263a", "noto blob"), ("2615", "noto blob")]  # fmt: skip
    for key, style in held_out:
        assert is_held_out(key, style)
    keys = ["1f34e", "1f44b", "2764", "1f468-200d-1f469-200d-1f467", "1f346", "1f600", "1f408", "263a", "2615"]
    others = [(k, s) for k in keys for s in STYLES if (k, s) not in held_out]
    assert not any(is_held_out(k, s) for k, s in others)
    assert not is_held_out("2764", "noto")  # the style is part of the hashed string


def test_prompts():
    assert style_prompt("red apple", "twemoji") == "red apple in twemoji style"
    assert style_prompt("cat face", "fluent high contrast") == "cat face in fluent high contrast style"
    assert plain_prompt("red apple") == "red apple"


def test_emojibase_concepts_follow_the_rules(downloads):
    concepts, labelled = read_emojibase(os.path.join(downloads, "emojibase-data-17.0.0", "package"))
    assert list(concepts) == CONCEPTS  # no skin tone, flag, keycap, regional indicator or component; emojibase order
    assert concepts["1f34e"].label == "red apple"  # lowercased
    assert concepts["1f468-200d-1f469-200d-1f467"].label == "family: man, woman, girl"
    assert (concepts["1f34e"].group, concepts["1f34e"].subgroup, concepts["1f34e"].tags) == (
        "food-drink", "food-fruit", ("red",))  # fmt: skip
    assert concepts["2764"].emoji == "\u2764\ufe0f"  # the fully qualified text, for fonts that shape it
    assert concepts["1f346"].unicode_name == "aubergine"
    assert {"1f44b-1f3fb", "1f1fa-1f1f8", "23-20e3", "1f1e6", "1f3fb"} <= labelled


def test_icon_names_for_sets_without_chars_json():
    cat = emoji.EmojiConcept("1f408", "\U0001f408", "cat", (), "animals-nature", "animal-mammal", "cat")
    assert emoji.icon_names(cat) == ["catside", "cat"]  # fxemoji's whole cat before its cat face
    eggplant = emoji.EmojiConcept("1f346", "\U0001f346", "eggplant", (), "food-drink", "food-vegetable", "aubergine")
    assert emoji.icon_names(eggplant) == ["aubergineside", "aubergine", "eggplant"]
    family = emoji.EmojiConcept("1f468-200d-1f469-200d-1f467", "", "family: man, woman, girl", (), "people-body",
                                "family")  # fmt: skip
    assert emoji.icon_names(family) == ["family-man-woman-girl", "familymanwomangirl"]
    assert emoji.kebab_name("piñata") == "pinata"
    assert emoji.kebab_name("Japanese “here” button") == "japanese-here-button"


def test_concepts_follow_emojibase_order_not_file_order(downloads):
    path = os.path.join(downloads, "emojibase-data-17.0.0", "package", "en", "data.json")
    write_json(path, [{**row, "order": -i} for i, row in enumerate(EMOJIBASE_ENTRIES)])  # the file's order reversed
    concepts, _ = read_emojibase(os.path.dirname(os.path.dirname(path)))
    assert list(concepts) == CONCEPTS[::-1]


def test_fit_on_white_keeps_aspect_and_centres():
    art = Image.new("RGBA", (20, 10), (0, 0, 255, 255))  # wide artwork
    out = fit_on_white(art)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert (out[:15] == 255).all() and (out[-15:] == 255).all()  # 64 x 32 band centred vertically
    assert (out[17:47, :, 2] == 255).all() and (out[17:47, :, 0] < 10).all()
    transparent = fit_on_white(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    assert (transparent == 255).all()  # transparent -> white, not black


def test_iconify_alias_flip_and_box():
    icon_set = {"prefix": "t", "width": 32, "height": 32,
                "icons": {"half": {"body": '<path fill="#000" d="M0 0h16v32H0z"/>'},
                          "wide": {"body": '<path fill="#000" d="M0 0h32v16H0z"/>', "height": 16}},
                "aliases": {"flipped": {"parent": "half", "hFlip": True},
                            "twice": {"parent": "flipped", "hFlip": True}}}  # fmt: skip
    half = render_svg(iconify_svg(icon_set, "half"))
    assert half.shape == (64, 64, 3)
    assert (half[:, :30] < 10).all() and (half[:, 34:] == 255).all()  # left half black on white
    np.testing.assert_array_equal(render_svg(iconify_svg(icon_set, "flipped")), half[:, ::-1])
    np.testing.assert_array_equal(render_svg(iconify_svg(icon_set, "twice")), half)  # flips compose
    wide = render_svg(iconify_svg(icon_set, "wide"))  # a 32 x 16 box fits as 64 x 32, centred
    assert (wide[:15] == 255).all() and (wide[17:47] < 10).all() and (wide[-15:] == 255).all()
    with pytest.raises(ValueError, match="expected an icon or alias named 'missing'"):
        iconify_svg(icon_set, "missing")


def test_build_cache_renders_dedups_and_round_trips(downloads, tmp_path):
    styles = ["noto", "noto blob"] + (["noto mono", "symbola"] if os.path.isfile(DEJAVU) else [])
    summary = build_emoji_cache(str(tmp_path / "cache"), downloads, styles=styles, log=lambda line: None)
    noto, blob = summary["per_style"]["noto"], summary["per_style"]["noto blob"]
    assert (noto["images"], noto["duplicates_dropped"], noto["unlabeled_dropped"]) == (3, 1, 1)
    assert (blob["images"], blob["unlabeled_dropped"]) == (4, 1)  # apple, hand (alias), heart (chars), aubergine

    cache = read_emoji_cache(str(tmp_path / "cache"))
    assert cache.images.shape == (summary["images"], 64, 64, 3) and cache.images.dtype == np.uint8
    pairs = list(zip(cache.keys.tolist(), cache.styles.tolist()))
    assert [k for k, s in pairs if s == "noto"] == ["1f34e", "1f44b", "2764"]  # the eggplant duplicate dropped
    assert [k for k, s in pairs if s == "noto blob"] == ["1f34e", "1f44b", "2764", "1f346"]
    noto_images = cache.images[cache.styles == "noto"]
    assert (noto_images[:, :4] == 255).all() and (noto_images[:, -4:] == 255).all()  # transparency -> white
    assert (cache.images[pairs.index(("1f34e", "noto blob")), :, 40:] == 255).all()  # right half of the icon: white
    apple, hand = cache.images[pairs.index(("1f34e", "noto blob"))], cache.images[pairs.index(("1f44b", "noto blob"))]
    np.testing.assert_array_equal(hand, apple[:, ::-1])
    heart = cache.images[pairs.index(("2764", "noto"))]  # 64 x 32 art on a 64 x 64 PNG, drawn as is
    assert (heart[:16] == 255).all() and (heart[16:48] != 255).any(axis=-1).all()
    assert cache.held_out.tolist() == [is_held_out(k, s) for k, s in pairs]
    assert ("2764", "noto blob") in pairs and cache.held_out[pairs.index(("2764", "noto blob"))]
    assert cache.labels[pairs.index(("1f34e", "noto"))] == "red apple"
    assert cache.concepts["1f34e"]["subgroup"] == "food-fruit"
    assert cache.packages["noto"] == {"registry": "npm", "package": "emoji-datasource-google", "version": "16.0.0",
                                      "license": "Apache-2.0"}  # fmt: skip
    if "noto mono" in styles:
        mono = [k for k, s in pairs if s == "noto mono"]
        assert "2764" in mono and "2615" in mono and "1f34e" not in mono  # a glyph the font lacks is not drawn
        assert "1f468-200d-1f469-200d-1f467" not in mono  # no ligature in the font: three glyphs, not a family
        cup = cache.images[pairs.index(("2615", "noto mono"))]
        assert (cup[..., 0] == cup[..., 1]).all() and (cup[..., 1] == cup[..., 2]).all()  # grey: black on white
        touches = [(cup[0] < 255).any(), (cup[-1] < 255).any(), (cup[:, 0] < 255).any(), (cup[:, -1] < 255).any()]
        assert cup.min() < 30 and sum(touches) >= 2  # cropped to ink: the glyph spans the frame one way
        assert [k for k, s in pairs if s == "symbola"] == ["2764", "2615"]  # single code points only

    train, novel = EmojiRenders(str(tmp_path / "cache")), EmojiRenders(str(tmp_path / "cache"), split="novel")
    assert len(train) + len(novel) == len(pairs) and len(novel) == int(cache.held_out.sum()) >= 1
    item = novel[0]
    assert item["pixel_values"].shape == (3, 64, 64) and 0 <= item["pixel_values"].min() <= 1
    assert item["text"] == style_prompt(item["label"], item["style"]) and is_held_out(item["key"], item["style"])
    assert all(not is_held_out(train[i]["key"], train[i]["style"]) for i in range(len(train)))
    only_noto = EmojiRenders(str(tmp_path / "cache"), split="all", styles=["noto"])
    assert [only_noto[i]["text"] for i in range(len(only_noto))] == [
        "red apple in noto style", "waving hand in noto style", "red heart in noto style"]  # fmt: skip


def test_bad_arguments_name_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected style names among"):
        build_emoji_cache(str(tmp_path), styles=["noto", "apple"])
    with pytest.raises(ValueError, match="expected emoji.npz and emoji.json"):
        EmojiRenders(str(tmp_path))
    with pytest.raises(ValueError, match="expected `split` among"):
        EmojiRenders(str(tmp_path), split="test")


def test_cli_data_emoji(downloads, tmp_path, capsys):
    cache = tmp_path / "cli-cache"
    assert cli_main(["data", "emoji", "--cache", str(cache), "--download-dir", downloads, "--styles", "noto blob",
                     "noto"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["noto", "3", "0", "1", "1"]  # table order: noto before noto blob
    assert lines[2].split()[:3] == ["noto", "blob", "4"]
    assert "concepts 4, images 7, held-out pairs 1, median styles per concept 2" in out
    assert os.path.isfile(cache / emoji.CACHE_IMAGES) and os.path.isfile(cache / emoji.CACHE_METADATA)


def test_documented_defaults_match_signatures():
    pattern = re.compile(r"^\s+(\w+) \(`[^`]+`, \*optional\*, defaults to (.+?)\):", re.M)
    documented = dict(pattern.findall(inspect.getdoc(EmojiRenders)))
    assert documented["split"].strip('`"') == inspect.signature(EmojiRenders.__init__).parameters["split"].default
    documented = dict(pattern.findall(inspect.getdoc(build_emoji_cache)))
    assert documented["log"].strip("`") == inspect.signature(build_emoji_cache).parameters["log"].default.__name__
    assert set(documented) == {"download_dir", "styles", "log"}
