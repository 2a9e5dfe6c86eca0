"""The Gradio app: handlers called directly (bad input, streaming, the pipeline cache), then `python app.py` in a
subprocess driven end to end with `gradio_client`. A tiny random pipeline is saved to a temporary folder."""

import gc
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import gradio as gr
import numpy as np
import PIL.Image
import pytest
import torch

import app
from dalle_hf.app import components as app_components
from dalle_hf.app import handlers, inputs, layout, sampling, world
from dalle_hf.app import models as app_models
from dalle_hf.modeling_dalle import DalleKVCache
from tests.conftest import CAPTIONS, tiny_dalle_config

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore:.*:UserWarning")  # gr.Warning outside a server is a UserWarning
SETTINGS = dict(candidates=6, keep=3, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0)


# ----------------------------------------------------------------------------------------------------------------
# A tiny saved pipeline and the app serving it (shared with tests/test_app_browser.py)
# ----------------------------------------------------------------------------------------------------------------
def save_tiny_pipeline(path: Path, captions: list[str] = CAPTIONS) -> Path:
    """The tiny random components of tests/conftest.py (4x4 grid of 16 px images, CLIP), saved with save_pretrained;
    the tokenizer is trained on `captions`."""
    from transformers import CLIPModel

    from dalle_hf.clip import make_clip_config, make_clip_processor
    from dalle_hf.configuration_dvae import DalleVAEConfig
    from dalle_hf.modeling_dalle import DalleForImageGeneration
    from dalle_hf.modeling_dvae import DalleVAE
    from dalle_hf.pipeline_dalle import DallePipeline
    from dalle_hf.tokenization import train_text_tokenizer

    torch.manual_seed(0)
    tokenizer = train_text_tokenizer(captions * 10, vocab_size=300, text_seq_len=8)
    vae = DalleVAE(DalleVAEConfig(image_size=16, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32))
    clip = CLIPModel(make_clip_config(len(tokenizer), text_seq_len=8, image_size=16, patch_size=4, vision_width=32,
                                      vision_layers=2, text_width=32, text_layers=2, projection_dim=32, head_dim=16))
    pipe = DallePipeline(tokenizer=tokenizer, transformer=DalleForImageGeneration(tiny_dalle_config()).eval(),
                         vae=vae.eval(), clip_model=clip.eval(), clip_processor=make_clip_processor(tokenizer, 16))
    pipe.save_pretrained(path)
    return path


_SHARED = {}  # one checkpoint folder and one server per test session, for both app test files


def tiny_checkpoints(tmp_path_factory) -> Path:
    """Two models, as shipped: `tiny` (the default) with the shapes world's world.json and `tiny-emoji` with the
    emoji world's, written from a tiny emoji cache (5 styles, 6 concepts)."""
    if "checkpoints" not in _SHARED:
        from dalle_hf.data.world import load_world, write_world_file
        from tests.test_worlds import write_tiny_cache

        root = tmp_path_factory.mktemp("checkpoints")
        write_world_file(load_world("shapes"), str(save_tiny_pipeline(root / "tiny")))
        emoji = load_world("emoji", write_tiny_cache(root.parent / f"{root.name}-emoji-cache"))
        write_world_file(emoji, str(save_tiny_pipeline(root / "tiny-emoji", list(emoji.tokenizer_captions(seed=0)))))
        _SHARED["checkpoints"] = root
    return _SHARED["checkpoints"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_server(tmp_path_factory) -> str:
    """Start `python app.py --checkpoints <tiny> --port <free>` once (port from GRADIO_SERVER_PORT); returns its URL."""
    if "url" not in _SHARED:
        checkpoints = tiny_checkpoints(tmp_path_factory)
        port = free_port()
        log = open(checkpoints.parent / "app.log", "w")
        env = {
            **os.environ, "OMP_NUM_THREADS": "1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"
        }
        proc = subprocess.Popen([sys.executable, "app.py", "--checkpoints", str(checkpoints), "--threads", "1"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        _SHARED["proc"], _SHARED["log"] = proc, log
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, Path(log.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "app.py did not start:\n" + Path(log.name).read_text()[-3000:]
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                time.sleep(0.3)
        _SHARED["url"] = url
    return _SHARED["url"]


def stop_app_server():
    proc = _SHARED.pop("proc", None)
    _SHARED.pop("url", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    if "log" in _SHARED:
        _SHARED.pop("log").close()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory)


@pytest.fixture(scope="session")
def models(checkpoints):
    return app_models.find_checkpoints(checkpoints)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    yield app_server(tmp_path_factory)
    stop_app_server()


@pytest.fixture(scope="session")
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False)


def run(handler, *args, **settings):
    """Consume a handler's generator: -> (all outputs, the last one)."""
    outputs = list(handler(*args, **{**SETTINGS, "seed": 7, "randomize_seed": False, **settings}))
    return outputs, outputs[-1]


def pixels(gallery) -> list[np.ndarray]:
    return [np.asarray(PIL.Image.open(item["image"]) if isinstance(item, dict) else item[0]) for item in gallery]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints, the pipeline cache, the command line
# ----------------------------------------------------------------------------------------------------------------
def test_find_checkpoints(tmp_path, checkpoints):
    for name in ("b-model", "dalle-shapes", "a-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "not-a-model").mkdir()
    assert list(app_models.find_checkpoints(tmp_path)) == ["dalle-shapes", "a-model", "b-model"]
    assert app_models.find_checkpoints(checkpoints / "tiny") == {"tiny": checkpoints / "tiny"}  # one model folder
    assert app_models.find_checkpoints(tmp_path / "missing") == {}


def test_checkpoints_root_and_flags(monkeypatch, tmp_path):
    monkeypatch.delenv(app_models.CHECKPOINTS_ENV, raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7999")
    assert app_models.checkpoints_root() == app_models.DEFAULT_CHECKPOINTS == REPO / "checkpoints"
    monkeypatch.setenv(app_models.CHECKPOINTS_ENV, str(tmp_path))
    assert app_models.checkpoints_root() == tmp_path and app_models.checkpoints_root("other") == Path("other")
    args = app.parse_args([])
    assert (args.host, args.port, args.checkpoints) == ("127.0.0.1", 7999, None)
    args = app.parse_args(["--host", "0.0.0.0", "--port", "8000", "--checkpoints", "x", "--concurrency", "3"])
    assert (args.host, args.port, args.checkpoints, args.concurrency) == ("0.0.0.0", 8000, "x", 3)
    with pytest.raises(SystemExit):
        app.parse_args(["--max-queue", "0"])


NO_CUDA = "--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False); use --device cpu"


def test_device_and_dtype_flags(monkeypatch, tmp_path, capsys):
    """`--device auto` (the default) is the CPU without CUDA and CUDA with it; what the machine cannot run stops the
    start with a message. Parsing sets nothing: `main` calls `use_device`."""
    monkeypatch.setenv(app_models.CHECKPOINTS_ENV, str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = app.parse_args([])
    assert (args.device, args.dtype) == ("cpu", None)
    for flags, message in ((["--device", "cuda"], NO_CUDA),
                           (["--dtype", "float16"], "--dtype float16 needs --device cuda")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            app.parse_args(flags)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = app.parse_args(["--dtype", "bfloat16"])
    assert (args.device, args.dtype) == ("cuda", "bfloat16") and app_models.DEVICE == "cpu"


def test_use_device_sets_where_a_request_is_costed(monkeypatch):
    monkeypatch.setattr(app_models, "DEVICE", app_models.DEVICE)  # restored after the test
    monkeypatch.setattr(app_models, "DTYPE", app_models.DTYPE)
    shapes = REPO / "checkpoints" / "dalle-shapes"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert app_models.use_device() == "cpu" and app_models.read_model_info(shapes)["device"] == "cpu"
    cpu_seconds = app_models.read_model_info(shapes)["seconds_per_image"]
    with pytest.raises(ValueError, match="--dtype float16 needs --device cuda"):
        app_models.use_device("cpu", "float16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert app_models.use_device() == "cuda" and app_models.DTYPE is None
    info = app_models.read_model_info(shapes)
    rates = app_models.SECONDS_PER_WEIGHT_READ
    assert info["device"] == "cuda" and info["seconds_per_image"] == pytest.approx(cpu_seconds * rates["cuda"] /
                                                                                   rates["cpu"])  # fmt: skip


@pytest.mark.parametrize("device, dtype, expected", [
    ("cpu", None, {"DALL-E": None, "DALL·E mini": None}),  # as saved, as before
    ("cuda", None, {"DALL-E": None, "DALL·E mini": "float16"}),  # Mega in float16 on a GPU, as the Space runs it
    ("cuda", "bfloat16", {"DALL-E": "bfloat16", "DALL·E mini": "bfloat16"}),
])  # fmt: skip
def test_each_family_loads_in_its_dtype_on_the_device(monkeypatch, device, dtype, expected):
    """The arguments `load_pipelines` gives the shared loader (`dalle_hf.loading.load_pipeline`), which is stopped
    there: nothing loads or moves."""
    asked = {}

    def recording_loader(path, dtype, device, pipeline_cls):
        asked[pipeline_cls] = (dtype, device)
        raise InterruptedError

    monkeypatch.setattr(app_models, "load_pipeline", recording_loader)
    monkeypatch.setattr(app_models, "DEVICE", device)
    monkeypatch.setattr(app_models, "DTYPE", dtype)
    for family in app_models.FAMILIES:
        with pytest.raises(InterruptedError):
            family.load(Path("unused"))
    classes = {"DALL-E": app_models.DallePipeline, "DALL·E mini": app_models.DalleMiniPipeline}
    assert asked == {classes[name]: (want, device) for name, want in expected.items()}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_app_refuses_cuda_without_a_gpu():
    result = subprocess.run([sys.executable, "app.py", "--device", "cuda", "--model", "checkpoints/dalle-shapes"],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert result.returncode == 2 and NO_CUDA in result.stderr and "Traceback" not in result.stderr


def test_model_selector_only_with_several_models(tmp_path):
    for name in ("dalle-shapes", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    dropdown = next(c for c in layout.build_demo(tmp_path).get_config_file()["components"] if c["type"] == "dropdown")
    assert dropdown["props"]["visible"] is True and dropdown["props"]["value"] == "dalle-shapes"
    assert [choice[0] for choice in dropdown["props"]["choices"]] == ["dalle-shapes", "other"]


def test_build_demo_loads_nothing_and_lists_models(checkpoints):
    before = dict(app_models._MODELS)
    demo = layout.build_demo(checkpoints)
    assert app_models._MODELS == before
    config = demo.get_config_file()
    dropdown = next(c for c in config["components"] if c["props"].get("elem_id") == "model")
    assert dropdown["props"]["value"] == "tiny" and dropdown["props"]["visible"] is True
    assert [choice[0] for choice in dropdown["props"]["choices"]] == ["tiny", "tiny-emoji"]
    one = layout.build_demo(checkpoints / "tiny").get_config_file()["components"]
    assert next(c for c in one if c["props"].get("elem_id") == "model")["props"]["visible"] is False  # no selector
    apis = {d.get("api_name") for d in config["dependencies"] if d.get("api_visibility") == "public"}
    assert {"generate", "variations"} <= apis


def test_model_change_updates_rows_and_how_it_works(checkpoints):
    models = app_models.find_checkpoints(checkpoints)
    rows, guidance, candidates, keep, how = handlers.on_model_change(models, "tiny")
    assert rows.maximum == 3 and rows.value == 2 and "4x4 grid of 32 codes" in how
    assert guidance.value == 1.0  # saved without a default guidance: the pipeline's own (off)
    assert (candidates.value, candidates.maximum, keep.value) == (16, 64, 4)  # a small model: the defaults
    assert handlers.on_model_change(models, "gone") == (gr.skip(),) * 5


# ----------------------------------------------------------------------------------------------------------------
# What a request may cost: candidates per model, from an estimate of seconds per image read from its configs
# ----------------------------------------------------------------------------------------------------------------
def test_the_small_models_keep_the_default_candidates(checkpoints):
    """The shipped models and the tiny ones estimate well under a second an image (16 candidates of dalle-shapes
    took 5.3 s in benchmarks/bench_app.py), so their requests keep 16 -> 4 and at most 64."""
    for path in [*app_models.find_checkpoints(REPO / "checkpoints").values(), checkpoints / "tiny"]:
        info = app_models.read_model_info(path)
        assert info["device"] == "cpu" and 0 < info["seconds_per_image"] < 0.5, (path, info["seconds_per_image"])
        limits = inputs.request_limits(info)
        assert (limits["candidates"], limits["keep"], limits["max_candidates"]) == (16, 4, 64), path
    components = layout.build_demo(REPO / "checkpoints").get_config_file()["components"]
    candidates = next(c for c in components if c["props"].get("label") == "Candidates N")
    assert candidates["type"] == "slider"  # drawn by Gradio's own slider, not looked up as a custom component
    assert (candidates["props"]["value"], candidates["props"]["maximum"]) == (16, 64)
    assert next(c for c in components if c["props"].get("label") == "Images kept k")["props"]["value"] == 4
    assert inputs.expected_time(inputs.request_limits(info), 64) == ""  # no time note for a small model


def test_a_dalle_configs_cost_counts_the_weights_a_step_reads():
    """`weights_read_per_image` for DALL-E: every block's weights and the head's image rows, per image token."""
    from dalle_hf.modeling_dalle import DalleForImageGeneration

    config = tiny_dalle_config(n_layer=3, n_embd=64)
    with torch.device("meta"):
        model = DalleForImageGeneration(config)
    per_step = sum(p.numel() for block in model.h for p in block.parameters() if p.dim() == 2)
    per_step += model.lm_head.weight[model.image_token_offset:].numel()
    assert app_models.dalle_weights_read_per_image(config.to_dict()) == per_step * config.image_seq_len
    assert app_models.dalle_weights_read_per_image({}) == 0  # unreadable: the defaults, its load reports it


def test_request_limits_follow_the_seconds_per_image():
    limits = inputs.request_limits({"seconds_per_image": 12.0, "device": "cpu"})
    assert (limits["candidates"], limits["keep"], limits["max_candidates"]) == (5, 4, 20)  # 60 s; 240 s
    slow = inputs.request_limits({"seconds_per_image": 1000.0, "device": "cpu"})
    assert (slow["candidates"], slow["keep"], slow["max_candidates"]) == (1, 1, 1)  # one, however slow
    assert inputs.expected_time(limits, 5) == " About 60 s on this CPU."
    assert inputs.expected_time(limits, 20) == " About 4 min on this CPU."
    assert inputs.expected_time(limits, 2) == ""  # 24 s: under SHOW_TIME_FROM
    settings = (1.0, 0, 1.0, 1.0, 0, False)
    assert inputs.check_settings(20, 4, *settings, limits=limits, model_name="big")[0]["num_images_per_prompt"] == 20
    with pytest.raises(gr.Error) as refused_error:
        inputs.check_settings(21, 4, *settings, limits=limits, model_name="big")
    assert refused_error.value.message == ("Candidates must be at most 20 for big on this CPU server (about 12 s an "
                                           "image); got 21.")


# ----------------------------------------------------------------------------------------------------------------
# The selected model's world.json: examples, the style selector, the unseen-word note (issue 17)
# ----------------------------------------------------------------------------------------------------------------
EMOJI_LIKE = world.ModelWorld(
    examples=("red apple in twemoji style", "grinning face"), words=frozenset("red apple cat face in style".split()),
    styles=("noto", "noto mono", "twemoji", "fluent 3d"),
    style_aliases={"noto": ("google",), "noto mono": ("black and white", "monochrome"), "twemoji": ("twitter",),
                   "fluent 3d": ("3d",)},
)  # fmt: skip


def by_id(components: list[dict], elem_id: str) -> dict:
    return next(c for c in components if c["props"].get("elem_id") == elem_id)


def test_model_world_reads_world_json(checkpoints, tmp_path):
    shapes, emoji = (world.ModelWorld.read(checkpoints / name) for name in ("tiny", "tiny-emoji"))
    assert shapes.examples[0] == "a circle" and not shapes.styles and {"circle", "left", "red"} <= shapes.words
    assert emoji.examples[0] == "red apple in twemoji style" and "cat" in emoji.words and "circle" not in emoji.words
    assert emoji.styles == ("noto", "noto mono", "twemoji", "fluent 3d", "symbola")  # the tiny cache's five
    assert emoji.style_aliases["fluent 3d"] == ("3d",) and emoji.style_prompt == "{label} in {style} style"
    assert world.ModelWorld.read(tmp_path) == world.ModelWorld()  # no world.json: a model made before it existed
    assert world.ModelWorld().examples == world.EXAMPLES and world.ModelWorld().words is None
    (tmp_path / "world.json").write_text("{not json")
    assert world.ModelWorld.read(tmp_path) == world.ModelWorld()  # unreadable: ignored (logged), the model still loads
    (tmp_path / "world.json").write_text(json.dumps({"styles": ["a"], "style_prompt": "{label} only"}))
    assert world.ModelWorld.read(tmp_path) == world.ModelWorld()


@pytest.mark.parametrize(
    "prompt, style, expected",
    [
        ("red apple", "twemoji", "red apple in twemoji style"),
        ("  red apple ", "noto", "red apple in noto style"),
        ("red apple in twemoji style", "fluent 3d", "red apple in fluent 3d style"),  # replaced, not appended
        ("red apple in noto mono style", "noto", "red apple in noto style"),  # "noto mono" is not read as "noto"
        ("red apple in noto style", "noto mono", "red apple in noto mono style"),
        ("Red Apple in  Black and White style", "twemoji", "Red Apple in twemoji style"),  # an alias, any case
        ("red apple in 3d style", "twemoji", "red apple in twemoji style"),
        ("red apple in twitter style", world.NO_STYLE, "red apple"),  # "(any style)" removes it
        ("red apple in fluent 3d style", None, "red apple"),
        ("red apple", world.NO_STYLE, "red apple"),
        ("in noto style", "twemoji", "in twemoji style"),  # only the style phrase
        ("", "twemoji", "in twemoji style"),
        ("red apple in the style", "noto", "red apple in the style in noto style"),  # "the" is no style
        ("red apple in red style", "noto", "red apple in red style in noto style"),
    ],
)
def test_apply_style(prompt, style, expected):
    assert world.apply_style(prompt, style, EMOJI_LIKE) == expected
    assert world.split_style(expected, EMOJI_LIKE)[1] == (None if style == world.NO_STYLE else style)


def test_split_style_and_unknown_styles():
    assert world.split_style("cat face in monochrome style", EMOJI_LIKE) == ("cat face", "noto mono")
    assert world.split_style("cat face", EMOJI_LIKE) == ("cat face", None)
    assert world.split_style("a red circle in twemoji style", world.ModelWorld()) == (
        "a red circle in twemoji style", None)  # a world without styles has no style phrase
    with pytest.raises(gr.Error, match="Unknown style 'comic': expected one of noto, noto mono, twemoji, fluent 3d"):
        world.apply_style("cat", "comic", EMOJI_LIKE)
    with pytest.raises(gr.Error, match="This model has no styles"):
        world.apply_style("a circle", "noto", world.ModelWorld())
    custom = world.ModelWorld(styles=("ink",), style_prompt="{style} drawing of {label}")
    assert world.apply_style("a cat", "ink", custom) == "ink drawing of a cat"
    assert world.split_style("Ink drawing of a cat", custom) == ("a cat", "ink")


def test_unseen_words_note():
    shapes = world.ModelWorld(words=frozenset("a red circle hat".split()))
    assert world.unseen_words("A cat wearing a hat, a CAT!", shapes) == ["cat", "wearing"]  # once each, in order
    assert world.unseen_words_note("dalle-shapes", "a cat wearing a red hat", shapes) == (
        'The dalle-shapes model never saw "cat", "wearing" in training: it will draw what it knows instead.')
    assert world.unseen_words_note("dalle-shapes", "a red circle", shapes) == ""
    assert world.unseen_words_note("dalle-shapes", "", shapes) == ""
    assert world.unseen_words_note("old", "a cat", world.ModelWorld()) == ""  # no world.json: vocabulary unknown
    assert world.unseen_words_note("dalle-shapes", None, shapes) == ""


def test_examples_style_selector_and_note_follow_the_model(checkpoints):
    models = app_models.find_checkpoints(checkpoints)
    worlds = {name: world.ModelWorld.read(path) for name, path in models.items()}
    components = layout.build_demo(checkpoints).get_config_file()["components"]
    assert by_id(components, "examples")["props"]["samples"] == [[p] for p in worlds["tiny"].examples]
    assert by_id(components, "style")["props"]["visible"] is False  # the default model has no styles
    assert by_id(components, "unseen-words")["props"]["visible"] is False
    assert by_id(components, "prompt")["props"]["placeholder"] == "a circle"

    examples, style, note, prompt, edit_prompt = handlers.on_model_world(models, worlds, "tiny-emoji",
                                                                    "a red apple in 3d style")  # fmt: skip
    assert examples.raw_samples == [[p] for p in worlds["tiny-emoji"].examples]
    assert style.visible is True and style.value == "fluent 3d" and prompt.placeholder == "red apple in twemoji style"
    assert edit_prompt.placeholder == "red apple in twemoji style"
    assert [c[0] for c in style.choices] == [world.NO_STYLE, "noto", "noto mono", "twemoji", "fluent 3d", "symbola"]
    assert note.visible is True and note.value.startswith('The tiny-emoji model never saw "a" in training')
    examples, style, note, _, _ = handlers.on_model_world(models, worlds, "tiny", "a red circle")
    assert examples.raw_samples[0] == ["a circle"] and style.visible is False and note.visible is False
    assert handlers.on_model_world(models, worlds, "gone", "x") == (gr.skip(),) * 5
    alone = layout.build_demo(checkpoints / "tiny-emoji").get_config_file()["components"]  # the emoji model alone
    style = by_id(alone, "style")["props"]
    assert style["visible"] is True and style["value"] == world.NO_STYLE
    assert by_id(alone, "examples")["props"]["samples"][0] == ["red apple in twemoji style"]

    assert handlers.on_style(models, worlds, "tiny-emoji", "cat face", "twemoji") == "cat face in twemoji style"
    note, style = handlers.on_prompt_change(models, worlds, "tiny-emoji", "cat face in google style")
    assert note.visible is False and style.value == "noto"
    note, style = handlers.on_prompt_change(models, worlds, "tiny", "a cat in a hat")
    assert note.visible is True and '"cat", "in", "hat"' in note.value and style == gr.skip()


def test_a_model_without_world_json_gets_the_fallback_examples(tmp_path):
    for name in ("dalle-shapes", "own-model"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")
    components = layout.build_demo(tmp_path).get_config_file()["components"]
    assert by_id(components, "examples")["props"]["samples"] == [[p] for p in world.EXAMPLES]
    assert by_id(components, "style")["props"]["visible"] is False


def test_guidance_slider_starts_at_the_models_default(tmp_path):
    indexes = {"dalle-shapes": '{"default_guidance_scale": 3.0}', "none-saved": "{}", "broken": "{not json"}
    for name, text in indexes.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(text)
    components = layout.build_demo(tmp_path).get_config_file()["components"]
    slider = next(c for c in components if c["props"].get("label") == "Guidance scale (1 = off)")
    assert slider["props"]["value"] == 3.0
    models = app_models.find_checkpoints(tmp_path)
    assert handlers.on_model_change(models, "none-saved")[1].value == 1.0
    assert handlers.on_model_change(models, "broken")[1].value == 1.0  # its load error comes when it is used


def test_no_checkpoint_starts_with_a_message(tmp_path):
    demo = layout.build_demo(tmp_path)
    texts = [c["props"].get("value") or "" for c in demo.get_config_file()["components"] if c["type"] == "markdown"]
    assert any("No model found" in t and str(tmp_path) in t for t in texts)
    with pytest.raises(gr.Error, match="No model found"):
        run(handlers.generate, {}, None, "a red circle")


def test_app_starts_without_a_checkpoint(tmp_path):
    """`python app.py` before any model exists: it serves a page that says so, and logs it."""
    port, log = free_port(), tmp_path / "app.log"
    env = {**os.environ, app_models.CHECKPOINTS_ENV: str(tmp_path / "none"), "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                config = urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2).read().decode()
                break
            except OSError:
                time.sleep(0.3)
        assert "No model found" in config and "No model found" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_pipeline_cache_loads_once_across_threads(monkeypatch, checkpoints, tmp_path):
    calls, real = [], app_models.DallePipeline.from_pretrained

    def counting(path, **kwargs):
        calls.append(path)
        time.sleep(0.2)  # a slow load: the other threads must wait for it, not start their own
        return real(path, **kwargs)

    monkeypatch.setattr(app_models.DallePipeline, "from_pretrained", counting)
    copy = shutil.copytree(checkpoints / "tiny", tmp_path / "copy")  # a path no other test has loaded
    results = []
    threads = [threading.Thread(target=lambda: results.append(app_models.load_model(copy))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 4 and all(r is results[0] for r in results)
    model = results[0]
    assert model.variations.transformer is model.text_to_image.transformer  # one copy of the weights for all tabs
    assert model.inpaint.transformer is model.text_to_image.transformer and model.inpaint is model.inpaint


def test_broken_checkpoint_is_a_message(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    with pytest.raises(gr.Error, match="Could not load the model 'broken'"):
        run(handlers.generate, app_models.find_checkpoints(tmp_path), "broken", "a red circle")
    with pytest.raises(gr.Error, match="Unknown model"):
        run(handlers.generate, app_models.find_checkpoints(tmp_path), "../../etc", "a red circle")


# ----------------------------------------------------------------------------------------------------------------
# Text to images, called directly
# ----------------------------------------------------------------------------------------------------------------
def test_generate_ranks_streams_and_reproduces(models, monkeypatch):
    monkeypatch.setattr(sampling, "PREVIEW_INTERVAL", 0.0)  # a preview at every completed row
    outputs, (gallery, seed, status) = run(handlers.generate, models, "tiny", "a red circle")
    assert seed == 7 and "6 candidates -> best 3" in status and "seed 7" in status
    assert [caption.split(" · ")[0] for _, caption in gallery] == ["#1", "#2", "#3"]
    scores = [float(caption.split("CLIP ")[1]) for _, caption in gallery]
    assert scores == sorted(scores, reverse=True)
    previews = [out[0] for out in outputs[1:-1]]
    assert outputs[0][0] == [] and len(previews) == 3  # rows 1, 2, 3 of 4
    assert all(caption == "sampling…" for p in previews for _, caption in p)
    first = np.asarray(previews[0][0][0])  # one row of tokens = the top 4 of 16 pixel rows; the rest gray
    assert first.shape == (16, 16, 3) and (first[4:] == round(255 * app_models.PREVIEW_GRAY)).all()
    _, again = run(handlers.generate, models, "tiny", "a red circle")
    assert all(np.array_equal(a, b) for a, b in zip(pixels(gallery), pixels(again[0])))
    _, other = run(handlers.generate, models, "tiny", "a red circle", seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(pixels(gallery), pixels(other[0])))
    _, (_, random_seed, _) = run(handlers.generate, models, "tiny", "a red circle", randomize_seed=True)
    assert 0 <= random_seed <= inputs.MAX_SEED


@pytest.mark.parametrize(
    "prompt, note",
    [
        ("", "Empty prompt: sampling **unconditionally**"),
        ("   ", "Empty prompt"),
        (None, "Empty prompt"),
        ("a red circle " * 50, "the model reads 8, so it was truncated to"),
        ("x" * 100_000, "truncated"),
        ("三つの円", "non-Latin characters or emoji"),
        ("🔴🟦", "non-Latin characters or emoji"),
    ],
    ids=["empty", "spaces", "none", "long", "huge", "cjk", "emoji"],
)
def test_unusual_prompts_generate_with_a_note(models, prompt, note):
    _, (gallery, _, status) = run(handlers.generate, models, "tiny", prompt)
    assert len(gallery) == 3 and note in status


def test_truncation_note_shows_what_the_model_reads(models):
    _, (_, _, status) = run(handlers.generate, models, "tiny", "a red circle left of a blue square and three diamonds")
    assert "The prompt is 24 tokens; the model reads 8, so it was truncated to “a red circle" in status


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(candidates=0), "Candidates N must be in"),
        (dict(candidates=inputs.MAX_CANDIDATES + 1), "Candidates N must be in"),
        (dict(candidates=2.5), "whole number"),
        (dict(candidates="many"), "must be a whole number in \\[1, 64\\], got 'many'"),
        (dict(candidates=None), "is missing"),
        (dict(candidates="3"), "Candidates N must be a whole number in \\[1, 64\\], got '3'"),  # text is not converted
        (dict(keep=[2]), "Images kept k must be a whole number"),
        (dict(temperature=True), "Temperature must be a number in \\[0.01, 5.0\\], got True"),
        (dict(temperature="nan"), "Temperature must be a number"),
        (dict(keep=0), "Images kept k"),
        (dict(temperature=0.0), "Temperature"),
        (dict(temperature=float("nan")), "Temperature"),
        (dict(temperature=float("inf")), "Temperature"),
        (dict(top_k=-1), "Top-k"),
        (dict(top_p=0.0), "Top-p"),
        (dict(top_p=1.5), "Top-p"),
        (dict(guidance_scale=0.5), "Guidance scale"),
        (dict(seed=-1), "Seed"),
        (dict(seed=2**40), "Seed"),
    ],
)
def test_out_of_range_settings_are_messages(models, settings, message):
    with pytest.raises(gr.Error, match=message):
        run(handlers.generate, models, "tiny", "a red circle", **settings)


def test_negative_prompt_steers_the_guidance_branch(models):
    pipe = app_models.get_model(models, "tiny").text_to_image
    prefills = []  # the first transformer call of each request: [guidance branch ; conditional] text
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: prefills.append(kwargs["input_ids"]) if kwargs.get("image_ids") is None else None,
        with_kwargs=True)
    try:
        _, (gallery, _, status) = run(handlers.generate, models, "tiny", "a red circle", guidance_scale=3.0,
                                      negative_prompt="a circle")
        _, (plain, _, _) = run(handlers.generate, models, "tiny", "a red circle", guidance_scale=3.0,
                               negative_prompt="  ")
    finally:
        handle.remove()
    n = SETTINGS["candidates"]
    assert torch.equal(prefills[0][:n], pipe.encode_prompt(["a circle"]).repeat(n, 1))
    assert (prefills[1][:n] == pipe.transformer.config.pad_token_id).all()  # blank: no negative prompt
    assert json.loads(gallery[0][0].info["dalle-hf"])["negative_prompt"] == "a circle"
    assert "negative_prompt" not in json.loads(plain[0][0].info["dalle-hf"])
    _, (_, _, status) = run(handlers.generate, models, "tiny", "a red circle", guidance_scale=3.0,
                            negative_prompt="a red circle " * 50)
    assert "The negative prompt is 252 tokens; the model reads 8, so it was truncated" in status
    with pytest.raises(gr.Error, match="negative prompt steers classifier-free guidance"):
        run(handlers.generate, models, "tiny", "a red circle", guidance_scale=1.0, negative_prompt="a circle")


def test_keep_above_candidates_is_clamped_with_a_note(models):
    _, (gallery, _, status) = run(handlers.generate, models, "tiny", "a circle", candidates=2, keep=5)
    assert len(gallery) == 2 and "more than the candidates N=2: showing all 2" in status


def test_sampling_settings_reach_the_pipeline(models):
    _, (gallery, _, _) = run(handlers.generate, models, "tiny", "a circle", top_k=1, top_p=0.5, temperature=0.3,
                             guidance_scale=3.0)
    assert len(gallery) == 3


def test_pipeline_failure_is_a_message_and_the_next_request_works(models, monkeypatch):
    pipe = app_models.load_model(models["tiny"]).text_to_image

    def boom(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(type(pipe), "sample_image_tokens", boom)
    with pytest.raises(gr.Error, match="Text to images failed .*can't allocate memory.*still running"):
        run(handlers.generate, models, "tiny", "a circle")
    monkeypatch.undo()
    assert len(run(handlers.generate, models, "tiny", "a circle")[1][0]) == 3


def test_closing_the_request_stops_sampling(models, monkeypatch):
    previews, real = [], app_models.dalle_preview

    def slow_preview(*args):
        previews.append(time.monotonic())
        time.sleep(0.3)  # slow rows: the request goes away while the worker is still sampling
        return real(*args)

    monkeypatch.setattr(sampling, "PREVIEW_INTERVAL", 0.0)
    monkeypatch.setattr(app_models, "dalle_preview", slow_preview)
    stream = handlers.generate(models, "tiny", "a circle", **SETTINGS, seed=1, randomize_seed=False)
    next(stream), next(stream)  # the empty gallery, then the first partial grid
    stream.close()  # what gradio does when the browser goes away
    for worker in [t for t in threading.enumerate() if t.name == "dalle-hf-sampling"]:
        worker.join(timeout=10)
        assert not worker.is_alive()
    assert len(previews) <= 2  # row 3 of 4 was never sampled


def live_kv_caches() -> int:
    return sum(type(obj) is DalleKVCache for obj in gc.get_objects())  # type(): no proxy objects asked


def join_sampling_workers():
    for worker in [t for t in threading.enumerate() if t.name == "dalle-hf-sampling"]:
        worker.join(timeout=10)
        assert not worker.is_alive()


def test_cancelled_and_failed_requests_free_their_kv_cache(models, monkeypatch):
    """Issue 22: an exception kept with its traceback (which holds the sampling loop's frames) made a reference cycle
    through the KV cache that only the cycle collector freed, about 100 MB per request in the server. With the
    collector off, only reference counting frees memory, so a request that leaves such a cycle shows up here."""
    previews, real = [], app_models.dalle_preview

    def slow_preview(*args):
        previews.append(1)
        time.sleep(0.05)  # the request goes away while the worker is still sampling
        return real(*args)

    def failing_preview(*args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(sampling, "PREVIEW_INTERVAL", 0.0)
    run(handlers.generate, models, "tiny", "a circle")  # warm: loaded once, outside the count
    gc.collect()
    start = live_kv_caches()
    gc.disable()
    try:
        monkeypatch.setattr(app_models, "dalle_preview", slow_preview)
        for seed in range(10):
            stream = handlers.generate(models, "tiny", "a circle", **SETTINGS, seed=seed, randomize_seed=False)
            next(stream), next(stream)  # the empty gallery, then the first partial grid
            stream.close()  # what gradio does on job.cancel() or when the browser goes away
            join_sampling_workers()
        assert len(previews) < 10 * 3  # cancelled mid-way: not every row was previewed
        assert live_kv_caches() == start
        monkeypatch.setattr(app_models, "dalle_preview", failing_preview)  # a failure inside the sampling loop
        for seed in range(5):
            with pytest.raises(gr.Error, match="Text to images failed"):
                run(handlers.generate, models, "tiny", "a circle", seed=seed)
            join_sampling_workers()
        assert live_kv_caches() == start
    finally:
        gc.enable()


def test_sampling_errors_keep_their_traceback_as_a_note():
    """The worker drops the traceback (see above) but the log still shows where sampling failed."""
    def inner():
        try:
            raise KeyError("cause")
        except KeyError as e:
            raise RuntimeError("boom") from e

    try:
        inner()
    except RuntimeError as e:
        error = sampling.without_tracebacks(e)
    assert error.__traceback__ is None and error.__cause__.__traceback__ is None
    assert "Raised in the sampling thread:" in error.__notes__[0] and 'raise KeyError("cause")' in error.__notes__[0]


# ----------------------------------------------------------------------------------------------------------------
# Image variations and uploads, called directly
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def image_file(tmp_path):
    def make(mode="RGB", size=(40, 30), fmt="PNG", name="input"):
        color = {"RGB": (200, 30, 30), "RGBA": (200, 30, 30, 128), "L": 90, "LA": (90, 100), "CMYK": (0, 200, 200, 0),
                 "P": 3, "1": 1, "I;16": 40000, "F": 0.5}[mode]
        image = PIL.Image.new(mode, size, color)
        if mode == "P":
            image.info["transparency"] = 0
        path = tmp_path / f"{name}.{fmt.lower()}"
        image.save(path, fmt)
        return str(path)

    return make


def test_variations_rank_and_reproduce(models, image_file):
    path = image_file("RGB", (16, 16))
    _, (gallery, seed, status) = run(handlers.vary, models, "tiny", path, "", 2)
    assert len(gallery) == 3 and seed == 7 and "2/4 rows kept, 6 candidates -> best 3" in status
    assert all(" · sim " in caption for _, caption in gallery)
    _, again = run(handlers.vary, models, "tiny", path, "", 2)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(gallery), pixels(again[0])))
    _, (with_prompt, _, _) = run(handlers.vary, models, "tiny", path, "a red circle", 0)
    assert len(with_prompt) == 3


@pytest.mark.parametrize(
    "mode, fmt, size, note",
    [
        ("RGBA", "PNG", (16, 16), "composited on white"),
        ("LA", "PNG", (16, 16), "composited on white"),
        ("P", "PNG", (16, 16), "composited on white"),
        ("L", "PNG", (16, 16), "Grayscale image converted to RGB"),
        ("1", "PNG", (16, 16), "Grayscale image converted to RGB"),
        ("CMYK", "JPEG", (16, 16), "CMYK image converted to RGB"),
        ("I;16", "PNG", (16, 16), "converted to RGB"),
        ("F", "TIFF", (16, 16), "converted to RGB"),
        ("RGB", "JPEG", (300, 120), "Center-cropped to a square (300 x 120 -> 120 x 120)"),
        ("RGB", "WEBP", (64, 64), "Resized to the model's 16 x 16"),
        ("RGB", "GIF", (16, 16), "Variations"),  # no note needed: the summary
    ],
)
def test_image_modes_are_converted_with_a_note(models, image_file, mode, fmt, size, note):
    _, (gallery, _, status) = run(handlers.vary, models, "tiny", image_file(mode, size, fmt), "", 1)
    assert len(gallery) == 3 and (note in status or note == "Variations"), status


def test_bad_uploads_are_messages(models, image_file, tmp_path, monkeypatch):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(gr.Error, match="not an image this app can read"):
        run(handlers.vary, models, "tiny", str(text), "", 1)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(image_file("RGB", (64, 64))).read_bytes()[:60])
    with pytest.raises(gr.Error, match="could not be decoded|not an image"):
        run(handlers.vary, models, "tiny", str(truncated), "", 1)
    with pytest.raises(gr.Error, match="Upload an image first"):
        run(handlers.vary, models, "tiny", None, "", 1)
    with pytest.raises(gr.Error, match="Rows kept must be in \\[0, 3\\]"):
        run(handlers.vary, models, "tiny", image_file(), "", 4)
    monkeypatch.setattr(inputs, "MAX_UPLOAD_PIXELS", 100 * 100)
    with pytest.raises(gr.Error, match="too large \\(200 x 100\\)"):
        run(handlers.vary, models, "tiny", image_file("RGB", (200, 100)), "", 1)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # PIL's decompression-bomb guard
    with pytest.raises(gr.Error, match="too large"):
        run(handlers.vary, models, "tiny", image_file("RGB", (90, 90)), "", 1)


def test_high_bit_depth_gray_keeps_its_level():
    assert inputs.to_uint8(np.full((2, 2), 32768.0), "I;16").max() == 128
    assert inputs.to_uint8(np.full((2, 2), 0.5), "F").max() == 128
    assert inputs.to_uint8(np.array([[-1.0, 3.0]]), "F").tolist() == [[0, 255]]  # out of range: min-max


def test_large_image_is_reduced_before_conversion(image_file):
    image, notes = inputs.load_image(image_file("RGB", (3000, 2000), "JPEG"), 16)
    assert max(image.size) <= 64 and "Center-cropped to a square (3000 x 2000 -> 2000 x 2000)." in notes


# ----------------------------------------------------------------------------------------------------------------
# Edit (inpainting)
# ----------------------------------------------------------------------------------------------------------------
def editor_value(size=(16, 16), painted=(4, 4, 12, 12), layer_size=None):
    """What gr.ImageEditor(type="pil") hands the handler: a background and one RGBA layer painted in a box."""
    background = PIL.Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    layer = PIL.Image.new("RGBA", layer_size or size, (0, 0, 0, 0))
    if painted is not None:
        layer.paste((255, 0, 255, 255), painted)
    return {"background": background.convert("RGBA"), "layers": [layer], "composite": background}


def test_edit_repaints_only_the_mask_and_reproduces(models):
    value = editor_value()
    outputs, (gallery, seed, status) = run(handlers.edit, models, "tiny", value, "a red circle", False)
    assert len(gallery) == 3 and seed == 7 and "4/16 cells repainted, 6 candidates -> best 3" in status
    assert "(ranked by CLIP)" in status and "composited" not in status  # an opaque editor image
    assert all(text.startswith(f"#{i + 1} · CLIP ") and " · LL " not in text for i, (_, text) in enumerate(gallery))
    painted = np.zeros((16, 16), dtype=bool)
    painted[4:12, 4:12] = True
    original = np.asarray(value["background"].convert("RGB"))
    for edited in pixels(gallery):
        np.testing.assert_array_equal(edited[~painted], original[~painted])
    _, again = run(handlers.edit, models, "tiny", value, "a red circle", False)
    assert all(np.array_equal(a, b) for a, b in zip(pixels(gallery), pixels(again[0])))
    _, (_, _, grown) = run(handlers.edit, models, "tiny", editor_value(painted=(4, 4, 8, 8)), "a red circle", True)
    assert "9/16 cells repainted" in grown  # one cell and the ring around it
    info = json.loads(gallery[0][0].info["dalle-hf"])
    assert (info["task"], info["prompt"], info["rank"]) == ("edit", "a red circle", 1)


def test_edit_ranks_by_clip_by_default(models, checkpoints):
    """CLIP alone ranked edits best (0.550 against 0.500 for CLIP + likelihood on 240 test edits): the Edit tab's
    default; the likelihood rankings stay selectable."""
    _, (_, _, status) = run(handlers.edit, models, "tiny", editor_value(), "a red circle", False)
    assert "(ranked by CLIP)" in status, status
    radio = by_id(layout.build_demo(checkpoints).get_config_file()["components"], "edit-rank")["props"]
    assert radio["value"] == "CLIP" and [c[0] for c in radio["choices"]] == ["CLIP", "CLIP + likelihood", "likelihood"]


def test_edit_rank_by_reorders_the_same_candidates(models):
    """The same seed draws the same 6 candidates; the ranking only chooses and orders the 3 kept, and the captions
    show the scores it computed."""
    value = editor_value()
    captions = {}
    for rank_by in ("CLIP", "likelihood", "CLIP + likelihood"):
        _, (gallery, _, status) = run(handlers.edit, models, "tiny", value, "a red circle", False, rank_by=rank_by)
        assert f"(ranked by {rank_by})" in status, status
        captions[rank_by] = [text for _, text in gallery]

    def scores(texts, name):
        return [float(t.split(f"{name} ")[1].split(" ·")[0]) for t in texts]

    assert all(" · CLIP " in t and " · LL " not in t for t in captions["CLIP"])
    assert all(" · LL " in t and " · CLIP " not in t for t in captions["likelihood"])
    assert all(" · CLIP " in t and " · LL " in t for t in captions["CLIP + likelihood"])
    by_clip, by_ll = scores(captions["CLIP"], "CLIP"), scores(captions["likelihood"], "LL")
    assert by_clip == sorted(by_clip, reverse=True) and by_ll == sorted(by_ll, reverse=True)
    both = captions["CLIP + likelihood"]
    assert by_clip[0] >= max(scores(both, "CLIP")) and by_ll[0] >= max(scores(both, "LL"))  # each ranking's best
    with pytest.raises(gr.Error, match="Rank by must be one of: CLIP, CLIP \\+ likelihood, likelihood; got 'both'"):
        run(handlers.edit, models, "tiny", value, "a red circle", False, rank_by="both")


def test_edit_of_a_large_upload_scales_the_mask_with_it(models):
    _, (gallery, _, status) = run(handlers.edit, models, "tiny", editor_value((128, 128), (0, 0, 64, 128)), "", False)
    assert "8/16 cells repainted" in status and len(gallery) == 3  # the left half, at 16 px


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "Upload an image to edit first"),
        ({"background": None, "layers": [], "composite": None}, "Upload an image to edit first"),
        (editor_value(painted=None), "Nothing is painted"),
        ({**editor_value(), "layers": []}, "Nothing is painted"),
        (editor_value(layer_size=(20, 16)), "The painted mask is 20 x 16 but the image is 16 x 16"),
        (editor_value(painted=(0, 0, 16, 16)), "The mask touches all 4 x 4 cells"),
        (editor_value(painted=(1, 1, 15, 15)), "The mask touches all 4 x 4 cells"),  # every cell, not every pixel
    ],
)
def test_bad_masks_are_messages(models, value, message):
    with pytest.raises(gr.Error, match=re.escape(message)):
        run(handlers.edit, models, "tiny", value, "a red circle", False)


def test_use_as_input_continues_editing(models):
    assert handlers.send_to_editor(None, 0) == (gr.skip(), gr.skip())
    _, (gallery, _, _) = run(handlers.edit, models, "tiny", editor_value(), "a red circle", False)
    value, tabs = handlers.send_to_editor(gallery, 1)
    assert isinstance(tabs, gr.Tabs) and tabs.selected == "edit" and value["layers"] == []
    assert np.array_equal(np.asarray(value["background"]), pixels(gallery)[1])
    value["layers"] = [editor_value(painted=(0, 0, 4, 4))["layers"][0]]
    _, (second, _, status) = run(handlers.edit, models, "tiny", value, "a blue square", False)
    assert "1/16 cells repainted" in status
    outside = np.ones((16, 16), dtype=bool)
    outside[:4, :4] = False
    assert all(np.array_equal(im[outside], pixels(gallery)[1][outside]) for im in pixels(second))


# ----------------------------------------------------------------------------------------------------------------
# End to end: python app.py in a subprocess, gradio_client
# ----------------------------------------------------------------------------------------------------------------
def predict_generate(client, prompt, seed=3, **settings):
    s = {**SETTINGS, **settings}
    return client.predict("tiny", prompt, s["candidates"], s["keep"], s["temperature"], s["top_k"], s["top_p"],
                          s["guidance_scale"], seed, False, api_name="/generate")


@pytest.mark.latest
def test_client_text_to_grid_and_variations(client):
    from gradio_client import handle_file

    gallery, seed, status = predict_generate(client, "a red circle")
    assert seed == 3 and "6 candidates -> best 3" in status and len(gallery) == 3
    images = [PIL.Image.open(item["image"]) for item in gallery]
    assert all(im.format == "PNG" and im.size == (16, 16) and im.mode == "RGB" for im in images)  # downloadable PNGs
    assert all(item["caption"].startswith(f"#{i + 1} · CLIP ") for i, item in enumerate(gallery))
    info = json.loads(images[0].info["dalle-hf"])  # the PNG says how it was made
    assert (info["prompt"], info["seed"], info["rank"], info["model"]) == ("a red circle", 3, 1, "tiny")
    assert info["num_images_per_prompt"] == 6
    assert info["score"] == pytest.approx(float(gallery[0]["caption"].split("CLIP ")[1]), abs=0.01)
    again, _, _ = predict_generate(client, "a red circle")
    assert all(np.array_equal(a, b) for a, b in zip(pixels(gallery), pixels(again)))
    assert again[0]["image"] != gallery[0]["image"]  # one file per request: gradio rewrites equal files in place
    steered, _, _ = client.predict("tiny", "a red circle", 2, 1, 1.0, 0, 1.0, 3.0, 3, False, "a circle",
                                   api_name="/generate")  # the negative prompt is the last, optional, input
    assert json.loads(PIL.Image.open(steered[0]["image"]).info["dalle-hf"])["negative_prompt"] == "a circle"

    variations, seed, status = client.predict("tiny", handle_file(gallery[0]["image"]), "a red circle", 2, 4, 2, 1.0,
                                              0, 1.0, 1.0, 5, False, api_name="/variations")
    assert seed == 5 and len(variations) == 2 and "2/4 rows kept" in status
    assert all(PIL.Image.open(item["image"]).size == (16, 16) for item in variations)


def test_client_bad_input_is_a_message_and_the_app_keeps_serving(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, _, status = predict_generate(client, "")
    assert "Empty prompt" in status
    _, _, status = predict_generate(client, "🎨 " * 300)
    assert "truncated" in status and "non-Latin" in status
    with pytest.raises(AppError, match="Candidates N must be in \\[1, 64\\], got 0"):
        predict_generate(client, "a circle", candidates=0)
    with pytest.raises(AppError, match="Temperature must be in \\[0.05, 2.0\\], got 10.0"):  # the slider's range
        predict_generate(client, "a circle", temperature=10.0)
    not_image = tmp_path / "document.txt"
    not_image.write_text("hello")
    with pytest.raises(AppError, match="not an image this app can read"):
        client.predict("tiny", handle_file(str(not_image)), "", 1, 4, 2, 1.0, 0, 1.0, 1.0, 5, False,
                       api_name="/variations")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + os.urandom(21 * 1024 * 1024))  # over the app's 20 MB upload limit
    with pytest.raises(ValueError, match="exceeds the maximum file size of 20971520 bytes"):  # checked before upload
        client.predict("tiny", handle_file(str(big)), "", 1, 4, 2, 1.0, 0, 1.0, 1.0, 5, False, api_name="/variations")
    rgba = tmp_path / "rgba.png"
    PIL.Image.new("RGBA", (50, 20), (0, 0, 255, 100)).save(rgba)
    variations, _, status = client.predict("tiny", handle_file(str(rgba)), "", 1, 4, 2, 1.0, 0, 1.0, 1.0, 5, False,
                                           api_name="/variations")
    assert len(variations) == 2 and "composited on white" in status and "Center-cropped" in status
    assert len(predict_generate(client, "a circle")[0]) == 3  # still serving


@pytest.mark.parametrize("bad", [None, "nan", "abc", [1, 2], True], ids=["none", "nan", "abc", "list", "bool"])
def test_client_wrong_types_are_the_apps_messages(client, bad):
    """Issue 22: Gradio's sliders compared null or text with their bounds before any handler ran, and answered with
    its generic "the upstream Gradio app has raised an exception"; each setting now names itself and its range."""
    from gradio_client.exceptions import AppError

    number = "is missing: expected a" if bad is None else "must be a"
    expected = {
        "candidates": f"Candidates N {number} number in [1, 64]",
        "keep": f"Images kept k {number} number in [1, 16]",
        "temperature": f"Temperature {number} number in [0.05, 2.0]",
        "top_k": f"Top-k {number} number in [0, 512]",
        "top_p": f"Top-p {number} number in [0.05, 1.0]",
        "guidance_scale": f"Guidance scale {number} number in [1.0, 10.0]",
    }
    for name, message in expected.items():
        with pytest.raises(AppError) as error:
            predict_generate(client, "a circle", **{name: bad})
        assert str(error.value).startswith(message), (name, str(error.value))
    if bad is not None:  # an empty seed is a random one
        with pytest.raises(AppError, match="Seed must be a whole number in \\[0, 2147483647\\]"):
            predict_generate(client, "a circle", seed=bad)
    if bad is not True:
        with pytest.raises(AppError, match="Randomize seed must be true or false"):
            client.predict("tiny", "a circle", 2, 1, 1.0, 0, 1.0, 1.0, 3, bad, api_name="/generate")
    if not isinstance(bad, str | None):  # "nan" is a prompt like any other
        with pytest.raises(AppError, match="Prompt must be text"):
            predict_generate(client, bad)
    if bad is not None:
        with pytest.raises(AppError, match="Rows of image tokens kept must be a number in \\[0, 3\\]"):
            client.predict("tiny", None, "", bad, 4, 2, 1.0, 0, 1.0, 1.0, 5, False, api_name="/variations")


def test_client_examples_style_selector_and_note_per_model(client):
    """Issue 17, against `python app.py` serving a shapes-like and an emoji-like model: switching the model switches
    the examples and shows the style selector; a style writes itself into the prompt; the note names unseen words."""
    examples, style, note, prompt, edit_prompt = client.predict("tiny-emoji", "red apple", api_name="/model_world")
    assert examples["samples"][:2] == [["red apple in twemoji style"], ["cat face in fluent 3d style"]]
    assert style["visible"] is True and style["value"] == world.NO_STYLE and "twemoji" in str(style["choices"])
    assert note["visible"] is False and prompt["placeholder"] == "red apple in twemoji style"
    assert edit_prompt["placeholder"] == "red apple in twemoji style"
    examples, style, note, _, edit_prompt = client.predict("tiny", "red apple", api_name="/model_world")
    assert examples["samples"][0] == ["a circle"] and style["visible"] is False
    assert edit_prompt["placeholder"] == "a circle"
    assert note["visible"] is True and note["value"].startswith('The tiny model never saw "apple"')

    assert client.predict("tiny-emoji", "red apple", "twemoji", api_name="/apply_style") == "red apple in twemoji style"
    assert client.predict("tiny-emoji", "red apple in twemoji style", "symbola",
                          api_name="/apply_style") == "red apple in symbola style"
    assert client.predict("tiny-emoji", "red apple in 3d style", world.NO_STYLE, api_name="/apply_style") == "red apple"
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="Unknown style 'comic': expected one of noto, noto mono, twemoji"):
        client.predict("tiny-emoji", "red apple", "comic", api_name="/apply_style")
    with pytest.raises(AppError, match="This model has no styles"):
        client.predict("tiny", "a red circle", "twemoji", api_name="/apply_style")
    with pytest.raises(AppError, match="Style must be text, got 3"):
        client.predict("tiny-emoji", "red apple", 3, api_name="/apply_style")

    note, style = client.predict("tiny", "a cat wearing a hat", api_name="/prompt_notes")
    assert note["visible"] is True
    assert note["value"] == ('The tiny model never saw "cat", "wearing", "hat" in training: it will draw what it '
                             "knows instead.")
    note, style = client.predict("tiny-emoji", "cat face in twitter style", api_name="/prompt_notes")
    assert note["visible"] is False and style["value"] == "twemoji"
    gallery, _, status = client.predict("tiny-emoji", "cat face in twemoji style", 2, 2, 1.0, 0, 1.0, 1.0, 3, False,
                                        api_name="/generate")
    assert len(gallery) == 2 and "2 candidates -> best 2" in status


def test_client_api_is_the_three_tasks(client):
    assert set(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == {
        "/edit",
        "/generate",
        "/variations",
    }


def test_server_is_local_and_queued(server):
    assert server.startswith("http://127.0.0.1:")
    config = json.loads(urllib.request.urlopen(server + "config", timeout=10).read())
    generate = next(d for d in config["dependencies"] if d.get("api_name") == "generate")
    assert generate["queue"] is not False


# ----------------------------------------------------------------------------------------------------------------
# Hostile requests: raw JSON to /gradio_api/call/<endpoint>, as an attacker sends them
# ----------------------------------------------------------------------------------------------------------------
META = {"_type": "gradio.FileData"}
RAW_SETTINGS = [2, 1, 1.0, 0, 1.0, 1.0, 5, False]  # candidates ... randomize seed, as the API takes them


def call_api(server: str, endpoint: str, data: list) -> list[tuple[str, object]]:
    """POST `{"data": data}` to /gradio_api/call/<endpoint> and read its event stream: [(event, data), ...]."""
    request = urllib.request.Request(f"{server}gradio_api/call/{endpoint}", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=10).read())["event_id"]
    with urllib.request.urlopen(f"{server}gradio_api/call/{endpoint}/{event_id}", timeout=120) as stream:
        text = stream.read().decode()
    return [(event, json.loads(data)) for event, data in re.findall(r"event: (\w+)\ndata: (.*)", text)]


def upload(server: str, path: Path) -> str:
    """Upload a file as the browser does; returns its server path (in Gradio's upload folder)."""
    import httpx

    with open(path, "rb") as f:
        response = httpx.post(f"{server}gradio_api/upload", files={"files": (path.name, f)}, timeout=30)
    response.raise_for_status()
    return response.json()[0]


def refused(events: list[tuple[str, object]]) -> str:
    """The message of a refused call; fails if it produced anything or answered without a message."""
    assert [event for event, _ in events] == ["error"], events  # no "generating", no "complete": no image
    message = events[0][1] and events[0][1].get("error")
    assert message, events  # never {"error": null}
    return message


def image_input(endpoint: str, file: dict) -> list:
    """The inputs of /variations or /edit with `file` as the image (the edit: as background, layer and composite)."""
    if endpoint == "variations":
        return ["tiny", file, "", 2, *RAW_SETTINGS]
    return ["tiny", {"background": file, "layers": [file], "composite": file, "id": None}, "a circle", False,
            *RAW_SETTINGS, "CLIP"]


@pytest.mark.parametrize("meta", [False, True], ids=["no-meta", "meta"])
@pytest.mark.parametrize("endpoint", ["variations", "edit"])
@pytest.mark.parametrize("target", ["png", "hostname"])
def test_api_refuses_files_it_did_not_receive(server, tmp_path, endpoint, meta, target):
    """An image input names its file by a server path: a PNG outside the upload folder or /etc/hostname is refused
    with a message naming the input, with or without Gradio's "meta", and nothing is generated from it."""
    path = tmp_path / "outside.png"
    PIL.Image.new("RGB", (40, 70), "red").save(path)
    file = {"path": str(path) if target == "png" else "/etc/hostname", **({"meta": META} if meta else {})}
    message = refused(call_api(server, endpoint, image_input(endpoint, file)))
    expected = "is not a file this app received" if meta or endpoint == "variations" else 'must carry "meta"'
    assert expected in message and ("upload" in message), message
    assert ("Image" if endpoint == "variations" else "The image to edit") in message


@pytest.mark.parametrize("forged", ["file:///etc/passwd", "http://127.0.0.1:1/x.png", "app.py", "checkpoints",
                                    "/tmp/gradio/../../etc/passwd", "data:image/png;base64,iVBORw0KGgo="])
def test_api_refuses_forged_paths(server, forged):
    path = str(REPO / forged) if forged in ("app.py", "checkpoints") else forged
    file = {"path": path, "meta": META} if not forged.startswith("data:") else {"path": None, "url": forged}
    for endpoint in ("variations", "edit"):
        message = refused(call_api(server, endpoint, image_input(endpoint, file)))
        assert "upload" in message, message


def test_api_refuses_uploads_that_are_not_images_or_too_large(server, tmp_path):
    """Uploaded files that are not images, or too large to decode safely, are refused with a message on both
    endpoints (the edit answered {"error": null} for them)."""
    text = tmp_path / "hostname.png"
    text.write_text("not an image")
    big = tmp_path / "big.png"
    PIL.Image.new("1", (15_000, 15_000)).save(big)  # 225 megapixels, a few kB as a PNG
    for path, expected in ((text, "not an image this app can read"), (big, "too large")):
        file = {"path": upload(server, path), "meta": META}
        for endpoint in ("variations", "edit"):
            assert expected in refused(call_api(server, endpoint, image_input(endpoint, file)))


def test_api_bad_settings_name_the_setting(server):
    message = refused(call_api(server, "edit", ["tiny", None, "a circle", False, *RAW_SETTINGS, "best"]))
    assert message == "Rank by must be one of: CLIP, CLIP + likelihood, likelihood; got 'best'."
    message = refused(call_api(server, "generate", ["best", "a circle", *RAW_SETTINGS, ""]))
    assert message == "Model must be one of: tiny, tiny-emoji; got 'best'."
    message = refused(call_api(server, "generate", ["tiny", "a circle", *RAW_SETTINGS]))  # no negative prompt
    assert message.startswith("Expected 11 inputs (Model, Prompt, Candidates N,") and message.endswith("got 10.")


def test_a_refused_request_logs_one_line(server):
    log = Path(_SHARED["log"].name)
    before = log.read_text().splitlines()
    prompt = "a \u202e circle\x07\x1b" + "x" * 2000
    message = refused(call_api(server, "generate", ["tiny", prompt, 2, 1, 10.0, 0, 1.0, 1.0, 5, False, ""]))
    assert message == "Temperature must be in [0.05, 2.0], got 10.0."
    time.sleep(0.5)
    added = log.read_text().splitlines()[len(before):]
    assert 1 <= len(added) <= 3, added
    line = next(line for line in added if "Refused generate" in line)
    assert "Temperature must be in" in line and len(line) < 300
    assert "'a \\u202e circle\\x07\\x1bxxx" in line and "\u202e" not in line and "\x07" not in line


def test_a_long_prompt_with_control_characters_is_noted_escaped(server):
    """The notes and toasts quote a prompt with its control and bidirectional-override characters escaped, and say
    that a long prompt was cut to its first 1,000 characters."""
    prompt = "a \u202ecircle\x07\x1b\x00 " + "x" * 100_000
    events = call_api(server, "generate", ["tiny", prompt, *RAW_SETTINGS, ""])
    assert events[-1][0] == "complete", events
    status = events[-1][1][2]
    assert "The prompt is 100,013 characters: only its first 1,000 are used." in status
    assert "\\u202e" in status and not any(c in status for c in "\u202e\x07\x1b\x00")


# ----------------------------------------------------------------------------------------------------------------
# The checks themselves, called directly
# ----------------------------------------------------------------------------------------------------------------
def test_image_inputs_open_nothing_outside_the_upload_folder(monkeypatch, tmp_path):
    from gradio.components.image_editor import EditorData
    from gradio.components.gallery import GalleryData
    from gradio.data_classes import FileData, ImageData

    def no_open(*args, **kwargs):
        raise AssertionError(f"opened {args}")

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    monkeypatch.setattr(PIL.Image, "open", no_open)
    link = tmp_path / "uploads" / "link.png"
    link.parent.mkdir()
    link.symlink_to("/etc/hostname")  # inside the folder, pointing out of it
    for path in ("/etc/hostname", str(tmp_path / "uploads" / ".." / "x.png"), str(link)):
        with pytest.raises(gr.Error, match="is not a file this app received"):
            app_components.ImageUpload(type="filepath", render=False).preprocess(ImageData(path=path))
        with pytest.raises(gr.Error, match="is not a file this app received"):
            app_components.CheckedImageEditor(render=False).preprocess(EditorData(background=FileData(path=path)))
        with pytest.raises(gr.Error, match="is not a file this app received"):
            gallery = GalleryData.model_validate([{"image": {"path": path}}])
            app_components.CheckedGallery(render=False).preprocess(gallery)


def test_upload_component_reports_non_images_and_large_images(tmp_path, monkeypatch):
    from gradio.data_classes import ImageData

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    text = tmp_path / "payload.png"
    text.write_text("<svg>not really</svg>")
    component = app_components.ImageUpload(type="filepath", image_mode=None, render=False)
    assert component.get_block_name() == "image"
    with pytest.raises(gr.Error, match="not an image"):
        component.preprocess(ImageData(path=str(text), orig_name="payload.png"))
    monkeypatch.setattr(inputs, "MAX_UPLOAD_PIXELS", 100 * 100)
    PIL.Image.new("RGB", (200, 100)).save(tmp_path / "large.png")
    with pytest.raises(gr.Error, match="too large \\(200 x 100\\)"):
        component.preprocess(ImageData(path=str(tmp_path / "large.png")))


def test_send_to_variations(tmp_path):
    assert handlers.send_to_variations(None, 0) == (gr.skip(), gr.skip())
    for name in "ab":
        PIL.Image.new("RGB", (16, 16)).save(tmp_path / f"{name}.png")
    gallery = [(str(tmp_path / "a.png"), "#1"), (str(tmp_path / "b.png"), "#2")]
    image, tabs = handlers.send_to_variations(gallery, 1)
    assert image == gallery[1][0] and isinstance(tabs, gr.Tabs) and tabs.selected == "variations"
    assert handlers.send_to_variations(gallery, 9)[0] == gallery[1][0]  # a stale selection: the last image


def test_gallery_to_editor_checks_the_image(tmp_path, monkeypatch):
    """"Edit the selected image" on a gallery item that is not an image, or too large, is a message (it was an
    HTTP 500, and an 8000 x 8000 upload was written onto the canvas)."""
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(gr.Error, match="The selected image is not an image"):
        handlers.send_to_editor([(str(text), None)], 0)
    with pytest.raises(gr.Error, match="The selected image is not an image"):
        handlers.send_to_variations([(str(text), None)], 0)
    monkeypatch.setattr(inputs, "MAX_UPLOAD_PIXELS", 100 * 100)
    PIL.Image.new("RGB", (200, 100)).save(tmp_path / "large.png")
    with pytest.raises(gr.Error, match="The selected image is too large \\(200 x 100\\)"):
        handlers.send_to_editor([(str(tmp_path / "large.png"), None)], 0)
    PIL.Image.new("RGB", (16, 16), "red").save(tmp_path / "ok.png")
    value, tabs = handlers.send_to_editor([(str(tmp_path / "ok.png"), None)], 0)
    assert value["background"].size == (16, 16) and value["layers"] == [] and tabs.selected == "edit"


def test_prompt_notes_escape_control_characters(models):
    model = app_models.get_model(models, "tiny")
    prompt, notes = inputs.check_prompt(model, "a \u202ecircle\x07\x1b\x00 " + "x" * 100_000)
    assert len(prompt) == 1000 and notes[0] == "The prompt is 100,013 characters: only its first 1,000 are used."
    truncated = next(n for n in notes if "so it was truncated to" in n)
    assert "“a \\u202ecir" in truncated and "\u202e" not in truncated  # the tiny model reads 8 tokens
    assert inputs.printable("\x07\x1b\x00\u202e\u2066") == "\\x07\\x1b\\x00\\u202e\\u2066"
    assert inputs.printable("a\u200db <i>") == "a\u200db &lt;i&gt;"  # emoji joiners stay; HTML is escaped


def test_refusals_log_one_line_and_failures_one_traceback(caplog):
    """`CheckedBlocks`: a refused request (a `gr.Error`) logs one line with the prompt shortened and escaped, and no
    traceback; an unexpected error logs its traceback once and answers with a message, not `{"error": null}`."""
    import asyncio

    def failing(text):
        raise RuntimeError("internal detail")

    def refusing(text):
        raise gr.Error("No.")

    with app_components.CheckedBlocks() as demo:
        prompt, out = app_components.CheckedTextbox(label="Prompt"), gr.Textbox()
        gr.Button().click(failing, prompt, out, api_name="fail")
        gr.Button().click(refusing, prompt, out, api_name="refuse")
    for index, message in ((1, "No."), (0, "The server failed on this request (RuntimeError); it was logged.")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dalle_hf.app"), pytest.raises(gr.Error) as error:
            asyncio.run(demo.process_api(demo.fns[index], ["a \u202e" + "x" * 2000]))
        assert error.value.message.startswith(message) and error.value.print_exception is False
        assert len(caplog.records) == 1, caplog.records
        record = caplog.records[0]
        assert "'a \\u202exxx" in record.getMessage() and len(record.getMessage()) < 200
        if index == 1:
            assert record.getMessage() == f"Refused refuse (prompt {record.args[1]}): No." and record.exc_info is None
        else:
            assert record.getMessage().startswith("Failed fail") and record.exc_info[0] is RuntimeError


def test_app_py_is_the_short_entry_point_and_imports_run_one_way():
    """`app.py` stays a short entry point; the app's parts import the library, and nothing in the library imports
    the app (the data flows down: pipelines, then the app)."""
    import ast

    assert len((REPO / "app.py").read_text().splitlines()) < 150

    def imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    package = REPO / "dalle_hf"
    for path in package.rglob("*.py"):
        if (package / "app") not in path.parents:
            assert not any(m == "dalle_hf.app" or m.startswith("dalle_hf.app.") for m in imports(path)), path
    parts = {p.stem: {m.split(".")[-1] for m in imports(p) if m.startswith("dalle_hf.app.")}
             for p in (package / "app").glob("*.py")}
    order = ["inputs", "models", "sampling", "world", "components", "handlers", "layout"]  # each imports only earlier
    assert set(order) | {"__init__"} == set(parts)
    for i, name in enumerate(order):
        assert parts[name] <= set(order[:i]), (name, parts[name])
