"""A 2-process DDP smoke test on CPU: `torchrun --nproc_per_node 2` (gloo) runs the training scripts unchanged."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from dalle_hf.configuration_dvae import DalleVAEConfig
from dalle_hf.modeling_dvae import DalleVAE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(module: str, *flags: str, cwd) -> subprocess.CompletedProcess:
    # ACCELERATE_USE_CPU: without it accelerate does not join the torchrun group on a machine without CUDA
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", module, *flags]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_train_dalle_ddp_two_processes(tmp_path):
    torch.manual_seed(0)
    DalleVAE(
        DalleVAEConfig(image_size=64, num_groups=3, n_hid=8, n_init=8, n_blk_per_group=1, vocab_size=32)
    ).save_pretrained(tmp_path / "vae")
    out = tmp_path / "run"
    result = torchrun(
        "dalle_hf.train_dalle", "--vae_name_or_path", str(tmp_path / "vae"), "--output_dir", str(out),
        "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--text_seq_len", "8", "--text_vocab_size", "300",
        "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "100",
        "--logging_steps", "1", "--lr_warmup_steps", "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # 2 processes x batch 2 = 4 captions per update: the card counts what both ranks saw
    assert (out / "model_index.json").exists() and (out / "checkpoint-2").is_dir()
    assert "| captions seen | 12 |" in (out / "README.md").read_text()
    assert "4 captions per update" in result.stderr  # the two ranks form one DDP group
