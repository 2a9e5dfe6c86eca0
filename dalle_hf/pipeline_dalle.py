"""Text-to-image with DALL-E: sample image tokens with the transformer, decode them with the dVAE, rerank with CLIP.

Paper §2.3: "we rerank the samples drawn from the transformer using a pretrained contrastive model", keeping the
best `k` of `N`. Classifier-free guidance ("super-conditioning", as in min-dalle and DALL-E mega) is optional.
"""

import inspect
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput, logging

from .image_processing import image_to_tensor
from .remote_code import model_index_without_code

logger = logging.get_logger(__name__)

MAX_IMAGES_PER_PROMPT = 256  # a cap on N per prompt: the KV cache grows with it (about 1 GB at N=256 for 24x1024)
OUTPUT_TYPES = ("pil", "np", "pt")


@dataclass
class DallePipelineOutput(BaseOutput):
    """Output of [`DallePipeline`] and [`DalleImageVariationPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` of shape `(n, H, W, 3)` or `torch.Tensor` of shape
            `(n, 3, H, W)`):
            `len(prompts) * num_images_to_keep` images grouped by prompt, best first when CLIP ranks them.
        clip_scores (`torch.FloatTensor` of shape `(len(prompts), num_images_to_keep)`, *optional*):
            CLIP similarity (cosine x logit scale) of each kept image; `None` without a CLIP model.
        image_tokens (`torch.LongTensor` of shape `(n, grid, grid)`):
            The dVAE codes of the kept images.
        likelihood_scores (`torch.DoubleTensor` of shape `(len(prompts), num_images_to_keep)`, *optional*):
            With `rerank="likelihood"` or `"both"`: `log p(codes | prompt)` in nats of each kept image
            ([`DallePipeline.score`]).
        ranked_by (`str`, *optional*):
            What ordered the candidates: `"clip"`, `"likelihood"`, `"both"`, or `None` (drawn order, no CLIP model).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    clip_scores: torch.FloatTensor | None
    image_tokens: torch.LongTensor
    likelihood_scores: torch.DoubleTensor | None = None
    ranked_by: str | None = None


@dataclass
class DalleScoreOutput(BaseOutput):
    """Output of [`DallePipeline.score`]: how likely the transformer finds each image's dVAE codes.

    The log-likelihood of a code grid is the sum over its tokens of `log p(code_i | caption, codes before i)`, the
    teacher-forced cross-entropy with its sign flipped; `-log_likelihood_bits` is the length in bits of the best code
    for the grid under the model, what `dalle_hf.compression` writes (docs/likelihood.md).

    Args:
        log_likelihood (`torch.DoubleTensor` of shape `(n,)`):
            `log p(codes | caption)` in nats.
        log_likelihood_bits (`torch.DoubleTensor` of shape `(n,)`):
            The same in bits (`log_likelihood / ln 2`).
        unconditional_log_likelihood (`torch.DoubleTensor` of shape `(n,)`):
            `log p(codes | empty text)` in nats: the all-padding text the model saw under caption dropout.
        unconditional_log_likelihood_bits (`torch.DoubleTensor` of shape `(n,)`):
            The same in bits.
        image_tokens (`torch.LongTensor` of shape `(n, grid, grid)`):
            The codes that were scored.
    """

    log_likelihood: torch.DoubleTensor
    log_likelihood_bits: torch.DoubleTensor
    unconditional_log_likelihood: torch.DoubleTensor
    unconditional_log_likelihood_bits: torch.DoubleTensor
    image_tokens: torch.LongTensor


@dataclass
class DalleClassificationOutput(BaseOutput):
    """Output of [`DallePipeline.classify`]: candidate captions ranked by how likely they make the image.

    Args:
        captions (`list[str]`):
            The candidates, most likely first.
        indices (`torch.LongTensor` of shape `(C,)`):
            Position of each ranked caption in `candidate_captions`.
        probabilities (`torch.DoubleTensor` of shape `(C,)`):
            `p(caption | image)` over the candidates under a uniform prior: the softmax of `log_likelihood`.
        log_likelihood (`torch.DoubleTensor` of shape `(C,)`):
            `log p(codes | caption)` in nats.
        log_likelihood_ratio (`torch.DoubleTensor` of shape `(C,)`):
            `log p(codes | caption) - log p(codes | empty text)` in nats: how much the caption explains the image
            beyond what the model expects of any image (pointwise mutual information, if empty text stands for the
            average caption).
    """

    captions: list[str]
    indices: torch.LongTensor
    probabilities: torch.DoubleTensor
    log_likelihood: torch.DoubleTensor
    log_likelihood_ratio: torch.DoubleTensor


RERANKERS = ("clip", "likelihood", "both")


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Top-k, then nucleus (top-p) filtering of (B, V) logits: removed entries become -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return logits


def standardize_per_group(scores: torch.Tensor, num_groups: int) -> torch.DoubleTensor:
    """(G * n,) scores -> float64 z-scores within each of `num_groups` consecutive groups (0 where a group is flat)."""
    grouped = scores.double().view(num_groups, -1)  # (G, n)
    spread = grouped.std(dim=1, keepdim=True, unbiased=False)  # (G, 1)
    z = (grouped - grouped.mean(dim=1, keepdim=True)) / spread.clamp_min(1e-12)
    return z.view(-1)


class DallePipeline(DiffusionPipeline):
    r"""
    Text-to-image generation with DALL-E (Ramesh et al. 2021).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerFast`]): the BPE tokenizer (`pad_token_id` 0).
        transformer ([`DalleForImageGeneration`]): models `[text ; image tokens]`.
        vae ([`DalleVAE`]): decodes image tokens to pixels.
        clip_model ([`~transformers.CLIPModel`], *optional*): reranks the candidates.
        clip_processor ([`~transformers.CLIPProcessor`], *optional*): CLIP's image size, mean and std.
        default_guidance_scale (`float`, *optional*, defaults to 1.0): the guidance `__call__` uses when it is not
            given. Saved in `model_index.json`, so a checkpoint carries the value measured best for it; 1.0 (no
            guidance, the paper's sampling) suits a transformer trained without caption dropout.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf import DallePipeline
    >>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes")
    >>> out = pipe("a red circle left of a blue square", num_images_per_prompt=16, num_images_to_keep=4,
    ...            generator=torch.Generator().manual_seed(0))
    >>> out.images[0].save("best.png")
    ```
    """

    model_cpu_offload_seq = "transformer->vae->clip_model"
    _optional_components = ["clip_model", "clip_processor"]
    _callback_tensor_inputs = ["image_tokens"]

    def __init__(self, tokenizer, transformer, vae, clip_model=None, clip_processor=None, default_guidance_scale=1.0):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, transformer=transformer, vae=vae, clip_model=clip_model, clip_processor=clip_processor
        )
        if isinstance(default_guidance_scale, bool) or not isinstance(default_guidance_scale, (int, float)) or (
            not default_guidance_scale >= 1
        ):
            raise ValueError(f"default_guidance_scale must be a number >= 1, got {default_guidance_scale!r}")
        self.register_to_config(default_guidance_scale=float(default_guidance_scale))

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        revision: str | None = None,
    ):
        r"""
        Publish the pipeline with its model card, sample grid and code, so that
        `DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)` loads it without dalle-hf (`dalle_hf.hub`).

        Args:
            repo_id (`str`): the Hub repository, `"org/name"`; created if missing.
            commit_message (`str`, *optional*, defaults to `None`): defaults to "Upload DallePipeline (n files)".
            private (`bool`, *optional*, defaults to `None`): make a new repository private (`None`: the Hub's
                default); an existing repository keeps its visibility.
            token (`str`, *optional*, defaults to `None`): a Hub token; `None` uses the one `hf auth login` saved.
            create_pr (`bool`, *optional*, defaults to `False`): open a pull request instead of committing.
            revision (`str`, *optional*, defaults to `None`): the branch to commit to (created if missing).

        Returns:
            `huggingface_hub.CommitInfo`.
        """
        from .hub import push_pipeline

        return push_pipeline(self, repo_id, commit_message=commit_message, private=private, token=token,
                             create_pr=create_pr, revision=revision)  # fmt: skip

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DallePipeline":
        r"""
        [`~diffusers.DiffusionPipeline.from_pretrained`], which also loads a copy that carries its code (a repository
        `dalle-hf push` published, a folder `dalle-hf convert-dalle-mini` wrote) with dalle-hf's own classes: no
        `trust_remote_code`, and none of the copy's code runs (`load_config` reads its `model_index.json` with
        dalle-hf's module names).

        A Hub repo id is fetched with `huggingface_hub.snapshot_download` (`cache_dir`, `revision`, `token`,
        `local_files_only`, `force_download` and `HF_HUB_OFFLINE` apply), because diffusers' own download refuses a
        repository with code unless told `trust_remote_code=True`. Every other argument is diffusers'.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a saved pipeline folder or a Hub repo id.
            kwargs: [`~diffusers.DiffusionPipeline.from_pretrained`]'s (`dtype`, `device_map`, components, ...).
        """
        path = os.fspath(pretrained_model_name_or_path)
        if os.path.isdir(path):
            return super().from_pretrained(path, **kwargs)
        from huggingface_hub import snapshot_download

        hub_kwargs = ("cache_dir", "revision", "token", "local_files_only", "force_download")
        folder = snapshot_download(path, user_agent={"pipeline_class": cls.__name__},
                                   **{k: kwargs[k] for k in hub_kwargs if kwargs.get(k) is not None})  # fmt: skip
        pipe = super().from_pretrained(folder, **kwargs)
        pipe.register_to_config(_name_or_path=path)  # the repo id, as diffusers records it
        return pipe

    @classmethod
    def load_config(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        return_unused_kwargs: bool = False,
        return_commit_hash: bool = False,
        **kwargs,
    ):
        """diffusers' `load_config`, with a copy that carries its code read as dalle-hf saves it
        (`model_index_without_code`): `from_pretrained` then finds the pipeline class and the components in dalle-hf
        and never imports the copy's files."""
        loaded = super().load_config(
            pretrained_model_name_or_path, return_unused_kwargs=return_unused_kwargs,
            return_commit_hash=return_commit_hash, **kwargs,
        )  # fmt: skip
        path = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        if isinstance(loaded, tuple):
            return (model_index_without_code(loaded[0], folder), *loaded[1:])
        return model_index_without_code(loaded, folder)

    @classmethod
    def from_pipe(cls, pipeline: "DallePipeline", **kwargs) -> "DallePipeline":
        r"""
        This class's pipeline on `pipeline`'s modules (one copy of the weights) and settings: the task pipelines of
        one model, e.g. `DalleInpaintPipeline.from_pipe(pipe)` or `DalleMiniInpaintPipeline.from_pipe(mini_pipe)`.

        Unlike `Cls(**pipe.components)`, the settings that are not modules come along too (`default_guidance_scale`,
        DALL·E mini's `vae_has_encoder`, whose loss would let an encoder-less VQGAN encode images with random
        weights). Replaces diffusers' `from_pipe`, which matches components by their annotated types.

        Args:
            pipeline ([`DallePipeline`]): a pipeline of the same model family.
            kwargs: components or settings to replace.
        """
        if not isinstance(pipeline, DallePipeline):
            raise ValueError(f"pipeline must be a dalle-hf pipeline, got {type(pipeline).__name__}")
        names = inspect.signature(cls.__init__).parameters
        settings = {k: v for k, v in pipeline.config.items() if k in names and k not in pipeline.components}
        return cls(**{**pipeline.components, **settings, **kwargs})

    @property
    def image_size(self) -> int:
        """Side in pixels of the images the dVAE codes (and decodes to)."""
        return self.vae.config.image_size

    @property
    def codebook_size(self) -> int:
        """Number of image codes: the dVAE's codebook, which the transformer predicts over."""
        return self.transformer.config.image_vocab_size

    # ----------------------------------------------------------------------------------------------------------
    # Steps shared with DalleImageVariationPipeline
    # ----------------------------------------------------------------------------------------------------------
    def check_sampling_inputs(
        self,
        num_images_per_prompt,
        num_images_to_keep,
        temperature,
        top_k,
        top_p,
        guidance_scale,
        output_type,
        generator,
    ) -> int:
        """Validate the sampling settings; returns `num_images_to_keep` resolved."""
        if not isinstance(num_images_per_prompt, int) or not 1 <= num_images_per_prompt <= MAX_IMAGES_PER_PROMPT:
            raise ValueError(
                f"num_images_per_prompt must be an int in [1, {MAX_IMAGES_PER_PROMPT}], got {num_images_per_prompt!r}"
            )
        if num_images_to_keep is None:
            num_images_to_keep = num_images_per_prompt
        if not isinstance(num_images_to_keep, int) or not 1 <= num_images_to_keep <= num_images_per_prompt:
            raise ValueError(
                f"num_images_to_keep must be an int in [1, num_images_per_prompt={num_images_per_prompt}], "
                f"got {num_images_to_keep!r}"
            )
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 1:
            raise ValueError(f"guidance_scale must be a number >= 1 (1 disables guidance), got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        return num_images_to_keep

    def prompt_token_count(self, prompt: str) -> int:
        """Number of text tokens `prompt` needs (EOS included); above `text_seq_len` it is truncated."""
        return len(self.tokenizer(prompt)["input_ids"])

    def encode_prompt(self, prompts: list[str]) -> torch.LongTensor:
        """Tokenize, pad and truncate to `text_seq_len`: -> (len(prompts), L). An empty prompt becomes all
        padding, the unconditional text the model sees under caption dropout."""
        L = self.transformer.config.text_seq_len
        for p in prompts:
            if self.prompt_token_count(p) > L:
                logger.warning(f"The prompt {p!r} is longer than the model's {L} text tokens and was truncated.")
        ids = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=L, return_tensors="pt"
        )["input_ids"]
        empty = torch.tensor([not p.strip() for p in prompts])
        ids[empty] = self.transformer.config.pad_token_id
        return ids.to(self._execution_device)

    def unconditional_ids(self, batch_size: int) -> torch.LongTensor:
        """All-padding text (B, L): the guidance branch, trained by caption dropout."""
        L = self.transformer.config.text_seq_len
        return torch.full(
            (batch_size, L), self.transformer.config.pad_token_id, dtype=torch.long, device=self._execution_device
        )

    @staticmethod
    def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.LongTensor:
        """One token per row of `probs` (B, V_i) -> (B, 1), drawn on the generator's device.

        diffusers' `randn_tensor` convention: the documented `torch.Generator()` lives on the CPU, and
        `torch.multinomial` on CUDA refuses a CPU generator, so the probabilities go to the generator (B x V_i
        floats per step, negligible beside the forward pass) and the tokens come back.
        """
        if generator is None or generator.device == probs.device:
            return torch.multinomial(probs, 1, generator=generator)
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)

    @torch.no_grad()
    def sample_image_tokens(
        self,
        input_ids: torch.LongTensor,
        prefix_ids: torch.LongTensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        callback_on_step_end: Callable | None = None,
        negative_ids: torch.LongTensor | None = None,
        known_ids: torch.LongTensor | None = None,
        known_mask: torch.BoolTensor | None = None,
    ) -> torch.LongTensor:
        """Autoregressively sample the image tokens after `input_ids` (B, L) and an optional `prefix_ids` (B, p).

        One KV-cached forward per token. With guidance the batch is `[unconditional ; conditional]` and the logits
        are `uncond + guidance_scale * (cond - uncond)`; `negative_ids` (B, L) replace the all-padding
        unconditional text (a negative prompt). Returns (B, image_seq_len).

        Inpainting (`DalleInpaintPipeline`) gives `known_ids` (B, image_seq_len) and `known_mask` (image_seq_len,)
        bool instead of `prefix_ids`: a known position is fed its own code, the others are sampled. The known cells
        before the first unknown one are the prefix (one prefill forward), and sampling stops after the last
        unknown one, so a prefix of known rows draws exactly what `prefix_ids` would.
        """
        transformer = self.transformer
        B = input_ids.shape[0]
        n_total = transformer.config.image_seq_len
        tokens = torch.empty(B, n_total, dtype=torch.long, device=input_ids.device)  # (B, N)
        end, known = n_total, None  # sample positions [p, end)
        if known_mask is not None:
            assert prefix_ids is None and known_ids is not None and known_mask.shape == (n_total,)
            tokens[:] = known_ids
            unknown = (~known_mask).nonzero()[:, 0].tolist()
            if not unknown:
                return tokens
            end, known = unknown[-1] + 1, known_mask.tolist()
            prefix_ids = known_ids[:, : unknown[0]] if unknown[0] else None
        p = 0 if prefix_ids is None else prefix_ids.shape[1]
        if p:
            tokens[:, :p] = prefix_ids
        use_guidance = guidance_scale > 1
        if negative_ids is not None and not use_guidance:
            raise ValueError(f"a negative prompt needs guidance_scale > 1 (it replaces the unconditional branch of "
                             f"classifier-free guidance), got guidance_scale={guidance_scale}")
        uncond_ids = self.unconditional_ids(B) if negative_ids is None else negative_ids
        text = torch.cat([uncond_ids, input_ids]) if use_guidance else input_ids  # (B', L)
        prefix = None if not p else (torch.cat([prefix_ids, prefix_ids]) if use_guidance else prefix_ids)

        # Prefill: the text (and the kept rows) in one forward, then one token per step.
        out = transformer(input_ids=text, image_ids=prefix, use_cache=True, logits_to_keep=1)
        cache = out.cache
        logits = transformer.image_logits(out.logits[:, -1])  # (B', V_i)
        # The loop does only the sampling step per token beyond the model (docs/performance.md).
        # With known cells, a drawn token and the known run after it go into the cache in one forward.
        next_unknown = list(range(n_total))  # next_unknown[i]: the first position >= i to sample
        if known is not None:
            for i in reversed(range(end - 1)):
                next_unknown[i] = next_unknown[i + 1] if known[i] else i
        fed = p  # positions before `fed` are in the cache
        with self.progress_bar(total=end - p) as progress_bar:
            for i in range(p, end):
                if known is not None and known[i]:
                    next_token = known_ids[:, i : i + 1]  # (B, 1): a kept cell is fed its own code
                else:
                    logits = logits.float()
                    if use_guidance:
                        uncond, cond = logits.chunk(2)
                        logits = uncond + guidance_scale * (cond - uncond)  # (B, V_i)
                    if temperature != 1:
                        logits = logits / temperature
                    if top_k is not None or top_p is not None:
                        logits = filter_logits(logits, top_k, top_p)
                    next_token = self.draw(logits.softmax(-1), generator)  # (B, 1)
                tokens[:, i] = next_token[:, 0]
                if callback_on_step_end is not None:
                    callback_on_step_end(self, i, i, {"image_tokens": tokens[:, : i + 1]})
                progress_bar.update()
                if i + 1 < end and i >= fed:
                    j = next_unknown[i + 1]  # feed positions [i, j): this token and the known ones after it
                    if j == i + 1:
                        step_ids = next_token.repeat(2, 1) if use_guidance else next_token  # (B', 1)
                        logits = transformer.decode_step(step_ids, cache)  # (B', V_i)
                    else:
                        run = tokens[:, i:j].repeat(2, 1) if use_guidance else tokens[:, i:j]  # (B', j - i)
                        out = transformer(image_ids=run, cache=cache, logits_to_keep=1)
                        logits = transformer.image_logits(out.logits[:, -1])  # (B', V_i)
                    fed = j
        return tokens

    @torch.no_grad()
    def decode_image_tokens(self, tokens: torch.LongTensor, batch_size: int = 64) -> torch.Tensor:
        """dVAE decode (B, N) codes -> (B, 3, H, W) float32 in [0, 1], in chunks to bound memory."""
        g = self.transformer.config.image_grid_size
        grids = tokens.view(-1, g, g)  # (B, g, g)
        images = [self.vae.decode_code(chunk).float() for chunk in grids.split(batch_size)]
        return torch.cat(images).clamp(0, 1)

    @torch.no_grad()
    def rank_and_keep(self, images, tokens, scores_fn, num_groups: int, per_group: int, keep: int):
        """Sort each group of `per_group` candidates by CLIP score and keep the best `keep`.

        `scores_fn(images) -> (B,)` or `None` without CLIP (then the first `keep` samples are kept).
        Returns (images, tokens, scores (num_groups, keep) or None).
        """
        scores = None if scores_fn is None else scores_fn(images).float().cpu()  # (G * n,)
        index = self.keep_index(scores, num_groups, per_group, keep)  # (G * keep,)
        kept = None if scores is None else scores[index].view(num_groups, keep)
        return images[index.to(images.device)], tokens[index.to(tokens.device)], kept

    @staticmethod
    def keep_index(ranking: torch.Tensor | None, num_groups: int, per_group: int, keep: int) -> torch.LongTensor:
        """(G * n,) scores of `num_groups` consecutive groups -> (G * keep,) flat indices of each group's best `keep`,
        best first; `ranking=None` keeps each group's first `keep` in drawn order."""
        if ranking is None:
            return torch.arange(num_groups * per_group).view(num_groups, per_group)[:, :keep].flatten()
        top = ranking.view(num_groups, per_group).topk(keep, dim=1)  # sorted, best first
        return (top.indices + torch.arange(num_groups)[:, None] * per_group).flatten()  # (G * keep,)

    def postprocess(self, images: torch.Tensor, output_type: str):
        """(B, 3, H, W) float in [0, 1] -> PIL list, uint8-range float np array (B, H, W, 3) in [0, 1], or the
        tensor."""
        if output_type == "pt":
            return images.cpu()
        array = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (B, H, W, 3)
        if output_type == "np":
            return array
        return [PIL.Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]

    # ----------------------------------------------------------------------------------------------------------
    # Likelihoods
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images) -> torch.LongTensor:
        """dVAE codes (n, grid, grid) of a list of images (PIL, `np.ndarray` or `torch.Tensor`, each converted as
        [`DalleImageVariationPipeline`] converts its input) or of one batched float tensor (n, 3, H, W) in [0, 1]."""
        batched = isinstance(images, torch.Tensor) and images.dim() == 4
        if not (batched or (isinstance(images, (list, tuple)) and images)):
            raise ValueError(f"images must be a non-empty list of images or a (n, 3, H, W) tensor, got {images!r:.80}")
        pixel_values = torch.cat([image_to_tensor(image, self.image_size) for image in images])  # (n, 3, H, W)
        vae_dtype = next(self.vae.parameters()).dtype
        codes = [self.vae.get_codebook_indices(chunk.to(self._execution_device, vae_dtype)) for chunk in
                 pixel_values.split(64)]  # fmt: skip
        return torch.cat(codes)  # (n, g, g)

    def check_image_tokens(self, image_tokens) -> torch.LongTensor:
        """(n, grid, grid) or (n, grid * grid) image codes (dVAE or VQGAN) -> (n, grid * grid), validated."""
        g, V = self.transformer.config.image_grid_size, self.codebook_size
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.dtype != torch.long:
            raise ValueError(f"image_tokens must be a torch.LongTensor, got {type(image_tokens).__name__}")
        if image_tokens.dim() == 3 and image_tokens.shape[1:] == (g, g):
            image_tokens = image_tokens.flatten(1)  # (n, g * g)
        if image_tokens.dim() != 2 or image_tokens.shape[1] != g * g or not len(image_tokens):
            raise ValueError(f"image_tokens must be (n, {g}, {g}) or (n, {g * g}), got {tuple(image_tokens.shape)}")
        if image_tokens.min() < 0 or image_tokens.max() >= V:
            raise ValueError(f"image_tokens must be image codes in [0, {V})")
        return image_tokens

    @torch.no_grad()
    def code_log_probs(
        self, image_tokens: torch.LongTensor, input_ids: torch.LongTensor, batch_size: int = 32
    ) -> torch.DoubleTensor:
        """`log p(code_i | codes_<i, text)` in nats for each of (n, N) codes given (n, L) text ids: one
        teacher-forced forward per batch of rows, the head's projection and softmax in float64
        (`image_log_probs`). Returns (n, N) float64 on the CPU."""
        transformer = self.transformer
        N = image_tokens.shape[1]
        rows = []
        for codes, text in zip(image_tokens.split(batch_size), input_ids.split(batch_size)):
            codes = codes.to(self._execution_device)
            # positions L .. L + N - 1 (the last N) predict the codes; the head runs on those only
            out = transformer(input_ids=text, image_ids=codes[:, :-1], logits_to_keep=N)
            log_probs = transformer.image_log_probs(out.last_hidden_state)  # (b, N, V_i) float64
            rows.append(log_probs.gather(-1, codes[..., None])[..., 0].cpu())  # (b, N)
        return torch.cat(rows)

    def code_log_likelihood(
        self, image_tokens: torch.LongTensor, input_ids: torch.LongTensor, batch_size: int = 32
    ) -> torch.DoubleTensor:
        """`log p(codes | text)` in nats for (n, N) codes and (n, L) text ids: the sum of `code_log_probs`.
        Returns (n,) float64."""
        return self.code_log_probs(image_tokens, input_ids, batch_size).sum(-1)

    @torch.no_grad()
    def score(
        self,
        images=None,
        captions: str | list[str] = "",
        image_tokens: torch.LongTensor | None = None,
        batch_size: int = 32,
    ) -> DalleScoreOutput:
        r"""
        The log-likelihood of each image's dVAE codes under the transformer, given its caption and given empty text.

        Args:
            images (`list` of `PIL.Image.Image` / `np.ndarray` / `torch.Tensor`, or a `torch.Tensor` (n, 3, H, W)):
                The images; each is encoded to dVAE codes first (converted as in [`DalleImageVariationPipeline`]).
                Give either `images` or `image_tokens`.
            captions (`str` or `list[str]`, *optional*, defaults to `""`):
                One caption for all images or one per image. `""` is the unconditional (all-padding) text.
            image_tokens (`torch.LongTensor` of shape `(n, grid, grid)`, *optional*, defaults to `None`):
                Codes to score directly (e.g. `DallePipelineOutput.image_tokens`) instead of `images`.
            batch_size (`int`, *optional*, defaults to 32):
                Rows per teacher-forced forward.

        Returns:
            [`DalleScoreOutput`]: log-likelihoods in nats and bits, conditional and unconditional.

        Example:

        ```python
        >>> out = pipe.score(images, ["a red circle", "two squares"])
        >>> out.log_likelihood_bits / out.image_tokens[0].numel()  # bits per image token
        ```
        """
        # 1. Check inputs and get the codes
        if (images is None) == (image_tokens is None):
            raise ValueError("give exactly one of images or image_tokens")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        codes = self.check_image_tokens(self.encode_images(images) if image_tokens is None else image_tokens)
        n = len(codes)
        if isinstance(captions, str):
            captions = [captions] * n
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions) or len(captions) != n:
            raise ValueError(f"captions must be a str or a list of {n} str (one per image), got {captions!r:.80}")

        # 2. Teacher-forced log-likelihoods given each caption and given empty text
        log_likelihood = self.code_log_likelihood(codes, self.encode_prompt(captions), batch_size)  # (n,)
        unconditional = self.code_log_likelihood(codes, self.unconditional_ids(n), batch_size)  # (n,)
        g = self.transformer.config.image_grid_size
        return DalleScoreOutput(
            log_likelihood=log_likelihood,
            log_likelihood_bits=log_likelihood / math.log(2),
            unconditional_log_likelihood=unconditional,
            unconditional_log_likelihood_bits=unconditional / math.log(2),
            image_tokens=codes.view(n, g, g).cpu(),
        )

    @torch.no_grad()
    def classify(self, image, candidate_captions: list[str], batch_size: int = 32) -> DalleClassificationOutput:
        r"""
        Zero-shot classification: rank candidate captions by the likelihood of the image's codes under each.

        Bayes: `p(c | x) = p(x | c) p(c) / p(x)`. With a uniform prior over the candidates, `p(c | x)` is the softmax
        of `log p(x | c)` over them, so ranking by `log p(x | c)` ranks by `p(c | x)`. Subtracting the unconditional
        term `log p(x | empty text)` (the model's `p(x)` under caption dropout) gives `log p(c | x) - log p(c)` and
        the same ranking for one image; it is what makes scores of different images comparable (likelihood
        reranking uses it).

        Args:
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`, or `torch.LongTensor` of shape `(grid, grid)`):
                One image (converted as in [`DalleImageVariationPipeline`]), or its dVAE codes.
            candidate_captions (`list[str]`):
                At least two distinct captions.
            batch_size (`int`, *optional*, defaults to 32):
                Captions per teacher-forced forward.

        Returns:
            [`DalleClassificationOutput`]: the captions, most likely first, with their scores.

        Example:

        ```python
        >>> pipe.classify(image, ["a red circle", "a blue circle", "a red square"]).captions[0]
        ```
        """
        if (
            not isinstance(candidate_captions, list)
            or len(candidate_captions) < 2
            or not all(isinstance(c, str) for c in candidate_captions)
            or len(set(candidate_captions)) != len(candidate_captions)
        ):
            raise ValueError(
                f"candidate_captions must be a list of at least 2 distinct str, got {candidate_captions!r:.80}"
            )
        if isinstance(image, torch.Tensor) and image.dtype == torch.long:
            codes = self.check_image_tokens(image[None] if image.dim() == 2 else image)  # (1, N)
        else:
            codes = self.check_image_tokens(self.encode_images([image]))  # (1, N)
        if len(codes) != 1:
            raise ValueError(f"classify takes one image, got {len(codes)}")
        C = len(candidate_captions)
        text_ids = self.encode_prompt(candidate_captions)  # (C, L)
        log_likelihood = self.code_log_likelihood(codes.expand(C, -1), text_ids, batch_size)  # (C,)
        unconditional = self.code_log_likelihood(codes, self.unconditional_ids(1), batch_size)  # (1,)
        order = torch.argsort(log_likelihood, descending=True, stable=True)  # (C,)
        return DalleClassificationOutput(
            captions=[candidate_captions[i] for i in order.tolist()],
            indices=order,
            probabilities=log_likelihood.softmax(-1)[order],
            log_likelihood=log_likelihood[order],
            log_likelihood_ratio=(log_likelihood - unconditional)[order],
        )

    # ----------------------------------------------------------------------------------------------------------
    def check_inputs(self, prompt):
        if isinstance(prompt, str):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(p, str) for p in prompt):
            raise ValueError(
                f"prompt must be a str or a non-empty list of str, got {type(prompt).__name__}: {prompt!r}"
            )
        return prompt

    def check_negative_prompt(self, negative_prompt, num_prompts: int) -> list[str] | None:
        """`None`, or one negative prompt per prompt."""
        if negative_prompt is None:
            return None
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * num_prompts
        if not isinstance(negative_prompt, list) or not all(isinstance(p, str) for p in negative_prompt):
            raise ValueError(f"negative_prompt must be a str or a list of str, got {negative_prompt!r}")
        if len(negative_prompt) != num_prompts:
            raise ValueError(f"negative_prompt must be one str or one per prompt ({num_prompts}), "
                             f"got a list of {len(negative_prompt)}")
        return negative_prompt

    def clip_text_scorer(self, prompts: list[str], per_prompt: int):
        """A `scores_fn` comparing each candidate with its own prompt, or `None` without CLIP."""
        if self.clip_model is None or self.clip_processor is None:
            return None
        from .clip import clip_text_image_scores

        texts = [p for p in prompts for _ in range(per_prompt)]
        return lambda images: clip_text_image_scores(self.clip_model, self.clip_processor, images, texts)

    def check_rerank(self, rerank: str) -> None:
        if rerank not in RERANKERS:
            raise ValueError(f"rerank must be one of {RERANKERS}, got {rerank!r}")
        if rerank == "both" and (self.clip_model is None or self.clip_processor is None):
            raise ValueError('rerank="both" needs a CLIP model; this pipeline has none (use rerank="likelihood")')

    @torch.no_grad()
    def rerank_and_keep(self, rerank, prompts, input_ids, images, tokens, per_prompt: int, keep: int):
        """Order each prompt's `per_prompt` candidates by CLIP, by likelihood or by both, and keep the best `keep`.

        The likelihood score is `log p(codes | prompt)`, the ranking `classify` uses for captions. (Its ratio to
        `log p(codes | empty text)` picked worse than a random pick on the shapes dev bank; docs/likelihood.md.)
        `"both"` adds the two scores standardized over each prompt's candidates. Without CLIP, `rerank="clip"`
        keeps the first `keep` in drawn order.

        Returns `(images, tokens, clip_scores (P, keep) or None, likelihood_scores (P, keep) or None, ranked_by)`.
        """
        P = len(prompts)
        scores = {}
        if rerank in ("clip", "both"):
            scores_fn = self.clip_text_scorer(prompts, per_prompt)
            if scores_fn is not None:
                scores["clip"] = scores_fn(images).float().cpu()  # (P * N,)
        if rerank in ("likelihood", "both"):
            scores["likelihood"] = self.code_log_likelihood(tokens, input_ids)  # (P * N,)
        if rerank == "both":
            ranking = sum(standardize_per_group(s, P) for s in scores.values())  # (P * N,)
        else:
            ranking = scores.get(rerank)  # None: rerank="clip" without a CLIP model, drawn order
        index = self.keep_index(ranking, P, per_prompt, keep)  # (P * keep,)
        ranked_by = rerank if scores else None
        kept = {name: s[index].view(P, keep) for name, s in scores.items()}
        images, tokens = images[index.to(images.device)], tokens[index.to(tokens.device)]
        return images, tokens, kept.get("clip"), kept.get("likelihood"), ranked_by

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        num_images_per_prompt: int = 1,
        num_images_to_keep: int | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        rerank: str = "clip",
    ):
        r"""
        Generate images for `prompt`, keeping the CLIP-best `num_images_to_keep` of `num_images_per_prompt`.

        Args:
            prompt (`str` or `list[str]`):
                Caption(s). An empty string samples unconditionally (all-padding text). Longer than
                `text_seq_len` tokens: truncated, with a warning.
            num_images_per_prompt (`int`, *optional*, defaults to 1):
                Candidates N sampled per prompt, at most `MAX_IMAGES_PER_PROMPT` (256).
            num_images_to_keep (`int`, *optional*, defaults to `num_images_per_prompt`):
                How many to return per prompt: the CLIP-best if a CLIP model is loaded, else the first.
            temperature (`float`, *optional*, defaults to 1.0):
                Softmax temperature (> 0).
            top_k (`int`, *optional*, defaults to `None`):
                Sample only from the `top_k` most likely codes.
            top_p (`float`, *optional*, defaults to `None`):
                Nucleus sampling: the smallest set of codes with probability mass `top_p`, in (0, 1].
            guidance_scale (`float`, *optional*, defaults to `None`):
                Classifier-free guidance; 1 disables it, > 1 doubles the batch to `[uncond ; cond]`. `None` uses
                the checkpoint's `default_guidance_scale` (its `model_index.json`; 1.0 unless set).
            negative_prompt (`str` or `list[str]`, *optional*, defaults to `None`):
                What to steer away from: the guidance branch is conditioned on it instead of on empty text, so the
                logits become `neg + guidance_scale * (cond - neg)`. One for all prompts or one per prompt; needs
                guidance (`guidance_scale > 1`). The prompt without the attribute that comes out wrong works well
                (e.g. "a square" for "a cyan square"; docs/design.md).
            generator (`torch.Generator`, *optional*, defaults to `None`):
                Makes sampling deterministic.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"` (float array (n, H, W, 3) in [0, 1]) or `"pt"` (float tensor (n, 3, H, W) in [0, 1]).
            return_dict (`bool`, *optional*, defaults to `True`):
                Return a [`DallePipelineOutput`] instead of a tuple `(images, clip_scores, image_tokens)`.
            callback_on_step_end (`Callable`, *optional*, defaults to `None`):
                Called after every sampled token as `callback(pipe, step, token_index, {"image_tokens": (B, i + 1)})`
                (e.g. to stream partial images).
            rerank (`str`, *optional*, defaults to `"clip"`):
                How to order the candidates before keeping the best: `"clip"` (CLIP similarity to the prompt; the
                first samples without a CLIP model), `"likelihood"` (the transformer's `log p(image codes |
                prompt)`, no CLIP needed) or `"both"` (the two standardized and added). On shapes CLIP is by far the
                best (docs/likelihood.md).

        Returns:
            [`DallePipelineOutput`] or `tuple` `(images, clip_scores, image_tokens)`.
        """
        # 1. Check inputs
        prompts = self.check_inputs(prompt)
        self.check_rerank(rerank)
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        keep = self.check_sampling_inputs(
            num_images_per_prompt, num_images_to_keep, temperature, top_k, top_p, guidance_scale, output_type, generator
        )

        negative_prompts = self.check_negative_prompt(negative_prompt, len(prompts))

        # 2. Encode the prompts (and negative prompts), one row per candidate
        input_ids = self.encode_prompt(prompts).repeat_interleave(num_images_per_prompt, dim=0)  # (P * N, L)
        negative_ids = None
        if negative_prompts is not None:
            negative_ids = self.encode_prompt(negative_prompts).repeat_interleave(num_images_per_prompt, dim=0)

        # 3. Sample image tokens with the KV cache
        tokens = self.sample_image_tokens(
            input_ids, None, temperature, top_k, top_p, guidance_scale, generator, callback_on_step_end, negative_ids
        )  # (P * N, image_seq_len)

        # 4. Decode with the dVAE
        images = self.decode_image_tokens(tokens)  # (P * N, 3, H, W)

        # 5. Rerank (CLIP, likelihood or both) and keep the best
        images, tokens, scores, likelihood_scores, ranked_by = self.rerank_and_keep(
            rerank, prompts, input_ids, images, tokens, num_images_per_prompt, keep
        )

        # 6. Postprocess
        g = self.transformer.config.image_grid_size
        tokens = tokens.view(-1, g, g).cpu()
        images = self.postprocess(images, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, scores, tokens)
        return DallePipelineOutput(
            images=images, clip_scores=scores, image_tokens=tokens, likelihood_scores=likelihood_scores,
            ranked_by=ranked_by,
        )


__all__ = [
    "DalleClassificationOutput",
    "DallePipeline",
    "DallePipelineOutput",
    "DalleScoreOutput",
    "MAX_IMAGES_PER_PROMPT",
    "RERANKERS",
    "filter_logits",
    "standardize_per_group",
]
