"""CLIP for reranking: a small `transformers.CLIPModel`, its processor and tensor fast paths.

DALL-E (paper §2.5, "Sample generation") draws N images per caption and keeps the ones a pretrained
contrastive model (CLIP, Radford et al. 2021) scores highest. Here CLIP is the stock `transformers`
implementation with a config sized for a laptop CPU and our own BPE tokenizer; training lives in
`dalle_hf/train_clip.py`. The pipelines score images that are already float tensors `(B, 3, H, W)` in
`[0, 1]`, so `clip_pixel_values` reproduces the processor's resize + normalize on tensors instead of
round-tripping through PIL.
"""

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, PreTrainedTokenizerBase
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


def make_clip_config(
    text_vocab_size: int,
    text_seq_len: int = 16,
    image_size: int = 64,
    patch_size: int = 8,
    vision_width: int = 192,
    vision_layers: int = 4,
    text_width: int = 128,
    text_layers: int = 4,
    projection_dim: int = 128,
    head_dim: int = 32,
) -> CLIPConfig:
    """A small `CLIPConfig` that trains on one CPU core in well under an hour.

    Args:
        text_vocab_size (`int`):
            Size of the text tokenizer's vocabulary (`len(tokenizer)`).
        text_seq_len (`int`, *optional*, defaults to 16):
            Caption length in tokens, `<eos>` included; the text tower's `max_position_embeddings`.
        image_size (`int`, *optional*, defaults to 64):
            Side of the square input image.
        patch_size (`int`, *optional*, defaults to 8):
            ViT patch side: 64x64 images become an 8x8 grid of 64 patches (+1 class token).
        vision_width (`int`, *optional*, defaults to 192):
            Hidden size of the image tower.
        vision_layers (`int`, *optional*, defaults to 4):
            Transformer blocks in the image tower.
        text_width (`int`, *optional*, defaults to 128):
            Hidden size of the text tower.
        text_layers (`int`, *optional*, defaults to 4):
            Transformer blocks in the text tower.
        projection_dim (`int`, *optional*, defaults to 128):
            Size of the shared embedding space.
        head_dim (`int`, *optional*, defaults to 32):
            Width of one attention head in both towers (`num_attention_heads = width // head_dim`).

    Returns:
        `CLIPConfig` for `transformers.CLIPModel`.

    Example:

    ```python
    >>> from dalle_hf.clip import make_clip_config
    >>> config = make_clip_config(text_vocab_size=512)
    >>> config.text_config.eos_token_id, config.vision_config.image_size
    (1, 64)
    ```
    """
    if image_size % patch_size != 0:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width % head_dim != 0:
            raise ValueError(f"{name} ({width}) must be a multiple of head_dim ({head_dim})")
    text_config = dict(
        vocab_size=text_vocab_size,  # our BPE, not CLIP's 49,408-token vocabulary
        hidden_size=text_width,  # captions are short and templated: a narrow tower is enough
        intermediate_size=4 * text_width,  # the usual 4x MLP (CLIP, GPT-2)
        num_hidden_layers=text_layers,  # enough depth to bind "red" to "circle" and parse "left of"
        num_attention_heads=text_width // head_dim,
        max_position_embeddings=text_seq_len,  # the tokenizer pads every caption to exactly this length
        hidden_act="quick_gelu",  # OpenAI CLIP's activation
        pad_token_id=0,  # dalle_hf.tokenization: <pad> is id 0
        bos_token_id=None,  # our captions have no start token
        eos_token_id=1,  # pool at the first <eos> (id 1); id 2 would trigger CLIP's legacy argmax pooling
    )
    vision_config = dict(
        image_size=image_size,  # the dVAE's and the generator's image size: score samples at full resolution
        patch_size=patch_size,  # 8x8 patches keep single shapes (about 12-24 px) over several tokens
        hidden_size=vision_width,  # wider than the text tower: the image side must localise colour and shape
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_width // head_dim,
        hidden_act="quick_gelu",
    )
    return CLIPConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=projection_dim,  # shared embedding space; both towers project into it
        logit_scale_init_value=2.6592,  # log(1 / 0.07), CLIP's initial temperature
    )


def make_clip_processor(tokenizer: PreTrainedTokenizerBase, image_size: int = 64) -> CLIPProcessor:
    """A `CLIPProcessor` pairing our tokenizer with a PIL image processor at `image_size`.

    `CLIPImageProcessorPil` needs no torchvision; resize and center-crop both target `image_size`, so
    64x64 renders pass through unchanged apart from CLIP's mean/std normalization.

    Args:
        tokenizer (`PreTrainedTokenizerBase`):
            The caption tokenizer (`dalle_hf.tokenization.train_text_tokenizer`).
        image_size (`int`, *optional*, defaults to 64):
            Side of the square images the CLIP vision tower takes.

    Returns:
        `CLIPProcessor`; it round-trips through `save_pretrained` / `from_pretrained`.

    Example:

    ```python
    >>> from dalle_hf.clip import make_clip_processor
    >>> from dalle_hf.tokenization import train_text_tokenizer
    >>> processor = make_clip_processor(train_text_tokenizer(["a red circle"] * 4, vocab_size=300), image_size=64)
    >>> processor.image_processor.crop_size["height"]
    64
    ```
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size}")
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _check_images(images, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a float tensor (B, 3, H, W) in [0, 1], got {got}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor in [0, 1], got dtype {images.dtype}")


def clip_pixel_values(images: torch.Tensor, clip_processor: CLIPProcessor) -> torch.Tensor:
    """The tensor equivalent of `clip_processor(images=...)["pixel_values"]`, with no PIL round trip.

    Resizes (bilinear, antialiased) to the processor's crop size and normalizes with its mean/std.

    Args:
        images (`torch.Tensor`):
            Float images `(B, 3, H, W)` in `[0, 1]`.
        clip_processor (`CLIPProcessor`):
            Supplies `crop_size`, `image_mean` and `image_std`.

    Returns:
        `torch.Tensor` `(B, 3, crop_h, crop_w)`, same device and dtype as `images`.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf.clip import clip_pixel_values, make_clip_processor
    >>> from dalle_hf.tokenization import train_text_tokenizer
    >>> processor = make_clip_processor(train_text_tokenizer(["a red circle"] * 4, vocab_size=300), image_size=32)
    >>> clip_pixel_values(torch.rand(2, 3, 64, 64), processor).shape
    torch.Size([2, 3, 32, 32])
    ```
    """
    _check_images(images)
    image_processor = clip_processor.image_processor
    crop_h, crop_w = image_processor.crop_size["height"], image_processor.crop_size["width"]
    if images.shape[-2:] != (crop_h, crop_w):
        # in float32: PyTorch's CPU antialiased resize has no bf16 kernel (found by benchmarks/gpu_check.py)
        images = F.interpolate(
            images.float(), size=(crop_h, crop_w), mode="bilinear", antialias=True, align_corners=False
        ).to(images.dtype)
    mean = torch.tensor(image_processor.image_mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def _text_input_ids(texts_or_input_ids, clip_processor: CLIPProcessor, batch_size: int) -> torch.Tensor:
    if isinstance(texts_or_input_ids, str):
        texts_or_input_ids = [texts_or_input_ids]
    if isinstance(texts_or_input_ids, torch.Tensor):
        if texts_or_input_ids.ndim != 2 or texts_or_input_ids.dtype != torch.long:
            raise ValueError(
                f"input_ids must be a LongTensor (B, T), got {texts_or_input_ids.dtype} "
                f"{tuple(texts_or_input_ids.shape)}"
            )
        input_ids = texts_or_input_ids
    elif isinstance(texts_or_input_ids, (list, tuple)) and all(isinstance(t, str) for t in texts_or_input_ids):
        input_ids = clip_processor.tokenizer(
            list(texts_or_input_ids), padding="max_length", truncation=True, return_tensors="pt"
        )["input_ids"]
    else:
        raise ValueError(f"texts must be a str, a list of str or a LongTensor (B, T), got {type(texts_or_input_ids)}")
    if input_ids.shape[0] != batch_size:
        raise ValueError(f"expected one text per image ({batch_size}), got {input_ids.shape[0]}")
    return input_ids


def _onload(clip_model: CLIPModel) -> None:
    """Run the offload hook of `pipe.enable_model_cpu_offload()`, if any: it moves a model to the GPU when its
    `forward` is called, and scoring calls `get_image_features` / `get_text_features` instead (diffusers'
    `apply_forward_hook` does the same for a VAE's `decode`)."""
    hook = getattr(clip_model, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(clip_model)


def _image_embeds(clip_model: CLIPModel, clip_processor: CLIPProcessor, images: torch.Tensor) -> torch.Tensor:
    pixel_values = clip_pixel_values(images.to(device=clip_model.device, dtype=clip_model.dtype), clip_processor)
    return F.normalize(clip_model.get_image_features(pixel_values=pixel_values).pooler_output.float(), dim=-1)


@torch.no_grad()
def clip_text_image_scores(
    clip_model: CLIPModel, clip_processor: CLIPProcessor, images: torch.Tensor, texts_or_input_ids
) -> torch.Tensor:
    """CLIP's score of each image against its own caption: cosine similarity times `logit_scale.exp()`.

    Args:
        clip_model (`CLIPModel`):
            The reranker; its device and dtype are used.
        clip_processor (`CLIPProcessor`):
            Its tokenizer encodes string captions; its image processor gives size and normalization.
        images (`torch.Tensor`):
            Float images `(B, 3, H, W)` in `[0, 1]`.
        texts_or_input_ids (`str`, `list[str]` or `torch.LongTensor`):
            B captions, or their token ids `(B, T)` padded with the tokenizer's layout (`<eos>` then `<pad>`).

    Returns:
        `torch.FloatTensor` `(B,)` on the model's device, in float32.

    Example:

    ```python
    >>> scores = clip_text_image_scores(clip_model, clip_processor, images, ["a red circle"] * len(images))
    >>> best_first = scores.argsort(descending=True)
    ```
    """
    _check_images(images)
    _onload(clip_model)
    input_ids = _text_input_ids(texts_or_input_ids, clip_processor, images.shape[0]).to(clip_model.device)
    image_embeds = _image_embeds(clip_model, clip_processor, images)  # (B, D)
    text_embeds = F.normalize(clip_model.get_text_features(input_ids=input_ids).pooler_output.float(), dim=-1)
    return (image_embeds * text_embeds).sum(-1) * clip_model.logit_scale.exp().float()


@torch.no_grad()
def clip_image_image_scores(
    clip_model: CLIPModel, clip_processor: CLIPProcessor, images: torch.Tensor, reference_images: torch.Tensor
) -> torch.Tensor:
    """CLIP's score of each image against a reference image (image variations): cosine x `logit_scale.exp()`.

    Args:
        clip_model (`CLIPModel`):
            The reranker; its device and dtype are used.
        clip_processor (`CLIPProcessor`):
            Gives the vision tower's input size and normalization.
        images (`torch.Tensor`):
            Float images `(B, 3, H, W)` in `[0, 1]`.
        reference_images (`torch.Tensor`):
            `(B, 3, H', W')` (one reference per image) or `(1, 3, H', W')` (one for all), in `[0, 1]`.

    Returns:
        `torch.FloatTensor` `(B,)` on the model's device, in float32.

    Example:

    ```python
    >>> scores = clip_image_image_scores(clip_model, clip_processor, variations, reference[None])
    ```
    """
    _check_images(images)
    _check_images(reference_images, "reference_images")
    _onload(clip_model)
    if reference_images.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"reference_images must have 1 or len(images) = {images.shape[0]} entries, "
            f"got {reference_images.shape[0]}"
        )
    image_embeds = _image_embeds(clip_model, clip_processor, images)  # (B, D)
    reference_embeds = _image_embeds(clip_model, clip_processor, reference_images)  # (B or 1, D)
    return (image_embeds * reference_embeds).sum(-1) * clip_model.logit_scale.exp().float()
