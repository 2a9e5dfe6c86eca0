"""Train the DALL-E discrete VAE (paper §2.1, appendix A.2) with 🤗 Accelerate.

    OMP_NUM_THREADS=1 python -m dalle_hf.train_dvae --dataset shapes --output_dir runs/dvae-shapes \
        --max_train_steps 2500 --mixed_precision bf16
    accelerate launch -m dalle_hf.train_dvae ...   (same flags)

The schedules follow the paper, scaled to the run length: the Gumbel-softmax temperature is cosine-annealed
from 1 to 1/16, the KL weight beta is cosine-warmed up from 0, and the learning rate decays with a cosine to
1/80 of its peak (1e-4 -> 1.25e-6 in the paper). The model goes to `--output_dir/vae` (safetensors) with a
README.md model card.
"""

import argparse
import logging
import os

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from .configuration_dvae import DalleVAEConfig
from .modeling_dvae import DalleVAE
from .training_utils import (
    start_run,
    weight_decay_groups,
    WallClock,
    add_common_args,
    add_dataset_args,
    build_dataloader,
    build_train_dataset,
    check_common_args,
    command_line,
    cosine_anneal,
    cosine_warmup,
    describe_dataset,
    world_from_args,
    infinite_batches,
    save_checkpoint,
    warmup_cosine_lr_lambda,
    write_model_card,
)

logger = logging.getLogger(__name__)

# Paper appendix A.2: the learning rate is annealed from 1e-4 to 1.25e-6, a ratio of 1/80.
FINAL_LR_RATIO = 1.25e-6 / 1e-4
RECONSTRUCTION_LOSS_NAMES = {"logit_laplace": "logit-Laplace (paper appendix A.3)", "mse": "mean squared error"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the DALL-E dVAE.")
    add_common_args(parser)
    add_dataset_args(parser)
    # Paper: 1e-4 at batch 512 for 3M updates; 4e-4 at batch 32 trains a CPU-sized dVAE in 2500 (1e-3 collapsed codes).
    parser.set_defaults(learning_rate=4e-4)
    # Model (DalleVAEConfig). The defaults are the CPU recipe that trained the shipped shapes dVAE (64 px,
    # 16x16 grid, 512 codes); the paper's values are noted where they differ.
    parser.add_argument("--image_size", type=int, default=64, help="Side of the square training images.")
    parser.add_argument("--num_groups", type=int, default=3, help="Resolution groups: downsampling 2**(n-1).")
    parser.add_argument(
        "--n_hid",
        type=int,
        default=32,
        help="Width of the first group (x1, x2, x4, x8); paper 256; 32 runs ~80 img/s on one core.",
    )
    parser.add_argument(
        "--decoder_n_hid", type=int, default=None, help="Decoder width, if not --n_hid (OpenAI's are separate)."
    )
    parser.add_argument("--n_blk_per_group", type=int, default=2, help="Residual blocks per group.")
    parser.add_argument("--vocab_size", type=int, default=512, help="Number of codes.")
    parser.add_argument(
        "--reconstruction_loss",
        type=str,
        default="mse",
        choices=["logit_laplace", "mse"],
        help="Paper: logit_laplace; in runs of a few thousand steps its learned scale gave up on object colours "
        "(grey shapes).",
    )
    parser.add_argument("--code_usage_weight", type=float, default=0.01, help="Weight of the batch code-usage term.")
    # Objective schedules (paper appendix A.2, expressed as fractions of the run).
    parser.add_argument(
        "--kl_weight",
        type=float,
        default=0.01,
        help="Final KL weight beta (paper: 6.6 with logit_laplace; MSE is ~100x smaller).",
    )
    parser.add_argument(
        "--kl_warmup_fraction", type=float, default=0.3, help="beta is cosine-warmed up from 0 over this fraction."
    )
    parser.add_argument("--temperature_start", type=float, default=1.0, help="Initial Gumbel temperature.")
    parser.add_argument("--temperature_end", type=float, default=1 / 16, help="Final Gumbel temperature.")
    parser.add_argument(
        "--temperature_anneal_fraction", type=float, default=0.6, help="Fraction of the run to anneal it over."
    )
    # Optimizer.
    parser.add_argument("--lr_warmup_steps", type=int, default=150, help="Linear learning-rate warmup.")
    parser.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW decay on conv weights (paper).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping.")
    # Decoder fine-tuning (after the transformer is trained on the codes, the decoder can still improve).
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from this dVAE (a vae/ folder, or a pipeline folder holding one); its config replaces the model "
        "flags, except --decoder_n_hid: a different width starts a fresh decoder on the same encoder.",
    )
    parser.add_argument(
        "--train_decoder_only",
        action="store_true",
        help="Freeze the encoder and train the decoder on its argmax codes (what generation decodes), with the "
        "reconstruction loss alone: the codes, and any transformer trained on them, stay valid.",
    )
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the weights and save it.")
    parser.add_argument("--ema_decay", type=float, default=0.999, help="EMA decay per update.")
    parser.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory format (about 2x faster convs on CPU).",
    )
    parser.add_argument(
        "--eval_n_per_task",
        type=int,
        default=100,
        help="Shapes scenes per task for the final fidelity check (0: skip).",
    )
    args = parser.parse_args(argv)

    check_common_args(args)
    if not 0 <= args.kl_warmup_fraction <= 1 or not 0 <= args.temperature_anneal_fraction <= 1:
        raise ValueError("--kl_warmup_fraction and --temperature_anneal_fraction must be in [0, 1].")
    if not 0 < args.temperature_end <= args.temperature_start:
        raise ValueError("Need 0 < --temperature_end <= --temperature_start.")
    if args.use_ema and not 0 < args.ema_decay < 1:
        raise ValueError(f"--ema_decay must be in (0, 1), got {args.ema_decay}.")
    if args.eval_n_per_task < 0:
        raise ValueError("--eval_n_per_task must be >= 0.")
    if args.train_decoder_only and args.pretrained_model_name_or_path is None:
        raise ValueError(
            "--train_decoder_only needs --pretrained_model_name_or_path (the encoder whose codes to keep)."
        )
    if args.decoder_n_hid is not None and args.decoder_n_hid < 1:
        raise ValueError(f"--decoder_n_hid must be positive, got {args.decoder_n_hid}.")
    return args


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # nanoGPT: weight decay only on tensors with dim >= 2 (conv kernels), none on biases.
    groups = weight_decay_groups(model, args.weight_decay)
    # Paper appendix A.2: AdamW with beta1 = 0.9, beta2 = 0.999, eps = 1e-8.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)


def load_pretrained_vae(path: str, decoder_n_hid: int | None = None) -> DalleVAE:
    """
    A saved dVAE (a vae/ folder, or a pipeline folder or hub repo with a vae/ subfolder). With a `decoder_n_hid`
    other than its decoder's width, its encoder with a freshly initialized decoder of that width.
    """
    subfolder = "vae" if os.path.isdir(os.path.join(path, "vae")) else ""
    vae = DalleVAE.from_pretrained(path, subfolder=subfolder)
    width = vae.config.decoder_n_hid or vae.config.n_hid
    if decoder_n_hid is None or decoder_n_hid == width:
        return vae
    config = DalleVAEConfig.from_dict({**vae.config.to_dict(), "decoder_n_hid": decoder_n_hid})
    fresh = DalleVAE(config)
    fresh.encoder.load_state_dict(vae.encoder.state_dict())
    return fresh


@torch.no_grad()
def count_codes_in_use(vae: DalleVAE, dataset, num_images: int = 1024, batch_size: int = 64) -> int:
    """Distinct argmax codes over `num_images` images of `dataset`."""
    used = torch.zeros(vae.config.vocab_size, dtype=torch.bool)
    if hasattr(dataset, "__len__"):  # a small folder or cache: batches no larger than the dataset
        batch_size = min(batch_size, len(dataset))
    batches = infinite_batches(build_dataloader(dataset, batch_size, num_workers=0, seed=0))
    for _ in range(max(num_images // batch_size, 1)):
        pixel_values = next(batches)["pixel_values"].to(vae.device)  # (B, 3, H, W)
        used[vae.get_codebook_indices(pixel_values).flatten().cpu()] = True
    return int(used.sum())


def evaluate(vae: DalleVAE, args: argparse.Namespace) -> dict:
    """Codes in use on held-out images, and the world's reconstruction metrics (`World.evaluate_vae`: shapes, the
    fraction of reconstructions passing the checker; emoji, PSNR on held-out renders)."""
    if args.eval_n_per_task == 0:
        return {}
    # A seed far from the training streams (which use seed + resumed step).
    eval_seed = args.seed + 1_000_000
    results = {"codes_in_use": count_codes_in_use(vae, build_train_dataset(args, vae.config.image_size, eval_seed))}
    results.update(world_from_args(args).evaluate_vae(vae, args.eval_n_per_task, eval_seed))
    return results


def main(args: argparse.Namespace) -> dict:
    accelerator, resume_dir, first_step, trainer_state = start_run(args)

    if args.pretrained_model_name_or_path is not None:
        model = load_pretrained_vae(args.pretrained_model_name_or_path, args.decoder_n_hid)
        config = model.config
    else:
        config = DalleVAEConfig(
            image_size=args.image_size,
            num_groups=args.num_groups,
            n_hid=args.n_hid,
            decoder_n_hid=args.decoder_n_hid,
            n_blk_per_group=args.n_blk_per_group,
            vocab_size=args.vocab_size,
            reconstruction_loss=args.reconstruction_loss,
            kl_weight=args.kl_weight,
            code_usage_weight=args.code_usage_weight,
        )
        model = DalleVAE(config)
    if args.train_decoder_only:
        model.encoder.requires_grad_(False)  # before the optimizer: it only gets the decoder
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lr_lambda(args.lr_warmup_steps, args.max_train_steps, FINAL_LR_RATIO)
    )

    # A resumed run reseeds the data (a new stream of shapes scenes rather than a replay of the old ones).
    dataset = build_train_dataset(args, image_size=config.image_size, seed=args.seed + first_step)
    dataloader = build_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, args.seed + first_step)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    ema = None
    if args.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=args.ema_decay)
        accelerator.register_for_checkpointing(ema)

    if resume_dir:
        has_ema = os.path.isfile(os.path.join(resume_dir, "custom_checkpoint_0.pkl"))
        if has_ema != args.use_ema:
            raise ValueError(
                f"{resume_dir} was saved {'with' if has_ema else 'without'} --use_ema; resume the same way."
            )
        logger.info(f"Resuming from {resume_dir} (step {first_step})")
        accelerator.load_state(resume_dir)
        set_seed(args.seed + first_step)  # new Gumbel noise after a resume
    clock = WallClock(trainer_state.get("wall_time_seconds", 0.0))
    images_seen = trainer_state.get("images_seen", 0)

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    temperature_steps = int(args.temperature_anneal_fraction * args.max_train_steps)
    kl_steps = int(args.kl_warmup_fraction * args.max_train_steps)
    logger.info(f"{sum(p.numel() for p in model.parameters()):,} parameters; {total_batch} images per update")

    model.train()
    progress = tqdm(
        range(args.max_train_steps), initial=first_step, disable=not accelerator.is_local_main_process, desc="dVAE"
    )
    running = {"loss": 0.0, "rec": 0.0, "kl": 0.0, "usage": 0.0}
    code_counts = torch.zeros(config.vocab_size, dtype=torch.long)
    window_start, window_images, window_batches = clock.seconds, 0, 0
    history = []
    step = first_step
    batches = infinite_batches(dataloader)
    while step < args.max_train_steps:
        temperature = cosine_anneal(step, temperature_steps, args.temperature_start, args.temperature_end)
        kl_weight = cosine_warmup(step, kl_steps, args.kl_weight)
        with accelerator.accumulate(model):
            pixel_values = next(batches)["pixel_values"].to(accelerator.device)  # (B, 3, H, W)
            if args.channels_last:
                pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            outputs = model(
                pixel_values, temperature=temperature, kl_weight=kl_weight, hard_codes=args.train_decoder_only
            )
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)

        images_seen += pixel_values.shape[0] * accelerator.num_processes
        window_images += pixel_values.shape[0] * accelerator.num_processes
        window_batches += 1
        for key, value in zip(running, ("loss", "reconstruction_loss", "kl_loss", "usage_loss")):
            running[key] += outputs[value].item()
        code_counts += torch.bincount(outputs.logits.detach().argmax(1).flatten().cpu(), minlength=config.vocab_size)
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)
        if ema is not None:
            ema.step(accelerator.unwrap_model(model).parameters())

        if step % args.logging_steps == 0 or step == args.max_train_steps:
            elapsed = clock.seconds - window_start
            log = {k: v / window_batches for k, v in running.items()}
            log.update(
                step=step,
                codes_in_use=int((code_counts > 0).sum()),
                temperature=round(temperature, 4),
                kl_weight=round(kl_weight, 3),
                lr=lr_scheduler.get_last_lr()[0],
                images_per_second=round(window_images / max(elapsed, 1e-9), 1),
            )
            history.append(log)
            progress.set_postfix(loss=f"{log['loss']:.4f}", codes=log["codes_in_use"])
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()))
            running = dict.fromkeys(running, 0.0)
            code_counts.zero_()
            window_start, window_images, window_batches = clock.seconds, 0, 0

        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            state = {"wall_time_seconds": clock.seconds, "images_seen": images_seen}
            path = save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, state)
            logger.info(f"Saved state to {path}")
    progress.close()

    accelerator.wait_for_everyone()
    results = {}
    if accelerator.is_main_process:
        vae = accelerator.unwrap_model(model)
        if ema is not None:
            ema.copy_to(vae.parameters())
        vae = vae.to(memory_format=torch.contiguous_format).eval()
        vae_dir = os.path.join(args.output_dir, "vae")
        vae.save_pretrained(vae_dir, safe_serialization=True)
        wall_time = clock.seconds
        results = evaluate(vae, args)
        hyperparameters = {
            k: getattr(args, k)
            for k in (
                "train_batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "lr_warmup_steps",
                "weight_decay",
                "kl_weight",
                "kl_warmup_fraction",
                "temperature_start",
                "temperature_end",
                "temperature_anneal_fraction",
                "code_usage_weight",
                "mixed_precision",
                "channels_last",
                "use_ema",
                "train_decoder_only",
            )
        }
        hyperparameters["initialized from"] = args.pretrained_model_name_or_path or "random init"
        hyperparameters["decoder width (decoder_n_hid)"] = config.decoder_n_hid or config.n_hid
        hyperparameters["images seen"] = images_seen
        write_model_card(
            os.path.join(vae_dir, "README.md"),
            title=f"DALL-E dVAE ({config.image_size}px, {config.grid_size}x{config.grid_size} grid, "
            f"{config.vocab_size} codes)",
            description=(
                "A discrete VAE in the layout of OpenAI's `dall_e` encoder/decoder (Ramesh et al. 2021, §2.1), "
                "trained with the Gumbel-softmax relaxation, a "
                f"{RECONSTRUCTION_LOSS_NAMES[config.reconstruction_loss]} reconstruction loss and a KL term to the "
                "uniform prior. "
                "Load with `dalle_hf.DalleVAE.from_pretrained(...)`."
            ),
            data=describe_dataset(args),
            command=command_line("dalle_hf.train_dvae"),
            seed=args.seed,
            steps=step,
            wall_time_seconds=wall_time,
            eval_results=results,
            hyperparameters=hyperparameters,
            tags=("dalle-hf", "dvae", "image-tokenizer"),
        )
        logger.info(f"Saved {vae_dir}; wall time {wall_time:.0f} s; eval {results}")
    accelerator.end_training()
    return {"history": history, "eval": results, "images_seen": images_seen}


if __name__ == "__main__":
    main(parse_args())
