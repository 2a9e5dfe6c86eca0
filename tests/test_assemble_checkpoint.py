"""scripts/assemble_checkpoint.py: stitches separately trained parts into one pipeline folder."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.modeling_dvae import DalleVAE
from dalle_hf.pipeline_dalle import DallePipeline

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "assemble_checkpoint.py")


def run_script(monkeypatch, *argv):
    spec = importlib.util.spec_from_file_location("assemble_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["assemble_checkpoint.py", *argv])
    module.main()


def test_ships_a_finetuned_decoder_and_refuses_another_encoder(pipe, tmp_path, monkeypatch):
    transformer_run = str(tmp_path / "dalle")
    pipe.save_pretrained(transformer_run)
    clip_run = tmp_path / "clip"
    pipe.clip_model.save_pretrained(clip_run / "clip_model")
    pipe.clip_processor.save_pretrained(clip_run / "clip_processor")

    # A decoder fine-tune: the same encoder, a wider decoder.
    config = DalleVAEConfig.from_dict({**pipe.vae.config.to_dict(), "decoder_n_hid": 12})
    finetuned = DalleVAE(config)
    finetuned.encoder.load_state_dict(pipe.vae.encoder.state_dict())
    finetuned.save_pretrained(tmp_path / "vae-ft" / "vae")
    report = {"accuracy": {"colors": 0.5, "counting": 0.25}, "shapes_eval": 0.375, "config": {"seed": 0},
              "reranked_accuracy": {"colors": 0.75, "counting": 0.5}, "shapes_eval_reranked": 0.625,
              "best_of_n_oracle": {"colors": 1.0, "counting": 0.5}, "shapes_eval_best_of_n_oracle": 0.75}  # fmt: skip
    (tmp_path / "report.json").write_text(json.dumps(report))
    info = {"name": "tiny", "license": "apache-2.0", "limitations": ["Draws only colors and counts."],
            "evaluation": {"name": "TinyEval", "mean_key": "shapes_eval", "mean_label": "two-task mean"}}  # fmt: skip
    (tmp_path / "info.json").write_text(json.dumps(info))

    out = str(tmp_path / "shipped")
    run_script(monkeypatch, "--transformer_run", transformer_run, "--vae_run", str(tmp_path / "vae-ft"),
               "--clip_run", str(clip_run), "--eval_report", str(tmp_path / "report.json"), "--out", out,
               "--card_info", str(tmp_path / "info.json"),
               "--default_guidance_scale", "2.5")  # fmt: skip
    shipped = DallePipeline.from_pretrained(out)
    assert shipped.vae.config.decoder_n_hid == 12 and shipped.clip_model is not None
    assert shipped.config.default_guidance_scale == 2.5
    for key, value in finetuned.decoder.state_dict().items():
        assert torch.equal(shipped.vae.decoder.state_dict()[key], value), key
    card = open(os.path.join(out, "README.md")).read()
    assert "--vae_run" in card and "| colors | 0.500 | 0.750 | 1.000 |" in card and "**0.625** | **0.750**" in card
    assert "| task | best-of-1 | CLIP best-of-N | checker best-of-N |" in card
    assert "## TinyEval" in card and "| **two-task mean** | **0.375** |" in card and "Draws only colors" in card
    card_data = json.loads(open(os.path.join(out, "card_data.json")).read())
    assert card_data["evaluation"]["report"] == report and card_data["license"] == "apache-2.0"
    assert [(s["component"], s["stage"]) for s in card_data["stages"]] == [
        ("Transformer", 1), ("dVAE", 1), ("CLIP reranker", 1)]
    assert ModelCard.load(os.path.join(out, "README.md")).data.license == "apache-2.0"
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for _, _, files in os.walk(out) for name in files)

    # Another encoder means other codes: the transformer would draw garbage, so the script refuses.
    other = DalleVAE(pipe.vae.config)
    other.save_pretrained(tmp_path / "vae-other" / "vae")
    with pytest.raises(ValueError, match="another encoder"):
        run_script(monkeypatch, "--transformer_run", transformer_run, "--vae_run", str(tmp_path / "vae-other"),
                   "--out", str(tmp_path / "bad"))  # fmt: skip
