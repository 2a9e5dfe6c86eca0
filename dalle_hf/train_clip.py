"""Train the CLIP reranker (Radford et al. 2021) on captioned images with 🤗 Accelerate.

    python -m dalle_hf.train_clip --dataset shapes --output_dir runs/clip-shapes --max_train_steps 3000 \
        --mixed_precision bf16
    accelerate launch -m dalle_hf.train_clip ...   (same flags)

The loss is CLIP's symmetric InfoNCE over the batch. Every image also brings `--num_hard_negatives` false
captions from its world (`World.clip_dataset`; shapes: a swapped colour, shape, count, size or relation of its own
scene; emoji: the same concept in another style, another concept of its subgroup in the same style) as extra
columns of the image->text softmax, so the model must bind attributes to objects instead of matching bags of
words. In-batch captions that happen to be true of another image ("a circle" for a red circle) are masked out
rather than counted as negatives (`World.caption_is_true`). The validation metric is the top-1 accuracy of picking
an image's true caption among 32 captions of the same world (`evaluate_clip_caption_ranking`).

Outputs in `--output_dir`: `tokenizer/` (written first, so other scripts can reuse it while this one runs),
`clip_model/` (safetensors + README.md model card), `clip_processor/`.
"""

import argparse
import functools
import logging
import math
import os
from collections import defaultdict

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

from .clip import clip_pixel_values, make_clip_config, make_clip_processor
from .data.world import World, load_world
from .tokenization import train_text_tokenizer
from .training_utils import (
    WallClock,
    add_common_args,
    add_dataset_args,
    build_dataloader,
    check_common_args,
    command_line,
    infinite_batches,
    load_frozen_vae,
    save_checkpoint,
    start_run,
    warmup_cosine_lr_lambda,
    weight_decay_groups,
    world_from_args,
    write_model_card,
)

logger = logging.getLogger(__name__)

FINAL_LR_RATIO = 0.0  # CLIP (§2.5) decays the learning rate to zero with a cosine schedule
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP (§2.5) clips the learned temperature so logits scale by at most 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the CLIP reranker (contrastive, with hard negatives).")
    add_common_args(parser)
    add_dataset_args(parser)
    # Text tokenizer.
    parser.add_argument(
        "--tokenizer_name_or_path",
        type=str,
        default=None,
        help="A saved tokenizer folder; default: train a BPE on the world's captions (or reuse output_dir/tokenizer).",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from this CLIPModel (a clip_model/ folder, or a pipeline folder holding one) instead of a random "
        "init; its config replaces the model flags and --tokenizer_name_or_path must be its tokenizer.",
    )
    parser.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary when training the tokenizer.")
    parser.add_argument("--text_seq_len", type=int, default=16, help="Caption length in tokens (<eos> included).")
    # Model (make_clip_config); the defaults are sized for one CPU core.
    parser.add_argument(
        "--image_size", type=int, default=64, help="CLIP's input side (a pretrained model keeps its own)."
    )
    parser.add_argument(
        "--data_image_size",
        type=int,
        default=None,
        help="Side the world's images are resized to before CLIP's processor resizes them to its input side, in "
        "training and validation (default: the world's own, 64 px for shapes and emoji): 32 fine-tunes a 64 px CLIP "
        "for a 32 px generator's samples.",
    )
    parser.add_argument("--vision_width", type=int, default=192, help="Hidden size of the ViT image tower.")
    parser.add_argument("--text_width", type=int, default=128, help="Hidden size of the text tower.")
    parser.add_argument("--num_layers", type=int, default=4, help="Transformer blocks in each tower.")
    # Objective and optimizer.
    parser.add_argument(
        "--num_hard_negatives",
        type=int,
        default=None,
        help="False captions of each image added to its softmax, from the world's hard negatives (default: 8 where "
        "the world has them, shapes and emoji; 0 for an imagefolder).",
    )
    parser.add_argument(
        "--vae_name_or_path",
        type=str,
        default=None,
        help="A trained DalleVAE (folder, vae/ of a pipeline, hub id) for --vae_roundtrip_prob.",
    )
    parser.add_argument(
        "--vae_roundtrip_prob",
        type=float,
        default=0.0,
        help="Share of training images replaced by their dVAE reconstruction (argmax codes, decoded), so CLIP "
        "also learns the decoder's image domain: the only one it ranks at generation time.",
    )
    parser.add_argument(
        "--candidate_bank",
        action="append",
        default=None,
        help="A bank of generated candidates with the checker's verdicts (`benchmarks/rerank_bank.py build` on "
        "training-task prompts of a seed other than the evaluation's 0 and 1); repeat for several. Adds "
        "`candidate_ranking_loss`: among one prompt's candidates, put the mass on those that pass.",
    )
    parser.add_argument(
        "--candidate_bank_weight", type=float, default=1.0, help="Weight of the candidate ranking loss."
    )
    parser.add_argument(
        "--candidate_prompts_per_step",
        type=int,
        default=4,
        help="Bank prompts per update, each with all its candidates (4 x 16 = 64 more images per batch).",
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=200, help="Linear learning-rate warmup.")
    parser.add_argument("--weight_decay", type=float, default=0.2, help="AdamW decay on matrices (CLIP used 0.2).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping.")
    # Validation.
    parser.add_argument("--validation_steps", type=int, default=250, help="Caption-ranking accuracy every N updates.")
    parser.add_argument(
        "--num_validation_images", type=int, default=300, help="Held-out images ranked against 32 captions."
    )
    parser.add_argument(
        "--validation_seed",
        type=int,
        default=0,
        help="Seeds the validation renders, apart from --seed, so runs with different seeds report on the same set "
        "(the one `dalle-hf eval clip` uses by default).",
    )
    parser.set_defaults(train_batch_size=64, learning_rate=5e-4, max_train_steps=3000, logging_steps=25)
    args = parser.parse_args(argv)

    check_common_args(args)
    world = world_from_args(args)  # validates --dataset, --train_data_dir and --task_weights
    if args.num_hard_negatives is None:
        args.num_hard_negatives = 8 if world.has_hard_negatives else 0
    if args.num_hard_negatives < 0:
        raise ValueError(f"--num_hard_negatives must be >= 0, got {args.num_hard_negatives}.")
    if args.num_hard_negatives > 0 and not world.has_hard_negatives:
        raise ValueError(f"--num_hard_negatives needs a world with hard negatives (shapes, emoji); --dataset "
                         f"{args.dataset} has none.")  # fmt: skip
    if args.pretrained_model_name_or_path is not None and args.tokenizer_name_or_path is None:
        raise ValueError(
            "--pretrained_model_name_or_path needs --tokenizer_name_or_path (the tokenizer it was trained with)."
        )
    if not 0.0 <= args.vae_roundtrip_prob <= 1.0:
        raise ValueError(f"--vae_roundtrip_prob must be in [0, 1], got {args.vae_roundtrip_prob}.")
    if args.vae_roundtrip_prob > 0 and args.vae_name_or_path is None:
        raise ValueError(
            "--vae_roundtrip_prob > 0 needs --vae_name_or_path (the dVAE whose reconstructions to train on)."
        )
    if args.candidate_bank_weight < 0 or args.candidate_prompts_per_step < 1:
        raise ValueError(
            "--candidate_bank_weight must be >= 0 and --candidate_prompts_per_step >= 1, got "
            f"{args.candidate_bank_weight} and {args.candidate_prompts_per_step}."
        )
    if args.validation_steps < 1 or args.num_validation_images < 0:
        raise ValueError("--validation_steps must be >= 1 and --num_validation_images >= 0.")
    if args.data_image_size is not None and args.data_image_size < 8:
        raise ValueError(f"--data_image_size must be at least 8 (one ViT patch), got {args.data_image_size}.")
    if args.text_seq_len < 2:
        raise ValueError(f"--text_seq_len must leave room for a word and <eos>, got {args.text_seq_len}.")
    return args


# ----------------------------------------------------------------------------- data


def collate_contrastive(examples: list[dict], tokenizer, world: World | None = None) -> dict:
    """
    Batch images with their text columns: the B true captions first, then each image's hard negatives.

    Args:
        examples (`list[dict]`): items of `world.clip_dataset`.
        tokenizer: the text tokenizer.
        world (`World`, *optional*): decides which columns are also true of an image (`World.caption_is_true`);
            without one, only an identical caption is.

    Returns:
        `dict`: `pixel_values` `(B, 3, H, W)`, `input_ids` `(B * (1 + K), T)` and `false_negative_mask`
        `(B, B * (1 + K))`, True where a column other than the image's own caption is also true of the image.
    """
    texts = [e["text"] for e in examples] + [n for e in examples for n in e.get("negatives", ())]
    input_ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt")["input_ids"]
    is_true = world.caption_is_true if world is not None else (lambda text, e: text == e["text"])
    holds = [[is_true(text, e) for text in texts] for e in examples]
    mask = torch.tensor(holds, dtype=torch.bool)  # (B, B(1+K))
    mask.fill_diagonal_(False)  # column i is image i's own caption: the positive
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]), "input_ids": input_ids,
            "false_negative_mask": mask}  # fmt: skip


def resized(pixel_values: torch.Tensor, size: int) -> torch.Tensor:
    """`(B, 3, H, W)` images in `[0, 1]` at side `size`, resized as the worlds resize their renders (bicubic,
    antialiased); unchanged if already that side (a world may draw at its own side whatever it is asked)."""
    if pixel_values.shape[-1] == size:
        return pixel_values
    return F.interpolate(pixel_values, size=size, mode="bicubic", antialias=True).clamp(0, 1)


@torch.no_grad()
def vae_roundtrip(vae, pixel_values: torch.Tensor, prob: float, generator: torch.Generator) -> torch.Tensor:
    """
    Replace a random share `prob` of the images by their dVAE reconstruction: argmax codes, decoded.

    At generation time CLIP only ever ranks decoder outputs (softer edges, blotchy colour), never clean
    renders; the 600-render caption-ranking set drops from 0.877 to 0.813 top-1 when its images are round-
    tripped (counting 0.98 -> 0.86). The caption stays the rendered scene's: the round trip keeps it true for
    96% of renders (`evaluate_vae_fidelity`), so the rest are label noise.

    Args:
        vae (`DalleVAE`): frozen.
        pixel_values (`torch.Tensor`): `(B, 3, H, W)` in `[0, 1]`, at the dVAE's `image_size`.
        prob (`float`): chance that each image is replaced.
        generator (`torch.Generator`): a CPU generator, so runs are reproducible.

    Returns:
        `torch.Tensor`: a new `(B, 3, H, W)` tensor in `[0, 1]`.
    """
    chosen = (torch.rand(len(pixel_values), generator=generator) < prob).to(pixel_values.device)  # (B,)
    if not chosen.any():
        return pixel_values
    codes = vae.get_codebook_indices(pixel_values[chosen])  # (b, h, w)
    pixel_values = pixel_values.clone()
    pixel_values[chosen] = vae.decode_code(codes).to(pixel_values.dtype)
    return pixel_values


# ----------------------------------------------------------------------------- loss


def candidate_ranking_loss(logits: torch.Tensor, passed: torch.Tensor) -> torch.Tensor:
    """
    Minus the log of the softmax mass a prompt puts on its passing candidates: the reranker's own task, to pick
    one that passes, with any of them right (a multi-positive cross-entropy).

    Args:
        logits (`torch.Tensor`): `(K, N)` scaled similarities of each prompt with its N candidates.
        passed (`torch.Tensor`): `(K, N)` bool, at least one True per row.
    """
    log_probs = logits.log_softmax(dim=-1)
    return -log_probs.masked_fill(~passed, float("-inf")).logsumexp(dim=-1).mean()


def contrastive_loss(logits_per_image: torch.Tensor, false_negative_mask: torch.Tensor) -> torch.Tensor:
    """
    CLIP's symmetric cross-entropy with extra text columns.

    Args:
        logits_per_image (`torch.Tensor`): `(B, B + B * K)` scaled cosine similarities; column `i` is image
            `i`'s caption, the remaining `B * K` columns are hard negatives (images have no extra rows).
        false_negative_mask (`torch.Tensor`): `(B, B + B * K)` bool; masked columns leave the softmax.

    Returns:
        `torch.Tensor`: the mean of the image->text (all columns) and text->image (true captions) losses.
    """
    b = logits_per_image.shape[0]
    labels = torch.arange(b, device=logits_per_image.device)
    logits = logits_per_image.masked_fill(false_negative_mask, float("-inf"))
    loss_image = F.cross_entropy(logits, labels)
    loss_text = F.cross_entropy(logits[:, :b].t(), labels)  # (B texts, B images)
    return (loss_image + loss_text) / 2


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def caption_ranking_hits(
    clip_model: CLIPModel, clip_processor: CLIPProcessor, pixel_values: torch.Tensor, candidates: list[list[str]]
) -> torch.Tensor:
    """Bool `(N,)`: whether CLIP scores each image's first candidate caption above all the others."""
    device, dtype = clip_model.device, clip_model.dtype
    unique = sorted({c for cands in candidates for c in cands})
    index = {c: k for k, c in enumerate(unique)}
    text_embeds = []
    for start in range(0, len(unique), 1024):
        ids = clip_processor.tokenizer(
            unique[start : start + 1024], padding="max_length", truncation=True, return_tensors="pt"
        )["input_ids"].to(device)
        text_embeds.append(F.normalize(clip_model.get_text_features(input_ids=ids).pooler_output.float(), dim=-1))
    text_embeds = torch.cat(text_embeds)  # (U, D)
    image_embeds = []
    for start in range(0, len(pixel_values), 256):
        images = clip_pixel_values(pixel_values[start : start + 256].to(device=device, dtype=dtype), clip_processor)
        features = clip_model.get_image_features(pixel_values=images).pooler_output
        image_embeds.append(F.normalize(features.float(), dim=-1))
    image_embeds = torch.cat(image_embeds)  # (N, D)
    columns = torch.tensor([[index[c] for c in cands] for cands in candidates], device=device)  # (N, C)
    scores = torch.einsum("nd,ncd->nc", image_embeds, text_embeds[columns])  # (N, C)
    return (scores[:, 1:] < scores[:, :1]).all(dim=1).cpu()


def evaluate_clip_caption_ranking(
    clip_model: CLIPModel,
    clip_processor: CLIPProcessor,
    n_images: int = 300,
    n_captions: int = 32,
    seed: int = 0,
    return_per_task: bool = False,
    world: World | None = None,
):
    """
    Top-1 accuracy of picking an image's true caption among `n_captions` captions of a world
    (`World.caption_ranking_set`; chance is `1 / n_captions`).

    On the shapes world (the default) the candidates are the true caption plus `n_captions - 1` false ones for
    the same scene: first every single edit (a swapped colour, shape, size word, count or relation, or the two
    colours exchanged), then random false captions of the world; images are balanced over the six training tasks.
    On the emoji world they are captions of other (concept, style) pairs drawn at random.

    Args:
        clip_model (`CLIPModel`): the model to evaluate (its device and dtype are used).
        clip_processor (`CLIPProcessor`): its tokenizer and image normalization.
        n_images (`int`, *optional*, defaults to 300): held-out renders to rank.
        n_captions (`int`, *optional*, defaults to 32): candidates per image, the true one included.
        seed (`int`, *optional*, defaults to 0): selects the renders and the negatives.
        return_per_task (`bool`, *optional*, defaults to `False`): also return `{group: accuracy}` (shapes
            tasks, emoji styles).
        world (`World`, *optional*, defaults to `None`): whose images and captions to rank (`None`: shapes).

    Returns:
        `float` (or `(float, dict[str, float])` with `return_per_task=True`).

    Example:

    ```python
    >>> from transformers import CLIPModel, CLIPProcessor
    >>> model = CLIPModel.from_pretrained("runs/clip-shapes/clip_model")  # doctest: +SKIP
    >>> processor = CLIPProcessor.from_pretrained("runs/clip-shapes/clip_processor")  # doctest: +SKIP
    >>> evaluate_clip_caption_ranking(model, processor, n_images=300)  # doctest: +SKIP
    0.9
    ```
    """
    world = world if world is not None else load_world("shapes")
    ranking = world.caption_ranking_set(n_images, n_captions, seed)
    pixel_values, candidates, tasks = ranking.pixel_values, ranking.candidates, ranking.groups
    was_training = clip_model.training
    clip_model.eval()
    hits = caption_ranking_hits(clip_model, clip_processor, pixel_values, candidates)
    clip_model.train(was_training)
    accuracy = hits.float().mean().item()
    if not return_per_task:
        return accuracy
    per_task = defaultdict(list)
    for task, hit in zip(tasks, hits.tolist()):
        per_task[task].append(hit)
    return accuracy, {task: sum(h) / len(h) for task, h in per_task.items()}


# ----------------------------------------------------------------------------- training


def load_or_train_tokenizer(args: argparse.Namespace, is_main_process: bool):
    """
    `--tokenizer_name_or_path`, else `output_dir/tokenizer` from an earlier start of this run, else a BPE trained
    on the world's captions (`World.tokenizer_captions`). Saved to `output_dir/tokenizer`.
    """
    saved = os.path.join(args.output_dir, "tokenizer")
    path = args.tokenizer_name_or_path or (saved if os.path.isfile(os.path.join(saved, "tokenizer.json")) else None)
    if path is not None:
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        captions = world_from_args(args).tokenizer_captions(seed=args.seed)
        tokenizer = train_text_tokenizer(captions, args.vocab_size, args.text_seq_len)
    if tokenizer.pad_token_id != 0 or tokenizer.eos_token_id != 1:
        raise ValueError(f"the tokenizer must have <pad> id 0 and <eos> id 1, got {tokenizer.pad_token_id}, "
                         f"{tokenizer.eos_token_id} (train it with dalle_hf.train_text_tokenizer)")  # fmt: skip
    if is_main_process:
        tokenizer.save_pretrained(saved)  # first thing: the transformer run reuses this tokenizer
    return tokenizer


def load_pretrained_clip(path: str) -> CLIPModel:
    """
    A CLIPModel from a clip_model/ folder, or from the clip_model/ subfolder of a pipeline folder or hub repo, in
    float32 whatever it is stored in: the shipped ones are stored in bfloat16, whose 8-bit mantissa would round away
    most of AdamW's updates (the training's bf16 autocast still computes in bfloat16).
    """
    subfolder = "clip_model" if os.path.isdir(os.path.join(path, "clip_model")) else ""
    return CLIPModel.from_pretrained(path, subfolder=subfolder, dtype=torch.float32)


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    # nanoGPT: weight decay only on matrices (dim >= 2); none on biases, LayerNorms and the logit scale.
    groups = weight_decay_groups(model, args.weight_decay)
    # CLIP §2.5 / appendix F: Adam with decoupled weight decay, beta2 = 0.98 and eps = 1e-6 for stability.
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.98), eps=1e-6)


def main(args: argparse.Namespace) -> dict:
    accelerator, resume_dir, first_step, trainer_state = start_run(args)

    tokenizer = load_or_train_tokenizer(args, accelerator.is_main_process)
    if args.pretrained_model_name_or_path is not None:
        model = load_pretrained_clip(args.pretrained_model_name_or_path)
        if model.config.text_config.vocab_size != len(tokenizer):
            raise ValueError(
                f"{args.pretrained_model_name_or_path} has a text vocabulary of "
                f"{model.config.text_config.vocab_size}, the tokenizer {len(tokenizer)}: pass its tokenizer."
            )
    else:
        model = CLIPModel(make_clip_config(
            text_vocab_size=len(tokenizer),
            text_seq_len=tokenizer.model_max_length,
            image_size=args.image_size,
            vision_width=args.vision_width,
            vision_layers=args.num_layers,
            text_width=args.text_width,
            text_layers=args.num_layers,
        ))  # fmt: skip
    config = model.config  # a pretrained model's replaces the model flags
    image_size = config.vision_config.image_size
    processor = make_clip_processor(tokenizer, image_size=image_size)
    optimizer = make_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lr_lambda(args.lr_warmup_steps, args.max_train_steps, FINAL_LR_RATIO)
    )

    world = world_from_args(args)
    # A world's own renders (64 px), or those resized to --data_image_size; clip_pixel_values resizes them for CLIP.
    data_size = args.data_image_size or world.native_image_size or image_size
    vae = None
    if args.vae_roundtrip_prob > 0:
        vae = load_frozen_vae(args.vae_name_or_path).to(accelerator.device)
        if vae.config.image_size != data_size:
            raise ValueError(
                f"--vae_name_or_path takes {vae.config.image_size}px images, the training images are {data_size}px."
            )

    bank = world.candidate_bank(args.candidate_bank) if args.candidate_bank else None
    if bank is not None:
        if bank.images.shape[2] != data_size:  # its candidates share the forward with the training images
            raise ValueError(
                f"--candidate_bank holds {bank.images.shape[2]}px images, the training images are {data_size}px."
            )
        logger.info(f"Candidate banks: {len(bank)} prompts with both verdicts, {bank.images.shape[1]} candidates each")

    # A resumed run reseeds the data (a new stream of shapes scenes, new emoji captions and negatives).
    data_seed = args.seed + first_step
    roundtrip_generator = torch.Generator().manual_seed(data_seed * 1000 + accelerator.process_index)
    bank_generator = torch.Generator().manual_seed(data_seed * 1000 + 500 + accelerator.process_index)
    dataset = world.clip_dataset(data_size, data_seed, args.num_hard_negatives)
    collate_fn = functools.partial(collate_contrastive, tokenizer=tokenizer, world=world)
    dataloader = build_dataloader(dataset, args.train_batch_size, args.dataloader_num_workers, data_seed, collate_fn)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    if resume_dir:
        logger.info(f"Resuming from {resume_dir} (step {first_step})")
        accelerator.load_state(resume_dir)
    clock = WallClock(trainer_state.get("wall_time_seconds", 0.0))
    images_seen = trainer_state.get("images_seen", 0)

    validation = roundtrip_validation = None
    if world.has_ranking_set and args.num_validation_images > 0:
        ranking = world.caption_ranking_set(args.num_validation_images, n_captions=32, seed=args.validation_seed)
        pixels = resized(ranking.pixel_values, data_size)  # (N, 3, S, S): validated at the side it trains at
        validation = (pixels, ranking.candidates, ranking.groups)
        if vae is not None:  # the same renders after a dVAE round trip (all of them): the domain CLIP ranks in
            with accelerator.autocast():
                roundtrip_pixels = vae_roundtrip(vae, validation[0].to(accelerator.device), 1.0, torch.Generator())
            roundtrip_validation = (roundtrip_pixels.cpu(), *validation[1:])

    def validate(ranking_set) -> tuple[float, dict]:
        clip = accelerator.unwrap_model(model).eval()
        hits = caption_ranking_hits(clip, processor, *ranking_set[:2])
        clip.train()
        per_task = defaultdict(list)
        for task, hit in zip(ranking_set[2], hits.tolist()):
            per_task[task].append(hit)
        return hits.float().mean().item(), {t: round(sum(h) / len(h), 3) for t, h in per_task.items()}

    def validate_all() -> dict:
        accuracy, per_task = validate(validation)
        record = {"step": step, "caption_top1": accuracy, **per_task}
        if roundtrip_validation is not None:
            record["roundtrip_caption_top1"], record["roundtrip"] = validate(roundtrip_validation)
        return record

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {total_batch} images per update, "
        f"{1 + args.num_hard_negatives} captions per image"
    )

    model.train()
    progress = tqdm(
        range(args.max_train_steps), initial=first_step, disable=not accelerator.is_local_main_process, desc="CLIP"
    )
    running = {"loss": 0.0, "train_top1": 0.0, **({"rank_loss": 0.0, "rank_pick": 0.0} if bank else {})}
    window_start, window_images, window_batches = clock.seconds, 0, 0
    history, validations = [], []
    step = first_step
    batches = infinite_batches(dataloader)
    while step < args.max_train_steps:
        with accelerator.accumulate(model):
            batch = next(batches)
            pixel_values = resized(batch["pixel_values"].to(accelerator.device), data_size)  # (B, 3, S, S) in [0, 1]
            if vae is not None:
                with accelerator.autocast():  # bf16 convolutions halve the round trip's cost on CPU
                    pixel_values = vae_roundtrip(vae, pixel_values, args.vae_roundtrip_prob, roundtrip_generator)
            b, n_texts = pixel_values.shape[0], batch["input_ids"].shape[0]
            input_ids = batch["input_ids"].to(accelerator.device)
            if bank is not None:  # the bank's candidates and prompts ride in the same forward (one DDP pass)
                bank_pixels, bank_prompts, bank_passed = bank.sample(args.candidate_prompts_per_step, bank_generator)
                bank_ids = tokenizer(bank_prompts, padding="max_length", truncation=True, return_tensors="pt")
                pixel_values = torch.cat([pixel_values, bank_pixels.to(pixel_values)])  # (B + k N, 3, H, W)
                input_ids = torch.cat([input_ids, bank_ids["input_ids"].to(accelerator.device)])  # (T + k, L)
            pixel_values = clip_pixel_values(pixel_values, processor)
            outputs = model(input_ids=input_ids, pixel_values=pixel_values)
            # Logits in float32: under bf16 autocast the embeddings are bf16, and a scale of up to 100 would
            # amplify their rounding.
            logit_scale = accelerator.unwrap_model(model).logit_scale.exp()
            image_embeds, text_embeds = outputs.image_embeds.float(), outputs.text_embeds.float()
            logits_per_image = image_embeds[:b] @ text_embeds[:n_texts].t() * logit_scale  # (B, B(1+K))
            mask = batch["false_negative_mask"].to(accelerator.device)
            loss = contrastive_loss(logits_per_image, mask)
            if bank is not None:
                k = len(bank_prompts)
                candidates = image_embeds[b:].view(k, -1, image_embeds.shape[-1])  # (k, N, D)
                bank_logits = (candidates @ text_embeds[n_texts:, :, None])[..., 0] * logit_scale  # (k, N)
                bank_passed = bank_passed.to(accelerator.device)
                rank_loss = candidate_ranking_loss(bank_logits, bank_passed)
                loss = loss + args.candidate_bank_weight * rank_loss
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            accelerator.unwrap_model(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)

        images_seen += b * accelerator.num_processes
        window_images += b * accelerator.num_processes
        window_batches += 1
        running["loss"] += loss.item()
        with torch.no_grad():  # the true caption beats every unmasked column (own hard negatives included)
            top = logits_per_image.masked_fill(mask, float("-inf")).argmax(dim=1)
            running["train_top1"] += (top == torch.arange(b, device=top.device)).float().mean().item()
            if bank is not None:  # the pick among a prompt's candidates passes the checker
                running["rank_loss"] += rank_loss.item()
                picks = bank_passed.gather(1, bank_logits.argmax(dim=1, keepdim=True))
                running["rank_pick"] += picks.float().mean().item()
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)

        if step % args.logging_steps == 0 or step == args.max_train_steps:
            elapsed = clock.seconds - window_start
            log = {k: v / window_batches for k, v in running.items()}
            log.update(
                step=step,
                logit_scale=round(logit_scale.item(), 2),
                lr=lr_scheduler.get_last_lr()[0],
                steps_per_second=round(window_batches / args.gradient_accumulation_steps / max(elapsed, 1e-9), 3),
                images_per_second=round(window_images / max(elapsed, 1e-9), 1),
            )
            history.append(log)
            progress.set_postfix(loss=f"{log['loss']:.4f}", top1=f"{log['train_top1']:.3f}")
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()))
            running = dict.fromkeys(running, 0.0)
            window_start, window_images, window_batches = clock.seconds, 0, 0

        if (
            validation is not None
            and accelerator.is_main_process
            and (step % args.validation_steps == 0 or step == args.max_train_steps)
        ):
            record = validate_all()
            validations.append(record)
            logger.info(f"val {record}")

        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            state = {"wall_time_seconds": clock.seconds, "images_seen": images_seen}
            path = save_checkpoint(accelerator, args.output_dir, step, args.checkpoints_total_limit, state)
            logger.info(f"Saved state to {path}")
    progress.close()

    accelerator.wait_for_everyone()
    results = {}
    if accelerator.is_main_process:
        clip = accelerator.unwrap_model(model).eval()
        model_dir = os.path.join(args.output_dir, "clip_model")
        clip.save_pretrained(model_dir, safe_serialization=True)
        processor.save_pretrained(os.path.join(args.output_dir, "clip_processor"))
        tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))
        wall_time = clock.seconds
        if validation is not None:
            if not validations or validations[-1]["step"] != step:
                validations.append(validate_all())
            final = validations[-1]
            results = {
                f"caption top-1 among 32 (true + 31 false captions of the world; {args.num_validation_images} "
                f"validation images, seed {args.validation_seed})": final["caption_top1"],
                **{f"caption top-1, {group}": final[group] for group in sorted(set(validation[2])) if group in final},
                "caption top-1 during training (step: top-1)": ", ".join(
                    f"{v['step']}: {v['caption_top1']:.3f}" for v in validations
                ),
            }
            if "roundtrip_caption_top1" in final:
                results["caption top-1 among 32, the same renders after a dVAE round trip"] = final[
                    "roundtrip_caption_top1"
                ]
                results.update({f"round-trip caption top-1, {t}": a for t, a in final["roundtrip"].items()})
        hyperparameters = {
            k: getattr(args, k)
            for k in (
                "train_batch_size", "gradient_accumulation_steps", "num_hard_negatives", "learning_rate",
                "lr_warmup_steps", "weight_decay", "max_grad_norm", "mixed_precision", "vision_width", "text_width",
                "num_layers", "text_seq_len",
            )
        }  # fmt: skip
        hyperparameters["text vocabulary"] = len(tokenizer)
        hyperparameters["training image side (px, before CLIP's resize)"] = data_size
        hyperparameters.update(world.hyperparameters(for_clip=True))
        hyperparameters["initialized from"] = args.pretrained_model_name_or_path or "random init"
        if vae is not None:
            hyperparameters["dVAE round-trip share"] = f"{args.vae_roundtrip_prob:g} ({args.vae_name_or_path})"
        if bank is not None:
            hyperparameters["candidate banks"] = (
                f"{', '.join(args.candidate_bank)}: {len(bank)} prompts with both verdicts; "
                f"{args.candidate_prompts_per_step} per update, loss weight {args.candidate_bank_weight:g}"
            )
        hyperparameters["images seen"] = images_seen
        write_model_card(
            os.path.join(model_dir, "README.md"),
            title=f"CLIP reranker ({config.vision_config.image_size}px ViT/{config.vision_config.patch_size}, "
            f"{sum(p.numel() for p in clip.parameters()) / 1e6:.1f}M parameters)",
            description=(
                "A small `transformers.CLIPModel` (Radford et al. 2021) that reranks DALL-E samples (Ramesh et al. "
                "2021, §2.5). Trained with CLIP's symmetric contrastive loss"
                + (
                    f" plus, for every image, {args.num_hard_negatives} false captions "
                    f"({world.hard_negatives_description})"
                    " in the image->text softmax"
                    if args.num_hard_negatives
                    else ""
                )
                + ". Load with `CLIPModel.from_pretrained(...)` and "
                "`CLIPProcessor.from_pretrained(<output_dir>/clip_processor)`; score with "
                "`dalle_hf.clip.clip_text_image_scores`."
            ),
            data=world.describe(for_clip=True),
            command=command_line("dalle_hf.train_clip"),
            seed=args.seed,
            steps=step,
            wall_time_seconds=wall_time,
            eval_results=results,
            hyperparameters=hyperparameters,
            tags=("dalle-hf", "clip", "reranker"),
        )
        logger.info(f"Saved {model_dir}; wall time {wall_time:.0f} s; eval {results}")
    accelerator.end_training()
    return {"history": history, "validations": validations, "eval": results, "images_seen": images_seen}


if __name__ == "__main__":
    main(parse_args())
