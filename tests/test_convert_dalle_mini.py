"""convert_min_dalle / `dalle-hf convert-dalle-mini`: a min-dalle models_root of tiny random weights (state dicts
written with torch.save, as min-dalle's files are) becomes a folder that carries its code, which diffusers'
DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True) loads with that code and
DalleMiniPipeline.from_pretrained with dalle-hf's own classes, running none of it; both generate min-dalle's greedy
codes. Wrong and truncated files are refused naming the file and the tensor."""

import json
import os
import sys
import types

import pytest
import torch

from dalle_hf import cli, convert_dalle_mini
from dalle_hf.convert_dalle_mini import convert_min_dalle
from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
from tests.dalle_bart_reference import (
    load_into_min_dalle,
    min_dalle_generate,
    min_dalle_modules,
    randomize,
    tiny_bart_config,
    tiny_vqgan,
    write_tiny_bart_tokenizer,
)

PROMPT = "a cat wearing a hat"


@pytest.fixture(scope="module")
def min_dalle_reference():
    """min-dalle's encoder and decoder with random weights (width 128: 2 heads of 64, as the published models)."""
    ours = randomize(DalleBartForImageGeneration(tiny_bart_config(d_model=128, attention_heads=2)))
    encoder, decoder = min_dalle_modules(ours.config)
    load_into_min_dalle(ours.state_dict(), encoder, decoder)
    return encoder, decoder


def write_models_root(root, encoder, decoder, name="dalle_bart_mini"):
    """min-dalle's layout: `<name>/{encoder,decoder}.pt, vocab.json, merges.txt` and `vqgan/detoker.pt`."""
    folder = root / name
    write_tiny_bart_tokenizer(folder)
    torch.save(encoder.state_dict(), folder / "encoder.pt")  # with min-dalle's LayerNorm scales of 1
    torch.save(decoder.state_dict(), folder / "decoder.pt")
    (root / "vqgan").mkdir(exist_ok=True)
    torch.save({"placeholder": torch.zeros(1)}, root / "vqgan" / "detoker.pt")
    return root


@pytest.fixture
def tiny_vqgan_loader(monkeypatch):
    """The VQGAN mapping of min-dalle's detoker.pt is the `convert` module's (dalle_hf.convert_vqgan); here a tiny
    VQModel stands in for it."""
    seen = []

    def loader(path, dtype):
        seen.append(path)
        return tiny_vqgan().to(dtype)

    monkeypatch.setattr(convert_dalle_mini, "vqgan_from_detoker", loader)
    return seen


@pytest.fixture
def remote_code_cache(tmp_path, monkeypatch):
    """diffusers' cache of remote code modules under tmp_path; the `diffusers_modules.*` it imports are forgotten
    afterwards, so that each test imports its own folder's files."""
    from diffusers.utils import dynamic_modules_utils

    monkeypatch.setattr(dynamic_modules_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # diffusers appends its cache folder

    def dynamic():
        package = dynamic_modules_utils.DIFFUSERS_DYNAMIC_MODULE_NAME  # "diffusers_modules"
        return [name for name in sys.modules if name.split(".")[0] == package]

    saved = {name: sys.modules.pop(name) for name in dynamic()}
    yield
    for name in dynamic():
        del sys.modules[name]
    sys.modules.update(saved)


def greedy_reference(encoder, decoder, pipe) -> torch.LongTensor:
    """min-dalle's super-conditioned greedy codes (s = 10, start token 16384) for PROMPT, (1, 256)."""
    text = torch.cat([pipe.unconditional_ids(1), pipe.encode_prompt([PROMPT])])
    return min_dalle_generate(encoder, decoder, text, 1, start_token=16384, top_k=1, supercondition_factor=10)


def test_converted_folder_loads_with_diffusion_pipeline_and_generates_min_dalles_codes(
    tmp_path, min_dalle_reference, tiny_vqgan_loader, remote_code_cache
):
    from diffusers import DiffusionPipeline

    from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline

    encoder, decoder = min_dalle_reference
    root = write_models_root(tmp_path / "pretrained", encoder, decoder)
    out = tmp_path / "converted"
    convert_min_dalle(str(root), str(out))
    assert tiny_vqgan_loader == [str(root / "vqgan" / "detoker.pt")]
    assert (out / "transformer" / "model.safetensors").is_file() and (out / "tokenizer" / "vocab.json").is_file()
    index = json.loads((out / "model_index.json").read_text())  # the code files diffusers' remote code loads
    assert index["_class_name"] == ["pipeline_dalle_mini", "DalleMiniPipeline"]
    assert index["transformer"] == ["modeling_dalle_bart", "DalleBartForImageGeneration"]
    assert (out / "pipeline_dalle_mini.py").is_file() and (out / "transformer" / "modeling_dalle_bart.py").is_file()
    card = (out / "README.md").read_text()
    assert "apache-2.0" in card and "Dayma" in card and "convert-dalle-mini --min-dalle" in card
    assert "decoder only" in card and f'DiffusionPipeline.from_pretrained("{out}", trust_remote_code=True)' in card

    # diffusers asks before it runs a folder's code (`get_cached_module_file`); dalle-hf never passes it
    with pytest.raises(ValueError, match="Pass `trust_remote_code=True`"):
        DiffusionPipeline.from_pretrained(str(out))
    pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
    assert type(pipe).__module__ == "diffusers_modules.local.pipeline_dalle_mini"  # the folder's file, not dalle_hf's
    assert type(pipe).__name__ == "DalleMiniPipeline" and pipe.config.vae_has_encoder is False
    assert type(pipe.transformer).__module__ == "diffusers_modules.local.modeling_dalle_bart"
    pipe.set_progress_bar_config(disable=True)
    result = pipe(PROMPT, top_k=1, output_type="pt")
    assert result.images.shape == (1, 3, 32, 32) and result.image_tokens.shape == (1, 16, 16)
    assert torch.equal(result.image_tokens.flatten(1), greedy_reference(encoder, decoder, pipe))
    with pytest.raises(ValueError, match="no encoder weights"):
        pipe.score(images=result.images, captions=PROMPT)

    ours = DalleMiniPipeline.from_pretrained(str(out))  # dalle-hf's own classes, from the same folder
    assert type(ours).__module__ == "dalle_hf.pipeline_dalle_mini"
    assert type(ours.transformer).__module__ == "dalle_hf.modeling_dalle_bart"
    ours.set_progress_bar_config(disable=True)
    assert torch.equal(ours(PROMPT, top_k=1, output_type="pt").image_tokens, result.image_tokens)


def test_dalle_hf_loads_a_folder_with_code_without_running_it(
    tmp_path, min_dalle_reference, tiny_vqgan_loader, remote_code_cache
):
    from diffusers import DiffusionPipeline

    from dalle_hf.pipeline_dalle_mini import DalleMiniInpaintPipeline, DalleMiniPipeline

    encoder, decoder = min_dalle_reference
    out = tmp_path / "converted"
    convert_min_dalle(str(write_models_root(tmp_path / "pretrained", encoder, decoder)), str(out))
    code = sorted(out.rglob("*.py"))
    assert {p.name for p in code} >= {"pipeline_dalle_mini.py", "pipeline_dalle.py", "modeling_dalle_bart.py"}
    for path in code:
        path.write_text(f"raise RuntimeError('{path.name} ran')\n")
    with pytest.raises(RuntimeError, match="pipeline_dalle_mini.py ran"):  # the trap works when the code is run
        DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)

    pipe = DalleMiniPipeline.from_pretrained(out)
    assert type(pipe).__module__ == "dalle_hf.pipeline_dalle_mini"
    assert type(pipe.transformer).__module__ == "dalle_hf.modeling_dalle_bart"
    assert pipe.config._name_or_path == str(out) and pipe.config.vae_has_encoder is False
    pipe.set_progress_bar_config(disable=True)
    tokens = pipe(PROMPT, top_k=1, output_type="pt").image_tokens
    assert torch.equal(tokens.flatten(1), greedy_reference(encoder, decoder, pipe))
    assert type(DalleMiniInpaintPipeline.from_pretrained(out)).__name__ == "DalleMiniInpaintPipeline"
    saved = tmp_path / "saved"  # saving writes dalle-hf's names again, no code
    pipe.save_pretrained(saved)
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "DalleMiniPipeline"


def test_bfloat16_storage(tmp_path, min_dalle_reference, tiny_vqgan_loader):
    from dalle_hf.pipeline_dalle_mini import DalleMiniPipeline

    root = write_models_root(tmp_path / "pretrained", *min_dalle_reference)
    convert_min_dalle(str(root), str(tmp_path / "out"), dtype=torch.bfloat16)
    pipe = DalleMiniPipeline.from_pretrained(str(tmp_path / "out"))
    assert pipe.transformer.dtype == torch.bfloat16  # diffusers loads the VQModel in float32 unless asked


def corrupt(path, change):
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "file, change, message",
    [
        ("decoder.pt", lambda s: s.update({"layers.1.glu.fc2.weight": torch.zeros(128, 47)}),
         r"decoder\.pt: tensor 'layers\.1\.glu\.fc2\.weight' has shape \(128, 47\), expected \(128, 48\)"),
        ("encoder.pt", lambda s: s.pop("layers.0.self_attn.q_proj.weight"),
         r"encoder\.pt: missing tensor 'layers\.0\.self_attn\.q_proj\.weight'"),
        ("decoder.pt", lambda s: s.update({"layers.0.extra.weight": torch.zeros(3)}),
         r"decoder\.pt: unexpected tensor 'layers\.0\.extra\.weight'"),
        ("encoder.pt", lambda s: s["final_ln.weight"].mul_(2),
         r"encoder\.pt: tensor 'final_ln\.weight' is a LayerNorm scale .* not all ones"),
    ],
)
def test_wrong_files_are_refused_naming_the_file_and_the_tensor(
    tmp_path, min_dalle_reference, tiny_vqgan_loader, file, change, message
):
    root = write_models_root(tmp_path / "pretrained", *min_dalle_reference)
    corrupt(root / "dalle_bart_mini" / file, change)
    with pytest.raises(ValueError, match=message):
        convert_min_dalle(str(root), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_truncated_and_pickled_files_are_refused(tmp_path, min_dalle_reference, tiny_vqgan_loader, capsys):
    root = write_models_root(tmp_path / "pretrained", *min_dalle_reference)
    path = root / "dalle_bart_mini" / "decoder.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    args = ["convert-dalle-mini", "--min-dalle", str(root), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(args)
    assert exit_info.value.code == 2
    assert f"{path} is not a readable torch state dict" in capsys.readouterr().err

    torch.save({"weights": types.SimpleNamespace(a=1)}, path)  # a pickle naming a class: not loaded
    with pytest.raises(ValueError, match=r"decoder\.pt is not a readable torch state dict"):
        convert_min_dalle(str(root), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="but Mega"):  # width 128 is neither; a 1024-wide file asked as Mega is
        convert_dalle_mini.config_from_min_dalle(
            {"embed_tokens.weight": torch.zeros(8, 1024), "embed_positions.weight": torch.zeros(64, 1024),
             "layers.0.glu.fc0.weight": torch.zeros(2730, 1024)},
            {"embed_tokens.weight": torch.zeros(16385, 1024), "embed_positions.weight": torch.zeros(256, 1024)},
            ("encoder.pt", "decoder.pt"), mega=True,
        )  # fmt: skip


def test_cli_converts_and_dispatches_flax(tmp_path, min_dalle_reference, tiny_vqgan_loader, monkeypatch, capsys):
    root = write_models_root(tmp_path / "pretrained", *min_dalle_reference)
    assert cli.main(["convert-dalle-mini", "--min-dalle", str(root), "--out", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().out and os.path.isfile(tmp_path / "out" / "model_index.json")

    calls = []
    fake = types.ModuleType("dalle_hf.convert_flax_dalle_mini")  # the `convert` module's, not on this branch

    def convert_flax(flax_dir, vqgan_dir, out_dir, *, clip_dir=None, dtype=torch.float32, command=None):
        calls.append((flax_dir, vqgan_dir, out_dir, clip_dir, dtype, command))
        return types.SimpleNamespace(transformer=torch.nn.Linear(2, 2))

    fake.convert_flax = convert_flax
    monkeypatch.setitem(sys.modules, "dalle_hf.convert_flax_dalle_mini", fake)
    cli.main(["convert-dalle-mini", "--flax", "snap", "--vqgan", "vq", "--out", "o", "--dtype", "bfloat16"])
    command = "dalle-hf convert-dalle-mini --flax snap --vqgan vq --out o --dtype bfloat16"
    assert calls == [("snap", "vq", "o", None, torch.bfloat16, command)]
    for bad in (["--flax", "snap", "--out", "o"], ["--min-dalle", "r", "--flax", "s", "--out", "o"],
                ["--min-dalle", "r", "--vqgan", "v", "--out", "o"]):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.main(["convert-dalle-mini", *bad])
