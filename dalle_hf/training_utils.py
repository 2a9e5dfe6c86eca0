"""Helpers shared by `train_dvae.py`, `train_dalle.py` and `train_clip.py`.

Flags every script takes (`add_common_args`, `add_dataset_args`), the training dataset, schedules,
`accelerator.save_state` rotation with `--resume_from_checkpoint latest`, wall-time bookkeeping across
resumes and the README.md model card.
"""

import argparse
import functools
import json
import math
import os
import re
import shlex
import shutil
import sys
import time

import torch
from torch.utils.data import DataLoader, IterableDataset

from .model_card import format_duration
from .modeling_dvae import DalleVAE

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE_NAME = "trainer_state.json"


# ----------------------------------------------------------------------------- flags


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags shared by the three training scripts (diffusers `examples/` names and meanings)."""
    parser.add_argument("--output_dir", type=str, required=True, help="Where checkpoints, logs and the model go.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds torch, the data stream and the Gumbel noise.")
    parser.add_argument("--train_batch_size", type=int, default=32, help="Per-device batch size.")
    parser.add_argument("--max_train_steps", type=int, default=1000, help="Optimizer updates in the whole run.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="Peak AdamW learning rate.")
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer update."
    )
    parser.add_argument(
        "--checkpointing_steps", type=int, default=500, help="`accelerator.save_state` every N updates."
    )
    parser.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (oldest go)."
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        type=str,
        default=None,
        help='A checkpoint directory, or "latest" for the newest one in --output_dir (none found: start fresh).',
    )
    parser.add_argument(
        "--mixed_precision",
        type=str,
        default="no",
        choices=["no", "bf16", "fp16"],
        help="Autocast dtype; bf16 runs on CPUs with AVX-512 bf16 (losses stay fp32).",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes.")
    parser.add_argument("--logging_steps", type=int, default=50, help="Log the running losses every N updates.")
    return parser


def add_dataset_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `--dataset NAME` (a world, `dalle_hf.data.world`), `--train_data_dir` and the option `--task_weights`."""
    parser.add_argument(
        "--dataset",
        type=str,
        default="shapes",
        help="The world to train on: `shapes` (the procedural shapes world), `emoji` (the emoji cache in "
        "--train_data_dir), `imagefolder` (images + metadata.jsonl in --train_data_dir), or any module of "
        "dalle_hf.data that defines a World.",
    )
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="The imagefolder, or the emoji cache (`dalle-hf data emoji`)."
    )
    parser.add_argument(
        "--task_weights",
        type=str,
        default=None,
        help="Shapes tasks drawn more or less often than the defaults, e.g. 'color_attr=2,counting=1.5'.",
    )
    return parser


def world_from_args(args: argparse.Namespace):
    """The `World` that `--dataset`, `--train_data_dir` and `--task_weights` name (loaded once per process)."""
    options = {"task_weights": args.task_weights} if getattr(args, "task_weights", None) is not None else {}
    return _load_world(args.dataset, getattr(args, "train_data_dir", None), tuple(sorted(options.items())))


@functools.lru_cache(maxsize=4)
def _load_world(name: str, data_dir: str | None, options: tuple):
    from .data.world import load_world

    return load_world(name, data_dir, **dict(options))


def check_common_args(args: argparse.Namespace) -> None:
    """Raise `ValueError` on inconsistent shared flags (call from each script's `parse_args`)."""
    for name in ("train_batch_size", "max_train_steps", "gradient_accumulation_steps", "checkpointing_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {args.learning_rate}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}.")
    if args.logging_steps < 1 or args.dataloader_num_workers < 0:
        raise ValueError("--logging_steps must be >= 1 and --dataloader_num_workers >= 0.")
    if hasattr(args, "dataset"):
        world_from_args(args)  # ValueError: an unknown world, a missing or unneeded --train_data_dir, a bad option


def command_line(module: str) -> str:
    """The command that started this process, as a copy-pasteable `python -m module ...` string (with the
    thread-count variables that change speed and, through kernel choice, results)."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ]
    return shlex.join([*env, "python", "-m", module, *sys.argv[1:]])


# ----------------------------------------------------------------------------- data


def build_train_dataset(args: argparse.Namespace, image_size: int, seed: int):
    """
    The training dataset of the world `--dataset` names (`World.train_dataset`).

    Args:
        args (`argparse.Namespace`): with `dataset`, `train_data_dir` and `task_weights`.
        image_size (`int`): side of the square images.
        seed (`int`): seeds a stream and caption sampling (pass `args.seed + resumed_step` so a resumed run sees new
            scenes and captions).

    Returns:
        A map-style or infinite iterable dataset of dicts with `pixel_values` `(3, H, W)` in `[0, 1]` and `text`.
    """
    return world_from_args(args).train_dataset(image_size, seed)


def describe_dataset(args: argparse.Namespace) -> str:
    """One line for the model card."""
    return world_from_args(args).describe()


def load_frozen_vae(path: str):
    """A trained `DalleVAE` (its own folder, the `vae/` of a pipeline folder, or a hub id), in eval mode, frozen."""
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else ""
    return DalleVAE.from_pretrained(path, subfolder=subfolder).eval().requires_grad_(False)


def collate_images(examples: list[dict]) -> dict:
    """Stack `pixel_values` `(3, H, W)` -> `(B, 3, H, W)` and keep `text` as a list."""
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "text": [e["text"] for e in examples],
    }


def build_dataloader(dataset, batch_size: int, num_workers: int, seed: int, collate_fn=collate_images) -> DataLoader:
    """A DataLoader that shuffles map-style datasets (seeded) and streams iterable ones as they come."""
    is_stream = isinstance(dataset, IterableDataset)
    generator = None if is_stream else torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=not is_stream,
        drop_last=True,
        num_workers=num_workers,
        collate_fn=collate_fn,
        generator=generator,
        persistent_workers=num_workers > 0,
    )


def infinite_batches(dataloader: DataLoader):
    """Yield batches forever, starting a new epoch of a map-style dataset when one ends."""
    while True:
        yielded = False
        for batch in dataloader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("The training dataloader yielded no batch: fewer examples than --train_batch_size?")


# ----------------------------------------------------------------------------- schedules


def cosine_anneal(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` (step 0) to `end` (step >= `total_steps`); `end` when `total_steps` is 0."""
    if total_steps <= 0 or step >= total_steps:
        return end
    progress = max(step, 0) / total_steps
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def cosine_warmup(step: int, warmup_steps: int, target: float) -> float:
    """Half-cosine ramp from 0 (step 0) to `target` (step >= `warmup_steps`)."""
    return cosine_anneal(step, warmup_steps, 0.0, target)


def warmup_cosine_lr_lambda(warmup_steps: int, total_steps: int, final_ratio: float):
    """LambdaLR factor: linear warmup to 1, then cosine to `final_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine_anneal(step - warmup_steps, total_steps - warmup_steps, 1.0, final_ratio)

    return factor


# ----------------------------------------------------------------------------- checkpoints


def list_checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` directories in `output_dir`, oldest (lowest step) first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", n)]
    names.sort(key=lambda n: int(n[len(CHECKPOINT_PREFIX) :]))
    return [os.path.join(output_dir, n) for n in names]


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """
    Resolve `--resume_from_checkpoint`.

    Returns the checkpoint directory to load, or `None` to start fresh (`None` given, or `"latest"` with no
    checkpoint yet, which lets the same command both start and resume a run). An explicit path that does not
    exist raises `ValueError`.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint directory.")
    return path


def checkpoint_step(checkpoint_dir: str) -> int:
    """The optimizer step a `checkpoint-<step>` directory was saved at."""
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", os.path.basename(os.path.normpath(checkpoint_dir)))
    if match is None:
        raise ValueError(f"{checkpoint_dir!r} is not named {CHECKPOINT_PREFIX}<step>.")
    return int(match.group(1))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None, trainer_state: dict) -> str:
    """
    `accelerator.save_state` to `output_dir/checkpoint-<step>`, after deleting the oldest checkpoints so that at
    most `total_limit` remain; `trainer_state` (wall time, images seen, ...) goes to `trainer_state.json` inside.
    """
    if accelerator.is_main_process and total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        for old in checkpoints[: max(len(checkpoints) - total_limit + 1, 0)]:
            shutil.rmtree(old)
    path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    accelerator.save_state(path)
    if accelerator.is_main_process:
        with open(os.path.join(path, TRAINER_STATE_NAME), "w") as f:
            json.dump({"global_step": step, **trainer_state}, f, indent=2)
    return path


def load_trainer_state(checkpoint_dir: str) -> dict:
    """The `trainer_state.json` saved by `save_checkpoint` (empty if absent)."""
    path = os.path.join(checkpoint_dir, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


class WallClock:
    """Wall time of a run summed over its resumes: `WallClock(previous_seconds).seconds`."""

    def __init__(self, previous_seconds: float = 0.0):
        self.previous_seconds = previous_seconds
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.previous_seconds + time.perf_counter() - self.start


# ----------------------------------------------------------------------------- model card


def write_model_card(
    path: str,
    title: str,
    description: str,
    data: str,
    command: str,
    seed: int,
    steps: int,
    wall_time_seconds: float,
    eval_results: dict | None = None,
    hyperparameters: dict | None = None,
    tags: tuple[str, ...] = ("dalle-hf",),
) -> None:
    """Write a README.md model card: what the model is, its data, the exact command, seed, steps, time, scores."""
    lines = ["---", "library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---", "", f"# {title}", ""]
    lines += [description, "", "## Training", "", f"- Data: {data}", f"- Seed: {seed}", f"- Optimizer steps: {steps}"]
    lines += [f"- Wall time: {format_duration(wall_time_seconds)} ({wall_time_seconds:.0f} s)", ""]
    lines += ["Command:", "", "```bash", command, "```", ""]
    if hyperparameters:
        lines += ["| hyperparameter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in hyperparameters.items()] + [""]
    lines += ["## Evaluation", ""]
    if eval_results:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in eval_results.items()]
    else:
        lines.append("Not evaluated.")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- run start and optimizer


def start_run(args: argparse.Namespace):
    """
    The start every training script shares: an `Accelerator`, one INFO log per process group (other ranks log
    warnings only), the output folder, the checkpoint to resume from and the global seed.

    Returns:
        `(accelerator, resume_dir or None, first_step, trainer_state)`.
    """
    import logging

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    level = logging.INFO if accelerator.is_local_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    resume_dir = resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    first_step = checkpoint_step(resume_dir) if resume_dir else 0
    trainer_state = load_trainer_state(resume_dir) if resume_dir else {}
    set_seed(args.seed)
    return accelerator, resume_dir, first_step, trainer_state


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT: AdamW decay only on tensors with `dim() >= 2` (matrices, conv kernels), none on biases and norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
