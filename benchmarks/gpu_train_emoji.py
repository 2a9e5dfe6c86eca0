"""Train the emoji transformer on one GPU from saved dVAE codes, in a fixed time, and save a pipeline the CPU evaluates.

    # on the GPU machine (one H200): 7 minutes of training, about 1 more of start-up and saving
    python benchmarks/gpu_train_emoji.py --codes CODES.safetensors --cache EMOJI_CACHE --vae VAE --tokenizer TOKENIZER \
        --clip checkpoints/dalle-emoji --out OUT --max_minutes 7
    # back on the CPU
    dalle-hf eval emoji --pipeline OUT --judge checkpoints/emoji-judge --cache /work/emoji-cache --out OUT/eval ...
    # the suite runs it on the CPU with a tiny model: --device cpu --max_steps 2 --n_layer 1 --n_embd 32 --n_head 2

`train_dalle` on a GPU would spend most of its time in Python: drawing and tokenizing a caption per image per step.
Here everything a step needs lives on the device: the codes (`image_codes.safetensors` of `train_dalle`, int16 or
int32), every caption an image can get (`EmojiTraining.caption_choices`, tokenized once) and its probability, so a
step draws images, captions and caption dropout with three tensor ops. A codes file written with
`train_dalle --image_augmentations K` (`(N, 1 + K, grid * grid)`: each image and K crops of it) is read with the
settings it records and checked as `train_dalle` checks it; each draw of an image then takes one of its 1 + K versions
uniformly, with one more tensor op. The caption mix is the same as on the CPU;
images are drawn with replacement. The learning rate warms up linearly, then follows a cosine to a tenth of its peak
over the run's progress, the larger of steps done / `--max_steps` and time spent / `--max_minutes`, so a time-boxed
run still ends its schedule. Weights stay float32 (bf16 autocast, as `train_dalle --mixed_precision bf16`).

Written to `--out`: the `DallePipeline` (`save_pretrained`, safetensors: tokenizer, transformer, the dVAE the codes
came from, CLIP if `--clip`) and `train_log.json` (the arguments, the device, steps, captions, seconds, the loss
history).
"""

import argparse
import json
import math
import os
import sys
import time

import torch

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.data.world import load_world
from dalle_hf.modeling_dalle import DalleForImageGeneration
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.train_dalle import load_or_encode_dataset, saved_augmentation
from dalle_hf.training_utils import load_frozen_vae, weight_decay_groups


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", required=True, help="image_codes.safetensors (train_dalle); encoded here if absent")
    parser.add_argument("--cache", required=True, help="the emoji cache the codes were made from (captions, checks)")
    parser.add_argument("--vae", required=True, help="the dVAE of the codes (a vae/ folder or a pipeline folder)")
    parser.add_argument("--tokenizer", required=True, help="a saved tokenizer (e.g. checkpoints/dalle-emoji/tokenizer)")
    parser.add_argument("--clip", default=None, help="a pipeline folder whose CLIP the saved pipeline ships")
    parser.add_argument("--transformer", default=None, help="start from these weights (a pipeline or transformer/)")
    parser.add_argument("--out", required=True, help="where the pipeline and train_log.json go")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, cpu (the suite's tiny run)")
    parser.add_argument("--max_minutes", type=float, default=7.0, help="training time (start-up and saving: ~1 min)")
    parser.add_argument("--max_steps", type=int, default=None, help="stop after this many updates (default: time)")
    # The model: wider than the CPU's 6 x 256, since a GPU minute trains far more captions than a CPU hour.
    parser.add_argument("--n_layer", type=int, default=12)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.1, help="13,028 images are seen hundreds of times")
    parser.add_argument("--text_seq_len", type=int, default=20, help="the emoji model's caption length")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--learning_rate", type=float, default=6e-4)
    parser.add_argument("--warmup_steps", type=int, default=500)
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay on matrices only (nanoGPT)")
    parser.add_argument("--caption_dropout", type=float, default=0.1, help="all-padding captions, for guidance")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (costs compile time)")
    parser.add_argument("--default_guidance_scale", type=float, default=3.0, help="saved in model_index.json")
    parser.add_argument("--log_every", type=int, default=200, help="updates between loss records")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("n_layer", "n_head", "n_embd", "batch_size", "log_every", "text_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max_steps must be at least 1, got {args.max_steps}")
    if args.max_minutes <= 0 or args.learning_rate <= 0 or args.warmup_steps < 0:
        raise ValueError("--max_minutes and --learning_rate must be positive, --warmup_steps at least 0")
    if not 0 <= args.caption_dropout < 1 or not 0 <= args.dropout < 1:
        raise ValueError("--caption_dropout and --dropout must be in [0, 1)")
    if args.n_embd % args.n_head:
        raise ValueError(f"--n_embd ({args.n_embd}) must be a multiple of --n_head ({args.n_head})")
    return args


def caption_table(dataset, tokenizer, text_seq_len: int):
    """
    Every caption each training image can get, tokenized once.

    Returns:
        `(tokens (U, L), choices (N, V), probs (N, V))`: the `U` distinct captions, and for image `i` the indices of
        its `V` (at most) captions in `tokens` with their probabilities (0 where it has fewer).
    """
    per_image = [dataset.caption_choices(i) for i in range(len(dataset))]
    captions = sorted({caption for choices in per_image for caption, _ in choices})
    row = {caption: i for i, caption in enumerate(captions)}
    tokens = tokenizer(captions, padding="max_length", truncation=True, max_length=text_seq_len,
                       return_tensors="pt")["input_ids"]  # fmt: skip
    width = max(len(choices) for choices in per_image)
    choices = torch.zeros(len(per_image), width, dtype=torch.long)
    probs = torch.zeros(len(per_image), width)
    for i, image_choices in enumerate(per_image):
        for j, (caption, p) in enumerate(image_choices):
            choices[i, j], probs[i, j] = row[caption], p
    return tokens, choices, probs


def lr_factor(step: int, progress: float, warmup_steps: int, final_ratio: float = 0.1) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from 1 to `final_ratio` over `progress` in [0, 1]."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def main(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    started = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)

    # 1. The codes (checked against the dVAE and the cache as train_dalle checks them) and the caption table
    vae = load_frozen_vae(args.vae).to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    dataset = load_world("emoji", args.cache).train_dataset(vae.config.image_size, args.seed)
    encoded = load_or_encode_dataset(dataset, vae, args.codes, **saved_augmentation(args.codes))
    image_ids = encoded.image_ids.to(device)  # (N, grid * grid) or (N, 1 + K, grid * grid), int16 or int32
    if image_ids.dim() == 2:
        image_ids = image_ids[:, None]  # (N, grid * grid) -> (N, 1, grid * grid): one version of each image
    tokens, choices, probs = (t.to(device) for t in caption_table(dataset, tokenizer, args.text_seq_len))
    vae = vae.cpu()

    # 2. The transformer, float32 master weights
    config = DalleConfig(text_vocab_size=len(tokenizer), text_seq_len=args.text_seq_len,
                         image_vocab_size=vae.config.vocab_size, image_grid_size=vae.config.grid_size,
                         pad_token_id=tokenizer.pad_token_id, n_layer=args.n_layer, n_head=args.n_head,
                         n_embd=args.n_embd, dropout=args.dropout)  # fmt: skip
    if args.transformer:
        subfolder = "transformer" if os.path.isdir(os.path.join(args.transformer, "transformer")) else ""
        model = DalleForImageGeneration.from_pretrained(args.transformer, subfolder=subfolder, dtype=torch.float32)
        differs = {k: (getattr(config, k), getattr(model.config, k)) for k in
                   ("text_vocab_size", "text_seq_len", "image_vocab_size", "image_grid_size", "n_layer", "n_head",
                    "n_embd") if getattr(config, k) != getattr(model.config, k)}  # fmt: skip
        if differs:
            raise ValueError(f"--transformer has another config (flags, checkpoint): {differs}")
    else:
        model = DalleForImageGeneration(config)
    model = model.to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(weight_decay_groups(model, args.weight_decay), lr=args.learning_rate,
                                  betas=(0.9, 0.95), eps=1e-8, **fused)  # fmt: skip
    step_model = torch.compile(model) if args.compile else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters; {len(image_ids):,} images x {image_ids.shape[1]} versions; "
          f"{len(tokens):,} distinct captions; "
          f"start-up {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip

    # 3. Train until --max_steps or --max_minutes
    history, step, captions_seen = [], 0, 0
    running = torch.zeros(3, device=device)  # loss, text_loss, image_loss summed since the last record
    budget = args.max_minutes * 60
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_start = window_start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - train_start
        progress = max(step / args.max_steps if args.max_steps else 0.0, elapsed / budget)
        if progress >= 1:
            break
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * lr_factor(step, progress, args.warmup_steps)
        index = torch.randint(len(image_ids), (args.batch_size,), device=device, generator=generator)  # (B,)
        pick = torch.multinomial(probs[index], 1, generator=generator).squeeze(1)  # (B,) one caption of each image
        input_ids = tokens[choices[index, pick]]  # (B, L)
        dropped = torch.rand(args.batch_size, device=device, generator=generator) < args.caption_dropout
        input_ids = input_ids.masked_fill(dropped[:, None], tokenizer.pad_token_id)
        if image_ids.shape[1] > 1:  # one version (the image or one of its crops) of each drawn image
            version = torch.randint(image_ids.shape[1], (args.batch_size,), device=device, generator=generator)
            codes = image_ids[index, version].long()  # (B, grid * grid)
        else:
            codes = image_ids[index, 0].long()  # (B, grid * grid)
        with autocast:
            outputs = step_model(input_ids=input_ids, image_ids=codes, return_loss=True)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += torch.stack([outputs.loss, outputs.text_loss, outputs.image_loss]).detach().float()
        step += 1
        captions_seen += args.batch_size
        if step % args.log_every == 0 or (args.max_steps and step == args.max_steps):
            n = step - (history[-1]["step"] if history else 0)
            loss, text_loss, image_loss = (running / n).tolist()  # one device sync per record
            now = time.perf_counter()
            record = {"step": step, "loss": loss, "text_loss": text_loss, "image_loss": image_loss,
                      "lr": optimizer.param_groups[0]["lr"], "seconds": round(now - train_start, 2),
                      "captions_per_second": round(n * args.batch_size / max(now - window_start, 1e-9))}  # fmt: skip
            history.append(record)
            print(json.dumps(record), flush=True)
            running.zero_()
            window_start = now
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_start

    # 4. Save the pipeline (float32 on the CPU, where it is evaluated) and the log
    model = model.cpu().eval()
    clip_model = clip_processor = None
    if args.clip:
        clip_model = CLIPModel.from_pretrained(args.clip, subfolder="clip_model").eval()
        clip_processor = CLIPProcessor.from_pretrained(args.clip, subfolder="clip_processor")
    pipe = DallePipeline(tokenizer=tokenizer, transformer=model, vae=vae, clip_model=clip_model,
                         clip_processor=clip_processor, default_guidance_scale=args.default_guidance_scale)  # fmt: skip
    pipe.save_pretrained(args.out, safe_serialization=True)
    log = {
        "command": " ".join(["python", *sys.argv]),
        "args": vars(args),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "parameters": n_params,
        "steps": step,
        "captions_seen": captions_seen,
        "epochs": round(captions_seen / len(image_ids), 2),
        "image_versions": image_ids.shape[1],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "history": history,
    }
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"{step} steps, {captions_seen:,} captions in {train_seconds:.0f} s -> {args.out}", flush=True)
    return log


if __name__ == "__main__":
    main(parse_args())
