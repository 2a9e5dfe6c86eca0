"""A converted DALL·E mini folder published with `dalle-hf push` (captured, offline) loads and generates without
dalle-hf (trust_remote_code) with dalle-hf's pixels, as does the converted folder itself; dalle-hf's own classes load
the repository offline from the Hub cache without trust_remote_code, running none of its code; its card credits the
sources, and `dalle-hf export-space` writes a GPU Space for it (the hub tests' pattern: tests/test_hub.py)."""

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard, SpaceCard, constants
from huggingface_hub.errors import LocalEntryNotFoundError

from dalle_hf.cli import main as cli_main
from dalle_hf.convert_dalle_mini import save_converted_pipeline
from dalle_hf.hub import export_for_hub, module_files
from dalle_hf.model_card import CARD_DATA_NAME, DALLE_MINI_SAMPLE_PROMPTS, dalle_mini_card_data
from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline
from tests.dalle_bart_reference import randomize, tiny_bart_config, tiny_vqgan, write_tiny_bart_tokenizer

from .conftest import tiny_clip
from .test_hub import (  # noqa: F401 (venv_without_dalle_hf: a fixture)
    SHA,
    FakeHub,
    run_without_dalle_hf,
    use_hf_cache,
    venv_without_dalle_hf,
    write_hf_cache,
)

REPO_ID = "org/dalle-mini-hf"
COMMAND = "dalle-hf convert-dalle-mini --flax dalle-mini --vqgan vqgan_imagenet_f16_16384 --out dalle-mini-hf"
PROMPT = "a cat wearing a hat"
SAMPLING = dict(num_images_per_prompt=3, num_images_to_keep=2, top_k=64)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer) -> Path:
    """A folder written by the converter's `save_converted_pipeline` (as `--flax DIR --vqgan DIR` writes it): a tiny
    random DALL·E mini, a VQGAN with its encoder, a tiny CLIP."""
    root = tmp_path_factory.mktemp("converted")
    write_tiny_bart_tokenizer(root / "bpe")
    clip_model, clip_processor = tiny_clip(tokenizer)
    clip_model.save_pretrained(root / "clip")
    clip_processor.save_pretrained(root / "clip")
    transformer = randomize(DalleBartForImageGeneration(tiny_bart_config()))
    save_converted_pipeline(
        str(root / "dalle-mini-hf"), config=transformer.config, transformer_state_dict=transformer.state_dict(),
        vae=tiny_vqgan(), tokenizer_dir=str(root / "bpe"), clip_dir=str(root / "clip"),
        card_info={"source": "dalle-mini/dalle-mini", "command": COMMAND},
    )  # fmt: skip
    return root / "dalle-mini-hf"


@pytest.fixture(scope="module")
def published(converted, tmp_path_factory):
    hub = FakeHub()
    with pytest.MonkeyPatch.context() as monkeypatch:
        hub.install(monkeypatch)
        assert cli_main(["push", str(converted), REPO_ID]) == 0
    cache = tmp_path_factory.mktemp("hf-cache")
    write_hf_cache(cache, REPO_ID, hub.commits[0]["files"])
    return hub, cache


def test_push_publishes_the_code_and_a_card_that_credits_the_sources(published, converted, tmp_path):
    hub, _ = published
    files = hub.commits[0]["files"]
    code = set(module_files("pipeline_dalle_mini"))
    assert {"pipeline_dalle_mini.py", "pipeline_dalle_inpaint.py", "pipeline_dalle_variation.py"} <= code
    assert {f"transformer/{name}" for name in module_files("modeling_dalle_bart")} == {
        "transformer/configuration_dalle_bart.py", "transformer/modeling_dalle_bart.py", "transformer/quantization.py"}
    expected = code | {f"transformer/{name}" for name in module_files("modeling_dalle_bart")}
    assert {name for name in files if name.endswith(".py")} == expected  # no code for diffusers' own VQModel
    assert CARD_DATA_NAME not in files and "samples.png" not in files  # a converted model's grid is not drawn here
    weights = ("transformer/model.safetensors", "vae/diffusion_pytorch_model.safetensors", "tokenizer/vocab.json")
    for name in weights:
        assert files[name] == (converted / name).read_bytes(), name
    index = json.loads(files["model_index.json"])
    assert index["_class_name"] == ["pipeline_dalle_mini", "DalleMiniPipeline"]
    assert index["transformer"] == ["modeling_dalle_bart", "DalleBartForImageGeneration"]
    assert index["vae"] == ["diffusers", "VQModel"] and index["tokenizer"][0] == "transformers"
    assert index["default_guidance_scale"] == 10.0 and index["vae_has_encoder"] is True

    (tmp_path / "README.md").write_bytes(files["README.md"])
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "dalle-mini/dalle-mini" and data["license"] == "apache-2.0"
    assert data["pipeline_tag"] == "text-to-image" and "dalle-mini" in data["tags"]
    assert [w["text"] for w in data["widget"]] == DALLE_MINI_SAMPLE_PROMPTS
    for text in ("## Conversion", "Boris Dayma et al.", "Esser, Rombach and Ommer", "taming-transformers",
                 f"```bash\n{COMMAND}\n```", "Verified:", "min-dalle 0.4.11", "token for token",
                 f'DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)'):  # fmt: skip
        assert text in card.text, text
    assert "trained on a CPU" not in card.text  # the lines about models trained here do not apply
    mega = dalle_mini_card_data(mega=True, command=COMMAND, from_min_dalle=True, vae_has_encoder=False)
    assert mega["base_model"] == "dalle-mini/dalle-mega" and "kuprel/min-dalle" in json.dumps(mega["conversion"])
    assert any("decoder only" in line for line in mega["limitations"])


def test_push_writes_this_dalle_hfs_code_over_the_folders(converted, tmp_path):
    """A converted folder carries the code of the dalle-hf that converted it; the pushed copy, the installed one's."""
    import dalle_hf

    source = tmp_path / "source"
    shutil.copytree(converted, source)
    for name in ("pipeline_dalle_mini.py", "transformer/modeling_dalle_bart.py"):
        (source / name).write_text("raise RuntimeError('an older dalle-hf')\n")
    export_for_hub(str(source), str(tmp_path / "out"), repo_id=REPO_ID)
    package = Path(dalle_hf.__file__).parent
    for name in ("pipeline_dalle_mini.py", "transformer/modeling_dalle_bart.py"):
        assert (tmp_path / "out" / name).read_bytes() == (package / Path(name).name).read_bytes(), name
    index = json.loads((tmp_path / "out" / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dalle_mini", "DalleMiniPipeline"]


def test_published_repo_loads_and_generates_without_dalle_hf(published, converted, venv_without_dalle_hf, tmp_path):  # noqa: F811
    _, cache = published
    script = f"""
        import json, sys
        import numpy as np, torch
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained("{REPO_ID}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        out = pipe("{PROMPT}", generator=torch.Generator().manual_seed(0), **{SAMPLING!r})
        np.save("tokens.npy", out.image_tokens.numpy())
        np.save("pixels.npy", np.stack([np.asarray(image) for image in out.images]))
        # the published code carries the editing pipelines too: inpaint one of the images without dalle-hf
        inpaint = sys.modules[type(pipe).__module__].DalleMiniInpaintPipeline.from_pipe(pipe)
        inpaint.set_progress_bar_config(disable=True)
        mask = np.zeros((32, 32), dtype=bool); mask[16:] = True
        edit = inpaint("{PROMPT}", image=out.images[0], mask_image=mask, top_k=64, output_type="np")
        original = np.asarray(out.images[0], dtype=np.float32) / 255.0  # as the pipeline converts a PIL image
        kept = bool((edit.images[0][~mask] == original[~mask]).all())
        # the converted folder itself carries the same code
        local = DiffusionPipeline.from_pretrained("{converted}", trust_remote_code=True)
        local.set_progress_bar_config(disable=True)
        local_out = local("{PROMPT}", generator=torch.Generator().manual_seed(0), **{SAMPLING!r})
        np.save("local_tokens.npy", local_out.image_tokens.numpy())
        own = [m for m in sys.modules if m.startswith("dalle_hf")]
        print(json.dumps({{"pipeline": type(pipe).__module__, "class": type(pipe).__name__,
                          "transformer": type(pipe.transformer).__module__, "vae": type(pipe.vae).__module__,
                          "ranked_by": out.ranked_by, "dalle_hf": own, "kept": kept,
                          "local": [type(local).__module__, type(local.transformer).__module__]}}))
    """
    result = run_without_dalle_hf(venv_without_dalle_hf, script, cache, tmp_path)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["pipeline"] == "diffusers_modules.local.pipeline_dalle_mini"
    assert loaded["class"] == "DalleMiniPipeline"
    assert loaded["transformer"].endswith("modeling_dalle_bart") and loaded["vae"].startswith("diffusers.models")
    assert loaded["ranked_by"] == "clip" and loaded["dalle_hf"] == []
    assert loaded["kept"]  # every pixel outside the mask, through the published code

    pipe = DalleMiniPipeline.from_pretrained(converted)  # dalle-hf's own classes, from the converted folder
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLING)
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "tokens.npy")), ours.image_tokens)
    assert loaded["local"] == ["diffusers_modules.local.pipeline_dalle_mini",
                               "diffusers_modules.local.modeling_dalle_bart"]  # the folder's files
    assert torch.equal(torch.from_numpy(np.load(tmp_path / "local_tokens.npy")), ours.image_tokens)
    assert np.array_equal(np.load(tmp_path / "pixels.npy"), np.stack([np.asarray(image) for image in ours.images]))


def test_dalle_hf_loads_the_published_repo_offline_running_none_of_its_code(
    published, converted, tmp_path, monkeypatch
):
    """`DalleMiniPipeline.from_pretrained("org/name")` of a repository that carries code: fetched with
    `snapshot_download` from the Hub cache (offline; `cache_dir` and `revision` as given), loaded with dalle-hf's own
    classes and no `trust_remote_code`. Every code file of the repository raises if run."""
    hub, _ = published
    files = {name: f"raise RuntimeError('{name} ran')\n".encode() if name.endswith(".py") else content
             for name, content in hub.commits[0]["files"].items()}  # fmt: skip
    cache = tmp_path / "hf-cache"
    write_hf_cache(cache, REPO_ID, files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    pipe = DalleMiniPipeline.from_pretrained(REPO_ID, cache_dir=str(cache), revision=SHA)
    assert type(pipe).__module__ == "dalle_hf.pipeline_dalle_mini"
    assert type(pipe.transformer).__module__ == "dalle_hf.modeling_dalle_bart"
    assert pipe.config._name_or_path == REPO_ID  # as diffusers records a repo id
    assert pipe.tokenizer.name_or_path.startswith(str(cache))  # the snapshot itself, which stays
    ours = DalleMiniPipeline.from_pretrained(converted)
    for p in (pipe, ours):
        p.set_progress_bar_config(disable=True)
    tokens = [p(PROMPT, generator=torch.Generator().manual_seed(0), **SAMPLING).image_tokens for p in (pipe, ours)]
    assert torch.equal(*tokens)

    use_hf_cache(monkeypatch, cache)  # the default cache, the main branch
    assert type(DalleMiniPipeline.from_pretrained(REPO_ID).transformer).__module__ == "dalle_hf.modeling_dalle_bart"
    with pytest.raises(LocalEntryNotFoundError):  # offline and not cached: huggingface_hub's own error
        DalleMiniPipeline.from_pretrained("org/not-cached")


def test_export_space_asks_for_a_small_gpu_with_exact_pins(published, tmp_path, monkeypatch):
    _, cache = published
    use_hf_cache(monkeypatch, cache)
    space = tmp_path / "space"
    assert cli_main(["export-space", str(space), "--model", REPO_ID]) == 0
    data = SpaceCard.load(space / "README.md").data.to_dict()
    assert data["suggested_hardware"] == "t4-small" and data["models"] == [REPO_ID]
    lines = (space / "requirements.txt").read_text().splitlines()
    assert all("==" in line for line in lines), lines  # exact pins, and no CPU-only wheel index on a GPU
    pins = dict(line.split("==") for line in lines)
    assert "+" not in pins["torch"] and pins["torch"] == version("torch").split("+")[0]
    for name in ("bitsandbytes", "accelerate", "ftfy", "unidecode", "emoji", "diffusers", "transformers"):
        assert pins[name] == version(name), name
    assert pins["gradio"] == data["sdk_version"]

    cpu_space = tmp_path / "cpu-space"
    assert cli_main(["export-space", str(cpu_space), "--model", REPO_ID, "--hardware", "cpu-basic"]) == 0
    assert SpaceCard.load(cpu_space / "README.md").data.suggested_hardware == "cpu-basic"
    cpu_lines = (cpu_space / "requirements.txt").read_text().splitlines()
    assert cpu_lines[0].startswith("--extra-index-url https://download.pytorch.org/whl/cpu")
    assert not any(line.startswith("bitsandbytes") for line in cpu_lines) and "ftfy==6.3.1" in cpu_lines
    with pytest.raises(SystemExit):
        cli_main(["export-space", str(tmp_path / "x"), "--model", REPO_ID, "--hardware", "h100-huge"])


def test_exported_space_picks_its_precision_and_runs_without_dalle_hf(
    published, converted, venv_without_dalle_hf, tmp_path, monkeypatch  # noqa: F811
):
    _, cache = published
    use_hf_cache(monkeypatch, cache)
    assert cli_main(["export-space", str(tmp_path / "space"), "--model", REPO_ID]) == 0
    script = f"""
        import json, sys
        import numpy as np
        sys.path.insert(0, "space")
        import app

        # the GPU's int8 configuration, checked here on the CPU in float32 (bitsandbytes runs there too, slowly)
        int8 = app.DiffusionPipeline.from_pretrained(app.MODEL_ID, trust_remote_code=True, **app.pipeline_kwargs(
            {{"device": "cpu", "dtype": "float32", "int8": True}}))
        int8.set_progress_bar_config(disable=True)
        layers = {{"q_proj": type(int8.transformer.decoder.layers[0].self_attn.q_proj).__name__,
                  "lm_head": type(int8.transformer.decoder.lm_head).__name__}}
        int8_tokens = int8("{PROMPT}", num_images_per_prompt=2, top_k=64).image_tokens.shape

        gallery = app.generate("{PROMPT}", 3, 2, 10.0, 0)
        np.save("space_pixels.npy", np.stack([np.asarray(image) for image, _ in gallery]))
        choices = {{str(gb): app.precision(None if gb is None else gb * 2**30) for gb in (None, 16, 1)}}
        dtype = str(app.load_pipeline().transformer.dtype)
        print(json.dumps({{"choices": choices, "int8": layers, "int8_tokens": list(int8_tokens), "dtype": dtype,
                          "captions": [c for _, c in gallery], "examples": app.example_prompts(),
                          "blocks": type(app.build_demo()).__name__}}))
    """
    result = run_without_dalle_hf(venv_without_dalle_hf, script, cache, tmp_path)
    ran = json.loads(result.stdout.strip().splitlines()[-1])
    # no GPU: bfloat16 on the CPU; a 16 GB card has room for float16; a 1 GB card for int8 only (the tiny model's
    # threshold is the fixed 1 GiB plus its weights)
    assert ran["choices"] == {"None": {"device": "cpu", "dtype": "bfloat16", "int8": False},
                              "16": {"device": "cuda", "dtype": "float16", "int8": False},
                              "1": {"device": "cuda", "dtype": "float16", "int8": True}}  # fmt: skip
    assert ran["int8"] == {"q_proj": "Linear8bitLt", "lm_head": "Linear"} and ran["int8_tokens"] == [2, 16, 16]
    assert ran["dtype"] == "torch.bfloat16" and ran["blocks"] == "Blocks"
    assert ran["examples"] == DALLE_MINI_SAMPLE_PROMPTS and all(c.startswith("CLIP ") for c in ran["captions"])
    pipe = DalleMiniPipeline.from_pretrained(converted, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(PROMPT, num_images_per_prompt=3, num_images_to_keep=2, guidance_scale=10.0,
                generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "space_pixels.npy"), np.stack([np.asarray(im) for im in ours.images]))
