"""Train the DALL-E transformer (paper §2.2) on dVAE codes with 🤗 Accelerate.

    python -m dalle_hf.train_dalle --dataset shapes --vae_name_or_path runs/dvae-shapes/vae \
        --tokenizer_name_or_path runs/clip-shapes/tokenizer --clip_name_or_path runs/clip-shapes \
        --output_dir runs/dalle-shapes --n_layer 8 --n_embd 256 --mixed_precision bf16 --max_train_steps 20000
    accelerate launch -m dalle_hf.train_dalle ...   (same flags; DDP/FSDP/DeepSpeed from the accelerate config)

The frozen dVAE tokenizes images on the fly (an infinite stream such as the shapes world never repeats); a finite
image folder is tokenized once and cached. Captions are dropped to all-padding with `--caption_dropout` so the
same model serves as the unconditional branch of classifier-free guidance. The whole `DallePipeline` (tokenizer,
transformer, vae and, if given, CLIP) is saved to `--output_dir` with a README.md model card.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from .configuration_dalle import ATTENTION_TYPES, DalleConfig
from .eval import evaluate_during_training
from .modeling_dalle import DalleForImageGeneration
from .training_utils import (
    load_frozen_vae,
    start_run,
    weight_decay_groups,
    WallClock,
    add_common_args,
    add_dataset_args,
    build_dataloader,
    build_train_dataset,
    check_common_args,
    command_line,
    describe_dataset,
    infinite_batches,
    world_from_args,
    save_checkpoint,
    warmup_cosine_lr_lambda,
    write_model_card,
)

logger = logging.getLogger(__name__)


def apply_word_dropout(
    input_ids: torch.Tensor, p: float, pad_token_id: int, keep_token_ids: tuple[int, ...] = (), generator=None
) -> torch.Tensor:
    """
    Replace each caption token by padding with probability `p` (word dropout: Iyyer et al. 2015, Bowman et al. 2016).

    The image then has to be predicted from the words that remain, so no single word (say the shape in "a purple
    triangle") can carry what another (the colour) means. Padding and `keep_token_ids` (e.g. end-of-text) are left as
    they are; the padding that replaces a word is that position's own padding token, as for short captions.

    Args:
        input_ids (`torch.Tensor` of shape `(B, L)`): caption token ids.
        p (`float`): drop probability per token, in [0, 1).
        pad_token_id (`int`): the id that means "no text here".
        keep_token_ids (`tuple[int, ...]`, *optional*): ids that are never dropped.
        generator (`torch.Generator`, *optional*): for reproducible drops.

    Returns:
        `torch.Tensor`: a new `(B, L)` tensor; `input_ids` is not modified.
    """
    if not 0 <= p < 1:
        raise ValueError(f"word dropout p must be in [0, 1), got {p!r}")
    droppable = input_ids != pad_token_id
    for token_id in keep_token_ids:
        droppable &= input_ids != token_id
    drop = droppable & (torch.rand(input_ids.shape, generator=generator, device=input_ids.device) < p)
    return input_ids.masked_fill(drop, pad_token_id)


# --held_out_images where the world has held-out images (emoji, shapes): 256 + 256 images measure in 2.5 s on one
# CPU thread (bf16 autocast; 5.6 s in float32) for 6 layers x 256 on 8 x 8 codes, against about 0.6 s an update there
# (benchmarks/held_out_loss_cost.py): under 1% of 1,000 updates.
HELD_OUT_IMAGES = 256
HELD_OUT_LOSS_FILE = "held_out_loss.jsonl"  # in --output_dir, one JSON line per measurement


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train the DALL-E transformer.")
    add_common_args(parser)
    add_dataset_args(parser)
    parser.add_argument(
        "--vae_name_or_path", required=True, help="A trained DalleVAE (folder, vae/ of a pipeline, hub id)."
    )
    parser.add_argument(
        "--tokenizer_name_or_path",
        default=None,
        help="A saved tokenizer; default: train a BPE on the world's captions.",
    )
    parser.add_argument(
        "--clip_name_or_path", default=None, help="A folder with clip_model/ and clip_processor/ to ship."
    )
    parser.add_argument(
        "--transformer_name_or_path",
        default=None,
        help="Start from these transformer weights (a pipeline folder or transformer/ folder) instead of a random "
        "init; the model flags must match its config.",
    )
    parser.add_argument(
        "--image_codes",
        default=None,
        help="A file of the dataset's dVAE codes (safetensors): read if it exists and matches the dVAE and dataset, "
        "else written; default: image_codes.safetensors in --output_dir. Pass an earlier run's file to skip encoding.",
    )
    parser.add_argument(
        "--image_augmentations",
        type=int,
        default=0,
        help="Encode each image of a finite dataset this many more times, each under a random square crop resized back "
        "(DALL-E's random crops), and draw one of its 1 + K versions per use: more distinct images against "
        "memorisation, at 1 + K times the encoding. 0: the images as they are.",
    )
    parser.add_argument(
        "--augment_min_scale",
        type=float,
        default=0.85,
        help="The smallest crop side, as a fraction of the image side (drawn uniformly from [this, 1]).",
    )
    parser.add_argument(
        "--augment_seed",
        type=int,
        default=0,
        help="Seeds the crops (with the image index; not --seed, so runs with other seeds share one --image_codes).",
    )
    parser.add_argument("--text_seq_len", type=int, default=16, help="Text tokens per caption (paper: 256).")
    parser.add_argument("--text_vocab_size", type=int, default=512, help="BPE vocabulary when training a tokenizer.")
    parser.add_argument("--n_layer", type=int, default=8)
    parser.add_argument("--n_head", type=int, default=8)
    parser.add_argument("--n_embd", type=int, default=256)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument(
        "--attention_types",
        default=None,
        help=f"Comma-separated per-layer layouts from {ATTENTION_TYPES}; default full.",
    )
    parser.add_argument(
        "--no_text_self_attention",
        action="store_true",
        help="Text tokens see only BOS and themselves (DalleConfig.text_self_attention=False); default: causal text.",
    )
    parser.add_argument("--caption_dropout", type=float, default=0.1, help="P(caption -> all padding), for guidance.")
    parser.add_argument("--word_dropout", type=float, default=0.0, help="P(one caption token -> padding); 0: off.")
    parser.add_argument("--lr_warmup_steps", type=int, default=500)
    parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW decay on matrices only (nanoGPT).")
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument(
        "--validation_steps", type=int, default=1000, help="Sample the validation prompts every N steps."
    )
    parser.add_argument(
        "--held_out_images",
        type=int,
        default=None,
        help="At every --validation_steps and at the end, measure the image loss (nats per image token, teacher-"
        "forced, given the caption, eval mode: no dropout) on this many of the world's held-out images (never "
        f"trained on) and on as many fixed training images; written to {HELD_OUT_LOSS_FILE}. Training loss falling "
        f"while held-out loss rises is memorisation. Default: {HELD_OUT_IMAGES} where the world has held-out images "
        "(emoji, shapes), else 0 (off). Cost: one measurement of 256 + 256 images is 2.5 s on one CPU thread (bf16; "
        "5.6 s fp32) for 6 layers x 256 on 8 x 8 codes, about 4 to 9 updates there.",
    )
    parser.add_argument(
        "--eval_prompts_per_task",
        type=int,
        default=0,
        help="Prompts per task of the world's benchmark at the end (shapes: ShapesEval; 0: skip).",
    )
    args = parser.parse_args(argv)
    check_common_args(args)
    if not 0 <= args.caption_dropout < 1:
        raise ValueError(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}.")
    if not 0 <= args.word_dropout < 1:
        raise ValueError(f"--word_dropout must be in [0, 1), got {args.word_dropout}.")
    if args.attention_types is not None:
        args.attention_types = args.attention_types.split(",")
        if len(args.attention_types) != args.n_layer:
            raise ValueError(
                f"--attention_types needs {args.n_layer} comma-separated layouts, got {len(args.attention_types)}."
            )
    if args.validation_steps < 1:
        raise ValueError("--validation_steps must be at least 1.")
    if args.image_augmentations < 0:
        raise ValueError(f"--image_augmentations must be at least 0 (0: no copies), got {args.image_augmentations}.")
    if not 0 < args.augment_min_scale <= 1:
        raise ValueError(f"--augment_min_scale must be in (0, 1] (of the side), got {args.augment_min_scale}.")
    world = world_from_args(args)
    if args.held_out_images is None:
        args.held_out_images = HELD_OUT_IMAGES if world.has_held_out_examples else 0
    elif args.held_out_images < 0:
        raise ValueError(f"--held_out_images must be at least 0 (0: off), got {args.held_out_images}.")
    elif args.held_out_images > 0 and not world.has_held_out_examples:
        raise ValueError(f"--held_out_images needs a world with held-out images (emoji, shapes); the {args.dataset} "
                         "world has none: leave the flag out or pass 0.")  # fmt: skip
    return args


def load_or_train_tokenizer(args):
    from transformers import AutoTokenizer

    if args.tokenizer_name_or_path:
        return AutoTokenizer.from_pretrained(args.tokenizer_name_or_path)
    from .tokenization import train_text_tokenizer

    captions = world_from_args(args).tokenizer_captions(seed=args.seed)
    return train_text_tokenizer(captions, args.text_vocab_size, args.text_seq_len)


class EncodedImages(Dataset):
    """
    A finite dataset with its images encoded once by the frozen dVAE: items are `{"image_ids": (N,), "text": str}`.

    The caption is read at every access (`dataset.text(i)` where the dataset has it, else `dataset[i]["text"]`), so
    a world that draws a caption per access (emoji: styled, plain or alias forms) keeps its caption mix. `image_ids`
    is `(n, N)`, or `(n, V, N)` with `V` versions of each image (the image and its augmented copies): each access then
    draws one version uniformly, seeded by `seed`. Codes stay in their stored dtype (int16: 13,714 images x 8
    versions x 64 codes are 14 MB) and are widened to int64 per item.
    """

    def __init__(self, dataset, image_ids: torch.Tensor, seed: int = 0):
        self.dataset, self.image_ids = dataset, image_ids
        self.rng = random.Random(f"image-version/{seed}")

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        text_of = getattr(self.dataset, "text", None)
        text = text_of(index) if callable(text_of) else self.dataset[index]["text"]
        image_ids = self.image_ids[index]
        if image_ids.dim() == 2:  # (V, N): one version of the image per use
            image_ids = image_ids[self.rng.randrange(len(image_ids))]
        return {"image_ids": image_ids.long(), "text": text}


def augmented_pixel_values(dataset, index: int, variant: int, min_scale: float, seed: int) -> torch.Tensor:
    """Version `variant` of image `index`: the image itself for 0 (`dataset[index]`, what a run without augmentation
    encodes), else the dataset's crop-and-resize (`dalle_hf.data.world.random_square_crop` says why it sits there)."""
    if variant == 0:
        return dataset[index]["pixel_values"]
    return dataset.augmented_pixel_values(index, variant, min_scale, seed)


@torch.no_grad()
def encode_dataset(
    dataset, vae, batch_size: int = 64, image_augmentations: int = 0, min_scale: float = 0.85, augment_seed: int = 0
) -> EncodedImages:
    """Encode a finite dataset's images once: `EncodedImages` with `image_ids` `(n, N)`, or `(n, 1 + K, N)` with
    `K = image_augmentations` crop-and-resize copies of each image after the image itself."""
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda ex: ex)
    image_ids = []
    for examples in tqdm(loader, desc="encoding images"):
        pixels = torch.stack([e["pixel_values"] for e in examples])
        image_ids.append(encode_pixels(vae, pixels, batch_size=len(pixels)))
    image_ids = torch.cat(image_ids)  # (n, N)
    if not image_augmentations:
        return EncodedImages(dataset, image_ids)
    versions = [(i, v) for i in range(len(dataset)) for v in range(1, image_augmentations + 1)]
    copies = []
    for start in tqdm(range(0, len(versions), batch_size), desc=f"encoding {image_augmentations} crops per image"):
        pixels = torch.stack([augmented_pixel_values(dataset, i, v, min_scale, augment_seed)
                              for i, v in versions[start : start + batch_size]])  # fmt: skip
        copies.append(encode_pixels(vae, pixels, batch_size=len(pixels)))
    copies = torch.cat(copies).view(len(dataset), image_augmentations, -1)  # (n * K, N) -> (n, K, N)
    return EncodedImages(dataset, torch.cat([image_ids[:, None], copies], dim=1))  # (n, 1 + K, N)


def codes_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer dtype that holds codes `0 .. vocab_size - 1`: int16 up to 32,768 codes (half of int32's
    bytes: the emoji world's 13,714 images x 256 codes are 7 MB instead of 14), int32 beyond. Files written as int32
    before this still read: codes are widened to int64 on reading."""
    return torch.int16 if vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32


# Images re-encoded from the dataset when a saved code file is reused: a changed, reordered or differently
# resized dataset shows up as different codes at these evenly spaced positions.
SPOT_CHECK_IMAGES = 32


def vae_fingerprint(vae) -> str:
    """sha256 over the dVAE's tensors (names, shapes, bytes): a code file belongs to exactly these weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# What a code file written without augmentation (every file before `--image_augmentations`) implicitly holds.
NO_AUGMENTATION = {"image_augmentations": 0, "augment_min_scale": None, "augment_seed": None}


def saved_augmentation(path: str) -> dict:
    """The augmentation settings a code file was written with, as keyword arguments of `load_or_encode_dataset`
    (`{"image_augmentations": 0}` for a file without them, or no file yet): for a script that takes any such file."""
    from safetensors import safe_open

    if not os.path.exists(path):
        return {"image_augmentations": 0}
    with safe_open(path, framework="pt") as f:
        saved = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
    if not saved.get("image_augmentations"):
        return {"image_augmentations": 0}
    return {"image_augmentations": saved["image_augmentations"], "min_scale": saved["augment_min_scale"],
            "augment_seed": saved["augment_seed"]}  # fmt: skip


@torch.no_grad()
def load_or_encode_dataset(
    dataset, vae, path: str, image_augmentations: int = 0, min_scale: float = 0.85, augment_seed: int = 0,
    seed: int = 0,
) -> EncodedImages:  # fmt: skip
    """
    `encode_dataset`, saved to `path` (safetensors) the first time and read back afterwards.

    Encoding is the slow part of starting a run (emoji: 13,714 images, about 6 minutes on one core; 1 + K times that
    with `image_augmentations=K`), and every resume and every later stage on the same dVAE would repeat it. A saved
    file is used only when its dVAE fingerprint, image count and augmentation settings (K, `min_scale`,
    `augment_seed`) match and `SPOT_CHECK_IMAGES` images re-encoded now give the saved codes (each image itself and,
    with K > 0, one of its crops); otherwise a `ValueError` says what differs (the file is never silently replaced).
    Without augmentation the file is as it always was: `image_ids` `(n, N)`; with it, `(n, 1 + K, N)`, version 0 the
    image itself. `seed` seeds which version each use draws (`EncodedImages`).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    fingerprint = {"vae_sha256": vae_fingerprint(vae), "n_images": len(dataset)}
    if image_augmentations:
        if not callable(getattr(dataset, "augmented_pixel_values", None)):
            raise ValueError(f"--image_augmentations needs a dataset that can crop its images "
                             f"(`augmented_pixel_values`); {type(dataset).__name__} cannot")  # fmt: skip
        fingerprint.update(image_augmentations=image_augmentations, augment_min_scale=min_scale,
                           augment_seed=augment_seed)  # fmt: skip
    if os.path.exists(path):
        with safe_open(path, framework="pt") as f:
            saved = json.loads((f.metadata() or {}).get("fingerprint", "{}"))
            image_ids = f.get_tensor("image_ids")
        saved, now = {**NO_AUGMENTATION, **saved}, {**NO_AUGMENTATION, **fingerprint}
        differs = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if differs:
            raise ValueError(
                f"{path} holds codes for another dVAE or dataset, or other augmentation settings (saved, now): "
                f"{differs}; delete it, pass the settings it was made with or another --image_codes"
            )
        positions = torch.linspace(0, len(dataset) - 1, min(len(dataset), SPOT_CHECK_IMAGES)).long().unique().tolist()
        checks = [(i, 0) for i in positions]
        if image_augmentations:  # one crop of each spot-checked image too, cycling through the versions
            checks += [(i, 1 + j % image_augmentations) for j, i in enumerate(positions)]
        pixels = torch.stack([augmented_pixel_values(dataset, i, v, min_scale, augment_seed) for i, v in checks])
        now_ids = encode_pixels(vae, pixels, batch_size=len(pixels))
        stored = image_ids if image_augmentations else image_ids[:, None]  # (n, N) -> (n, 1, N)
        saved_ids = torch.stack([stored[i, v] for i, v in checks])
        if not torch.equal(now_ids, saved_ids.to(now_ids.dtype)):
            raise ValueError(
                f"{path}: the dataset's images are not the ones these codes were made from (re-encoded "
                f"{len(checks)} versions of spread-out images and got other codes); delete it or pass another "
                "--image_codes"
            )
        logger.info(f"Read the codes of {len(dataset)} images ({1 + image_augmentations} versions each) from {path}")
        return EncodedImages(dataset, image_ids, seed)
    encoded = encode_dataset(dataset, vae, image_augmentations=image_augmentations, min_scale=min_scale,
                             augment_seed=augment_seed)  # fmt: skip
    image_ids = encoded.image_ids.to(codes_dtype(vae.config.vocab_size)).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({"image_ids": image_ids}, path, metadata={"fingerprint": json.dumps(fingerprint)})
    logger.info(f"Saved the codes of {len(dataset)} images ({1 + image_augmentations} versions each) to {path}")
    return EncodedImages(dataset, image_ids, seed)


def collate_encoded(examples: list[dict]) -> dict:
    return {"image_ids": torch.stack([e["image_ids"] for e in examples]), "text": [e["text"] for e in examples]}


def make_optimizer(model, args):
    groups = weight_decay_groups(model, args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, 0.95), eps=1e-8)


def build_pipeline(tokenizer, transformer, vae, args):
    from .pipeline_dalle import DallePipeline

    clip_model = clip_processor = None
    if args.clip_name_or_path:
        from transformers import CLIPModel, CLIPProcessor

        clip_model = CLIPModel.from_pretrained(args.clip_name_or_path, subfolder="clip_model").eval()
        clip_processor = CLIPProcessor.from_pretrained(args.clip_name_or_path, subfolder="clip_processor")
    pipe = DallePipeline(
        tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip_model, clip_processor=clip_processor
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def validate(pipe, prompts: list[str], output_dir: str, step: int, seed: int) -> str | None:
    """Sample 4 images for each validation prompt through the real pipeline; save one PNG sheet."""
    from PIL import Image

    was_training = pipe.transformer.training
    pipe.transformer.eval()
    if not prompts:
        return None
    out = pipe(list(prompts), num_images_per_prompt=4, generator=torch.Generator().manual_seed(seed))
    pipe.transformer.train(was_training)
    size = out.images[0].size[0]
    sheet = Image.new("RGB", (4 * size, len(prompts) * size), "white")
    for i, image in enumerate(out.images):
        sheet.paste(image, ((i % 4) * size, (i // 4) * size))
    path = os.path.join(output_dir, "samples", f"step-{step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path)
    return path


class HeldOutLoss:
    """
    nanoGPT's `estimate_loss` for the transformer: its image loss on fixed images it never trained on and on as many
    fixed images it trains on, measured the same way so that the two compare (the training loss logged while
    training has dropout and caption dropout in it, and another draw of images in every window).

    Each number is the mean negative log-likelihood per image token in nats, teacher-forced, given the image's
    caption: the model's own `image_loss` (`DalleForImageGeneration.loss`), in eval mode (no dropout), without
    gradients, averaged over images. A training loss that keeps falling while the held-out loss rises is
    memorisation.

    Args:
        held_out (`tuple[torch.LongTensor, torch.LongTensor]`): caption ids `(n, L)` and image codes `(n, N)` of the
            held-out images, on the model's device.
        train (`tuple[torch.LongTensor, torch.LongTensor]`): the same for the training images.
        batch_size (`int`, *optional*, defaults to 32): rows per forward.

    Example:

    ```python
    >>> measure = HeldOutLoss((text, codes), (train_text, train_codes))  # doctest: +SKIP
    >>> measure(model)  # doctest: +SKIP
    {'held_out_image_loss': 2.558, 'train_image_loss': 2.421}
    ```
    """

    def __init__(self, held_out: tuple[torch.Tensor, torch.Tensor], train: tuple[torch.Tensor, torch.Tensor],
                 batch_size: int = 32):  # fmt: skip
        for name, (input_ids, image_ids) in (("held_out", held_out), ("train", train)):
            if len(input_ids) != len(image_ids) or len(image_ids) == 0:
                raise ValueError(f"{name}: expected as many captions as images, at least one, got "
                                 f"{len(input_ids)} and {len(image_ids)}")  # fmt: skip
        self.held_out, self.train, self.batch_size = held_out, train, batch_size

    @torch.no_grad()
    def image_loss(self, model, input_ids: torch.Tensor, image_ids: torch.Tensor) -> float:
        """Mean nats per image token of `image_ids` `(n, N)` given `input_ids` `(n, L)`, in batches."""
        total = 0.0
        for start in range(0, len(image_ids), self.batch_size):
            rows = slice(start, start + self.batch_size)
            outputs = model(input_ids=input_ids[rows], image_ids=image_ids[rows], return_loss=True)
            total += outputs.image_loss.item() * len(image_ids[rows])  # a batch's mean, weighted by its rows
        return total / len(image_ids)

    def __call__(self, model, autocast=contextlib.nullcontext) -> dict[str, float]:
        """Both losses of `model` (put in eval mode for the measurement, its mode restored after) under `autocast()`
        (the run's mixed precision: `accelerator.autocast`)."""
        was_training = model.training
        model.eval()
        try:
            with autocast():
                return {"held_out_image_loss": self.image_loss(model, *self.held_out),
                        "train_image_loss": self.image_loss(model, *self.train)}  # fmt: skip
        finally:
            model.train(was_training)


@torch.no_grad()
def encode_pixels(vae, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """`(n, 3, S, S)` in [0, 1] -> dVAE codes `(n, N)` (int64, on the CPU), in batches."""
    codes = [vae.get_codebook_indices(batch.to(vae.device)).flatten(1).cpu() for batch in pixels.split(batch_size)]
    return torch.cat(codes)


def held_out_draw(world, n: int, vae) -> tuple[list[str], torch.Tensor]:
    """The world's held-out images (`World.held_out_examples(n, seed=0)`: one draw for every run, whatever its
    `--seed`), resized as `image_to_tensor` resizes (bicubic, antialiased: the emoji world's own resize, and
    torch's match of the PIL bicubic that shapes and image folders use), encoded once: `(captions, codes (n, N))`."""
    from .image_processing import image_to_tensor

    examples = world.held_out_examples(n, seed=0)
    if not examples:
        raise ValueError(f"the {world.name} world gave no held-out images")
    pixels = torch.cat([image_to_tensor(image, vae.config.image_size) for _, image, _ in examples])  # (n, 3, S, S)
    return [caption for _, _, caption in examples], encode_pixels(vae, pixels)


def training_draw(world, n: int, vae, encoded: EncodedImages | None, seed: int) -> tuple[list[str], torch.Tensor]:
    """
    `n` training images to hold the held-out loss against: `(captions, codes (n, N))`.

    A finite dataset (`encoded`): a fixed draw of its stored codes (version 0, the image itself, under
    `--image_augmentations`), each with its most likely caption where the dataset lists them (`caption_choices`;
    emoji: the styled caption, the form of its held-out captions), else its caption. The captions are read from a
    second instance of the dataset, so the draw leaves the training caption stream as it was. A stream: its first
    `n` images for `seed` (what a fresh run with that seed trained on first), encoded now.
    """
    captions_of = world.train_dataset(vae.config.image_size, seed)
    if encoded is None:
        items = [item for item, _ in zip(captions_of, range(n))]
        return [item["text"] for item in items], encode_pixels(vae, torch.stack([i["pixel_values"] for i in items]))
    chosen = random.Random("held-out-loss/train").sample(range(len(encoded)), min(n, len(encoded)))
    image_ids = encoded.image_ids[chosen]
    if image_ids.dim() == 3:  # (n, V, N): version 0 is the image itself
        image_ids = image_ids[:, 0]
    choices_of = getattr(captions_of, "caption_choices", None)
    text_of = getattr(captions_of, "text", None)
    if callable(choices_of):
        captions = [max(choices_of(i), key=lambda choice: choice[1])[0] for i in chosen]
    else:
        captions = [text_of(i) if callable(text_of) else captions_of[i]["text"] for i in chosen]
    return captions, image_ids.long()


def main(args: argparse.Namespace) -> dict:
    accelerator, resume_dir, first_step, trainer_state = start_run(args)

    # 1. Frozen dVAE and tokenizer; the tokenizer is saved at once so other runs (CLIP) can share it
    vae = load_frozen_vae(args.vae_name_or_path).to(accelerator.device)
    tokenizer = load_or_train_tokenizer(args)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(os.path.join(args.output_dir, "tokenizer"))

    # 2. The transformer
    config = DalleConfig(
        text_vocab_size=len(tokenizer),
        text_seq_len=args.text_seq_len,
        image_vocab_size=vae.config.vocab_size,
        image_grid_size=vae.config.grid_size,
        pad_token_id=tokenizer.pad_token_id,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        dropout=args.dropout,
        attention_types=args.attention_types,
        text_self_attention=not args.no_text_self_attention,
    )
    if args.transformer_name_or_path:
        path = args.transformer_name_or_path
        subfolder = "transformer" if os.path.isdir(os.path.join(path, "transformer")) else ""
        # float32 master weights whatever the stored dtype: a checkpoint shipped in bfloat16 would otherwise be
        # trained in bfloat16 (AdamW's small updates round away), since transformers 5 loads the saved dtype.
        # `--dropout` is a training choice, not the architecture: it applies to a continued model as to a new one
        # (a checkpoint saved without dropout would otherwise keep training without it, whatever the flag says).
        model = DalleForImageGeneration.from_pretrained(path, subfolder=subfolder, dtype=torch.float32,
                                                        dropout=args.dropout)  # fmt: skip
        mismatched = {
            k: (v, getattr(model.config, k))
            for k, v in config.to_diff_dict().items()
            if k
            in (
                "text_vocab_size",
                "text_seq_len",
                "image_vocab_size",
                "image_grid_size",
                "n_layer",
                "n_head",
                "n_embd",
                "text_self_attention",
            )
            and getattr(model.config, k) != v
        }
        if mismatched:
            raise ValueError(
                f"--transformer_name_or_path has a different config (flag value, checkpoint value): {mismatched}"
            )
    else:
        model = DalleForImageGeneration(config)
    optimizer = make_optimizer(model, args)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine_lr_lambda(args.lr_warmup_steps, args.max_train_steps, 0.1)
    )

    # 3. Data: a stream is tokenized on the fly; a finite dataset's images are encoded once, its captions drawn per use
    world = world_from_args(args)
    dataset = build_train_dataset(args, image_size=vae.config.image_size, seed=args.seed + first_step)
    if isinstance(dataset, IterableDataset):
        if args.image_augmentations:
            raise ValueError(f"--image_augmentations needs a finite dataset (emoji, imagefolder); the {args.dataset} "
                             "world draws new images all the time")  # fmt: skip
        dataloader = build_dataloader(
            dataset, args.train_batch_size, args.dataloader_num_workers, args.seed + first_step
        )
    else:
        codes_path = args.image_codes or os.path.join(args.output_dir, "image_codes.safetensors")
        # a resumed run draws other versions of each image, as it draws other captions
        codes = dict(path=codes_path, image_augmentations=args.image_augmentations, min_scale=args.augment_min_scale,
                     augment_seed=args.augment_seed, seed=args.seed + first_step)  # fmt: skip
        if accelerator.is_main_process:
            encoded = load_or_encode_dataset(dataset, vae, **codes)
        accelerator.wait_for_everyone()  # the main process wrote the file; the others read it
        if not accelerator.is_main_process:
            encoded = load_or_encode_dataset(dataset, vae, **codes)
        dataloader = DataLoader(encoded, batch_size=args.train_batch_size, shuffle=True, drop_last=True,
                                collate_fn=collate_encoded,
                                generator=torch.Generator().manual_seed(args.seed + first_step))  # fmt: skip

    def tokenize(captions: list[str]) -> torch.Tensor:
        """Captions -> input_ids (B, L) on the CPU, padded and truncated to --text_seq_len."""
        return tokenizer(
            captions, padding="max_length", truncation=True, max_length=args.text_seq_len, return_tensors="pt"
        )["input_ids"]

    # The held-out loss's images: encoded and tokenized once, kept on the device (the main process measures)
    held_out_loss, held_out_history = None, []
    if not world.has_held_out_examples:
        logger.info(f"The {args.dataset} world has no held-out images: no held-out loss is measured.")
    elif args.held_out_images and accelerator.is_main_process:
        held_out = held_out_draw(world, args.held_out_images, vae)
        train = training_draw(world, len(held_out[1]), vae, None if isinstance(dataset, IterableDataset) else encoded,
                              args.seed)  # fmt: skip
        held_out_loss = HeldOutLoss(
            *((tokenize(captions).to(accelerator.device), codes.to(accelerator.device)) for captions, codes in
              (held_out, train)),
            batch_size=args.train_batch_size,
        )  # fmt: skip
        logger.info(f"Held-out loss on {len(held_out[1])} held-out and {len(train[1])} training images every "
                    f"{args.validation_steps} steps, in {HELD_OUT_LOSS_FILE}")  # fmt: skip

    def measure_held_out_loss(step: int) -> dict:
        """Measure, log, send to the trackers and append to held_out_loss.jsonl."""
        losses = held_out_loss(accelerator.unwrap_model(model), accelerator.autocast)
        record = {"step": step, "captions_seen": images_seen, **losses,
                  "held_out_images": len(held_out_loss.held_out[1]),
                  "train_images": len(held_out_loss.train[1])}  # fmt: skip
        logger.info(f"step {step}: image loss (nats/token, eval mode) held-out {losses['held_out_image_loss']:.4f}, "
                    f"training images {losses['train_image_loss']:.4f}")  # fmt: skip
        accelerator.log(losses, step=step)
        with open(os.path.join(args.output_dir, HELD_OUT_LOSS_FILE), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        held_out_history.append(record)
        return record

    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    if resume_dir:
        logger.info(f"Resuming from {resume_dir} (step {first_step})")
        accelerator.load_state(resume_dir)
        set_seed(args.seed + first_step)
    clock = WallClock(trainer_state.get("wall_time_seconds", 0.0))
    images_seen = trainer_state.get("images_seen", 0)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        f"{n_params:,} parameters; "
        f"{args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps} captions per update"
    )

    # Word dropout never removes the end-of-text marker: it tells the model where the caption stops.
    keep_ids = tuple(i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id) if i is not None)

    def to_tokens(batch):
        """-> input_ids (B, L), image_ids (B, N) on the device, with word and caption dropout."""
        if "image_ids" in batch:  # encoded once (a finite dataset)
            image_ids = batch["image_ids"]
        else:  # a stream: encode on the fly
            with torch.no_grad():
                image_ids = vae.get_codebook_indices(batch["pixel_values"].to(accelerator.device)).flatten(1)
        input_ids = tokenize(batch["text"]).to(accelerator.device).clone()
        if args.word_dropout > 0:
            input_ids = apply_word_dropout(input_ids, args.word_dropout, tokenizer.pad_token_id, keep_ids)
        drop = torch.rand(input_ids.shape[0], device=input_ids.device) < args.caption_dropout
        input_ids[drop] = tokenizer.pad_token_id
        return input_ids, image_ids.to(accelerator.device)

    # 4. Train
    model.train()
    progress = tqdm(
        range(args.max_train_steps),
        initial=first_step,
        disable=not accelerator.is_local_main_process,
        desc="transformer",
    )
    running, window_batches = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}, 0
    window_start, window_tokens = clock.seconds, 0
    history, step = [], first_step
    batches = infinite_batches(dataloader)
    while step < args.max_train_steps:
        with accelerator.accumulate(model):
            input_ids, image_ids = to_tokens(next(batches))
            outputs = model(input_ids=input_ids, image_ids=image_ids, return_loss=True)
            accelerator.backward(outputs.loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        images_seen += input_ids.shape[0] * accelerator.num_processes
        window_tokens += input_ids.numel() + image_ids.numel()
        window_batches += 1
        for key in running:
            running[key] += outputs[key].item()
        if not accelerator.sync_gradients:
            continue
        step += 1
        progress.update(1)

        if step % args.logging_steps == 0 or step == args.max_train_steps:
            elapsed = clock.seconds - window_start
            log = {k: v / window_batches for k, v in running.items()}
            log.update(
                step=step,
                lr=lr_scheduler.get_last_lr()[0],
                tokens_per_second=round(window_tokens * accelerator.num_processes / max(elapsed, 1e-9)),
            )
            history.append(log)
            progress.set_postfix(loss=f"{log['loss']:.4f}", img=f"{log['image_loss']:.3f}")
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in log.items()))
            accelerator.log({k: v for k, v in log.items() if k != "step"}, step=step)
            running, window_batches = dict.fromkeys(running, 0.0), 0
            window_start, window_tokens = clock.seconds, 0
        if step % args.checkpointing_steps == 0 and step < args.max_train_steps:
            path = save_checkpoint(
                accelerator,
                args.output_dir,
                step,
                args.checkpoints_total_limit,
                {"wall_time_seconds": clock.seconds, "images_seen": images_seen},
            )
            logger.info(f"Saved state to {path}")
        if step % args.validation_steps == 0 and accelerator.is_main_process:
            pipe = build_pipeline(tokenizer, accelerator.unwrap_model(model), vae, args)
            logger.info(
                f"Validation samples: {validate(pipe, world.validation_prompts(), args.output_dir, step, args.seed)}"
            )
            if held_out_loss is not None and step < args.max_train_steps:  # the last step's is measured below
                measure_held_out_loss(step)
    progress.close()

    # 5. Save the whole pipeline and its model card
    accelerator.wait_for_everyone()
    results = {}
    if accelerator.is_main_process:
        transformer = accelerator.unwrap_model(model).eval()
        pipe = build_pipeline(tokenizer, transformer, vae, args)
        pipe.save_pretrained(args.output_dir, safe_serialization=True)
        wall_time = clock.seconds
        validate(pipe, world.validation_prompts(), args.output_dir, step, args.seed)
        if args.eval_prompts_per_task:
            results = evaluate_during_training(world, pipe, os.path.join(args.output_dir, "eval"),
                                              args.eval_prompts_per_task)
        if history:
            results = {
                "final image loss": history[-1]["image_loss"],
                "final text loss": history[-1]["text_loss"],
                **results,
            }
        if held_out_loss is not None:
            final = measure_held_out_loss(step)
            results = {"held-out image loss (eval mode)": final["held_out_image_loss"],
                       "training image loss (eval mode)": final["train_image_loss"], **results}  # fmt: skip
        hyperparameters = {
            k: getattr(args, k)
            for k in (
                "n_layer",
                "n_head",
                "n_embd",
                "text_seq_len",
                "train_batch_size",
                "gradient_accumulation_steps",
                "learning_rate",
                "lr_warmup_steps",
                "weight_decay",
                "caption_dropout",
                "word_dropout",
                "image_augmentations",
                "augment_min_scale",
                "held_out_images",
                "mixed_precision",
            )
        }
        hyperparameters.update({"parameters": f"{n_params:,}", "captions seen": images_seen})
        hyperparameters.update(world.hyperparameters())
        write_model_card(
            os.path.join(args.output_dir, "README.md"),
            title=f"dalle-hf pipeline ({config.n_layer} layers x {config.n_embd}, "
            f"{config.image_grid_size}x{config.image_grid_size} image tokens)",
            description=(
                "A DALL-E (Ramesh et al. 2021) pipeline: BPE tokenizer, dVAE, decoder-only transformer"
                + (" and a CLIP reranker" if args.clip_name_or_path else "")
                + ". Load with `dalle_hf.DallePipeline.from_pretrained(...)`."
            ),
            data=describe_dataset(args),
            command=command_line("dalle_hf.train_dalle"),
            seed=args.seed,
            steps=step,
            wall_time_seconds=wall_time,
            eval_results=results,
            hyperparameters=hyperparameters,
            tags=("dalle-hf", "text-to-image"),
        )
        logger.info(f"Saved the pipeline to {args.output_dir}; wall time {wall_time:.0f} s; eval {results}")
    accelerator.end_training()
    return {"history": history, "eval": results, "images_seen": images_seen, "held_out_loss": held_out_history}


if __name__ == "__main__":
    main(parse_args())
