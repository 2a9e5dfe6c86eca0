"""DALL·E mini and DALL·E Mega (Dayma et al. 2021-2022): a BART encoder-decoder that writes VQGAN codes.

The encoder reads the prompt's 64 BPE tokens; the decoder starts from `decoder_start_token_id` and predicts the
256 codes of a 16 x 16 VQGAN f16 grid in raster order, attending to its own earlier codes and, through
cross-attention, to the encoder's states. The layers are dalle-mini's released ones (`modeling.py` of dalle-mini
0.1.5, ported to PyTorch by min-dalle 0.4.11, whose parameter names these are):

- normformer: a LayerNorm before and after each attention, the feed-forward a GLU
  `fc2(ln1(gelu(fc0 x) * fc1 x))` after its own `ln0`, and the residual added after the post-LayerNorm;
- no biases in any Linear, and no scale on the LayerNorms dalle-mini builds with `use_scale=force_ln_scale=False`
  (the pre-attention ones, the GLU's two, `final_ln`): those have a bias only ([`LayerNormNoScale`]).

Sampling differs from min-dalle in how it is computed, not in what it computes (docs/dalle-mini.md): the
cross-attention keys and values of the text are computed once per prompt and kept in [`DalleBartCache`], and a
step attends only the filled prefix of the self-attention cache, which is kept in the compute dtype.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dalle_bart import DalleBartConfig
from .quantization import unpack_bnb_4bit_cpu_weights


class DalleBartCache:
    """What the decoder keeps between steps: the text's cross-attention keys and values, and a preallocated
    self-attention cache.

    - Cross-attention: the keys and values of the encoder states depend on the prompt only, so they are projected
      once when the prompt is encoded (min-dalle projects all 64 text states again at every step of every layer:
      at batch 2 about ten times the arithmetic of the rest of a step).
    - Self-attention: keys and values of `image_seq_len` positions per layer, written in place, stored in the
      compute dtype (min-dalle keeps its cache in float32 whatever the model's dtype); a step reads the first
      `length` positions only (min-dalle attends all 256 slots under a mask).

    Args:
        config (`DalleBartConfig`): layer count, heads, width and `image_seq_len`.
        batch_size (`int`): rows (with guidance: `[uncond ; cond]`, twice the number of images).
        device, dtype: where and how to store; use the model's.
        max_length (`int`, *optional*): decoder positions to reserve, defaults to `config.image_seq_len`.
    """

    def __init__(
        self, config: DalleBartConfig, batch_size: int, device=None, dtype=None, max_length: int | None = None
    ):
        self.max_length = max_length or config.image_seq_len
        shape = (config.decoder_layers, batch_size, config.attention_heads, self.max_length, config.head_dim)
        # never read before written: a step attends positions [0, length) only
        self.keys = torch.empty(shape, device=device, dtype=dtype)  # (n_layer, B, nh, max_length, hs)
        self.values = torch.empty(shape, device=device, dtype=dtype)  # (n_layer, B, nh, max_length, hs)
        self.length = 0  # decoder positions filled; advanced by the model after all layers have written
        self.encoder_keys: list[torch.Tensor] = []  # per decoder layer, (B, nh, text_seq_len, hs)
        self.encoder_values: list[torch.Tensor] = []  # per decoder layer, (B, nh, text_seq_len, hs)
        # the text's key mask in SDPA's additive form, 0 or -inf: SDPA would convert a boolean one at every call
        self.encoder_attention_bias: torch.Tensor | None = None  # (B, 1, 1, text_seq_len)

    @property
    def encoder_attention_mask(self) -> torch.BoolTensor | None:
        """The text's key mask (B, 1, 1, text_seq_len), False at padding (read from `encoder_attention_bias`)."""
        return None if self.encoder_attention_bias is None else self.encoder_attention_bias == 0

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` of shape (B, nh, T, hs) after the cached positions; return all keys and values so far,
        (B, nh, length + T, hs) each."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"the cache holds {self.max_length} decoder positions, asked to write up to {end}")
        self.keys[layer_idx, :, :, self.length : end] = k
        self.values[layer_idx, :, :, self.length : end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def reorder(self, index: torch.LongTensor) -> "DalleBartCache":
        """Keep and reorder batch rows (`index` of shape (B',)); returns `self`."""
        self.keys, self.values = self.keys.index_select(1, index), self.values.index_select(1, index)
        self.encoder_keys = [k.index_select(0, index) for k in self.encoder_keys]
        self.encoder_values = [v.index_select(0, index) for v in self.encoder_values]
        self.encoder_attention_bias = self.encoder_attention_bias.index_select(0, index)
        return self

    def set_encoder_attention_mask(self, mask: torch.BoolTensor) -> None:
        """Keep the text's key mask (B, 1, 1, text_seq_len), False at padding, in its additive form."""
        bias = torch.zeros(mask.shape, device=mask.device, dtype=self.keys.dtype)
        self.encoder_attention_bias = bias.masked_fill_(~mask, float("-inf"))


@dataclass
class DalleBartOutput(ModelOutput):
    """Output of [`DalleBartForImageGeneration`].

    Args:
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, image_vocab_size + 1)`):
            The head's output at each decoder position given (or the last `logits_to_keep`): position `j` predicts
            code `j` (position 0 holds the start token). Sampling keeps `image_logits(logits)`, the first
            `sampled_image_vocab_size` columns.
        cache (`DalleBartCache`, *optional*, returned with `use_cache=True` or when one was given):
            The filled cache, cross-attention keys and values included.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, d_model)`):
            The decoder's final LayerNorm output at the positions `logits` covers (what `image_log_probs` projects
            in float64 for scores and compression).
        encoder_last_hidden_state (`torch.FloatTensor` of shape `(batch_size, text_seq_len, d_model)`, *optional*):
            The encoder's output, when the call encoded a prompt.
    """

    logits: torch.FloatTensor | None = None
    cache: DalleBartCache | None = None
    last_hidden_state: torch.FloatTensor | None = None
    encoder_last_hidden_state: torch.FloatTensor | None = None


class LayerNormNoScale(nn.Module):
    """A LayerNorm with a bias and no scale: dalle-mini's `norm(use_scale=False)` (`force_ln_scale=False` in the
    released configs). min-dalle builds a full `nn.LayerNorm` there and leaves the scale at 1 (its files have none)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.bias.shape, None, self.bias, self.eps)


class DalleBartGLU(nn.Module):
    """dalle-mini's `GLU`: `fc2(ln1(gelu(fc0 x) * fc1 x))` after `ln0`, no biases, exact (erf) GELU."""

    def __init__(self, config: DalleBartConfig):
        super().__init__()
        d, h, eps = config.d_model, config.glu_dim, config.layer_norm_eps
        self.ln0 = LayerNormNoScale(d, eps)
        self.ln1 = LayerNormNoScale(h, eps)
        self.fc0 = nn.Linear(d, h, bias=False)
        self.fc1 = nn.Linear(d, h, bias=False)
        self.fc2 = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln0(x)
        return self.fc2(self.ln1(F.gelu(self.fc0(x)) * self.fc1(x)))


class DalleBartAttention(nn.Module):
    """Multi-head attention without biases; keys and values are projected by `keys_values`, so the caller decides
    what they come from (the same states, the cache, or the text once per prompt)."""

    def __init__(self, config: DalleBartConfig):
        super().__init__()
        d = config.d_model
        self.n_head = config.attention_heads
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, C) states -> keys and values (B, nh, S, hs)."""
        return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))

    def forward(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q = self.split_heads(self.q_proj(x))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=is_causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class DalleBartEncoderLayer(nn.Module):
    def __init__(self, config: DalleBartConfig):
        super().__init__()
        eps = config.layer_norm_eps
        self.pre_self_attn_layer_norm = LayerNormNoScale(config.d_model, eps)
        self.self_attn = DalleBartAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(config.d_model, eps=eps)
        self.glu = DalleBartGLU(config)

    def forward(self, x: torch.Tensor, attention_mask: torch.BoolTensor) -> torch.Tensor:
        h = self.pre_self_attn_layer_norm(x)
        h = self.self_attn(h, *self.self_attn.keys_values(h), attn_mask=attention_mask)
        x = x + self.self_attn_layer_norm(h)
        return x + self.glu(x)


class DalleBartDecoderLayer(nn.Module):
    def __init__(self, config: DalleBartConfig):
        super().__init__()
        d, eps = config.d_model, config.layer_norm_eps
        self.pre_self_attn_layer_norm = LayerNormNoScale(d, eps)
        self.self_attn = DalleBartAttention(config)
        self.self_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.pre_encoder_attn_layer_norm = LayerNormNoScale(d, eps)
        self.encoder_attn = DalleBartAttention(config)
        self.encoder_attn_layer_norm = nn.LayerNorm(d, eps=eps)
        self.glu = DalleBartGLU(config)

    def forward(self, x: torch.Tensor, layer_idx: int, cache: DalleBartCache) -> torch.Tensor:
        T, start = x.shape[1], cache.length
        h = self.pre_self_attn_layer_norm(x)
        keys, values = cache.update(layer_idx, *self.self_attn.keys_values(h))  # (B, nh, start + T, hs)
        if T == 1:  # a sampling step sees the whole filled prefix
            h = self.self_attn(h, keys, values)
        elif start == 0:
            h = self.self_attn(h, keys, values, is_causal=True)
        else:  # a run of known codes after cached ones: query i sits at position start + i
            positions = torch.arange(start, start + T, device=x.device)[:, None]  # (T, 1)
            h = self.self_attn(h, keys, values, attn_mask=torch.arange(start + T, device=x.device) <= positions)
        x = x + self.self_attn_layer_norm(h)
        h = self.pre_encoder_attn_layer_norm(x)
        h = self.encoder_attn(
            h, cache.encoder_keys[layer_idx], cache.encoder_values[layer_idx], attn_mask=cache.encoder_attention_bias
        )
        x = x + self.encoder_attn_layer_norm(h)
        return x + self.glu(x)


class DalleBartEncoder(nn.Module):
    def __init__(self, config: DalleBartConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.text_vocab_size, config.d_model)
        self.embed_positions = nn.Embedding(config.text_seq_len, config.d_model)
        self.layers = nn.ModuleList([DalleBartEncoderLayer(config) for _ in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.final_ln = LayerNormNoScale(config.d_model, config.layer_norm_eps)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(B, text_seq_len) ids -> (B, text_seq_len, d_model) states; padding is masked as a key."""
        attention_mask = (input_ids != self.config.text_pad_token_id)[:, None, None, :]  # (B, 1, 1, L)
        x = self.embed_tokens(input_ids) + self.embed_positions.weight[: input_ids.shape[1]]  # (B, L, C)
        x = self.layernorm_embedding(x)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return self.final_ln(x)


class DalleBartDecoder(nn.Module):
    def __init__(self, config: DalleBartConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.image_vocab_size + 1, config.d_model)  # + the start token's row
        self.embed_positions = nn.Embedding(config.image_seq_len, config.d_model)
        self.layers = nn.ModuleList([DalleBartDecoderLayer(config) for _ in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.final_ln = LayerNormNoScale(config.d_model, config.layer_norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.image_vocab_size + 1, bias=False)

    def forward(self, decoder_ids: torch.LongTensor, cache: DalleBartCache) -> torch.Tensor:
        """(B, T) decoder inputs at positions `[cache.length, cache.length + T)` -> (B, T, d_model), the final
        LayerNorm's output; the cache is filled and advanced."""
        start, T = cache.length, decoder_ids.shape[1]
        x = self.embed_tokens(decoder_ids) + self.embed_positions.weight[start : start + T]  # (B, T, C)
        x = self.layernorm_embedding(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, cache)
        cache.length += T
        return self.final_ln(x)


class DalleBartPreTrainedModel(PreTrainedModel):
    config_class = DalleBartConfig
    config: DalleBartConfig
    base_model_prefix = "dalle_bart"
    main_input_name = "input_ids"
    _no_split_modules = ["DalleBartEncoderLayer", "DalleBartDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, LayerNormNoScale):
            init.zeros_(module.bias)


class DalleBartForImageGeneration(DalleBartPreTrainedModel):
    r"""
    DALL·E mini / Mega: the text encoder, the code decoder with its head, and a cache for sampling.

    It speaks the interface dalle-hf's pipelines sample and score with (that of [`DalleForImageGeneration`]): a
    forward from the prompt (and optionally known codes) that returns the next code's logits and a cache,
    `decode_step` for one code per row, `image_logits` / `image_log_probs` over the codes sampling keeps.

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf.configuration_dalle_bart import DalleBartConfig
    >>> from dalle_hf.modeling_dalle_bart import DalleBartForImageGeneration
    >>> config = DalleBartConfig(text_vocab_size=100, image_vocab_size=64, sampled_image_vocab_size=64,
    ...     decoder_start_token_id=64, text_seq_len=8, image_seq_len=16, d_model=32, encoder_layers=2,
    ...     decoder_layers=2, attention_heads=4, glu_dim=48)
    >>> model = DalleBartForImageGeneration(config)
    >>> text = torch.tensor([[0, 5, 6, 2, 1, 1, 1, 1]]); codes = torch.randint(0, 64, (1, 15))
    >>> model(input_ids=text, image_ids=codes).logits.shape  # start token + 15 codes
    torch.Size([1, 16, 65])
    ```
    """

    def __init__(self, config: DalleBartConfig):
        super().__init__(config)
        self.encoder = DalleBartEncoder(config)
        self.decoder = DalleBartDecoder(config)
        # bitsandbytes 4-bit on CPU: make a checkpoint saved after a forward reload right (see the function).
        self.register_state_dict_pre_hook(unpack_bnb_4bit_cpu_weights)
        self.post_init()

    @property
    def cache_dtype(self) -> torch.dtype:
        """dtype of a new `DalleBartCache`: the decoder's compute dtype."""
        return self.decoder.embed_tokens.weight.dtype

    def _check_inputs(self, input_ids, image_ids, cache):
        config = self.config
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] != config.text_seq_len:
                raise ValueError(
                    f"input_ids must be (batch, text_seq_len={config.text_seq_len}), got {tuple(input_ids.shape)}"
                )
            if input_ids.min() < 0 or input_ids.max() >= config.text_vocab_size:
                raise ValueError(f"input_ids must be text token ids in [0, {config.text_vocab_size})")
            if (input_ids == config.text_pad_token_id).all(dim=1).any():
                raise ValueError("every row of input_ids needs a token other than padding (the unconditional "
                                 f"prompt is [{config.text_bos_token_id}, {config.text_eos_token_id}], then padding)")
            if cache is not None and cache.length > 0:
                raise ValueError("input_ids (text) can only be given at the start, with an empty cache")
        elif cache is None or cache.length == 0:
            raise ValueError("input_ids (text) are required unless continuing from a cache")
        if image_ids is not None:
            if image_ids.dim() != 2:
                raise ValueError(f"image_ids must be (batch, num_image_tokens), got {tuple(image_ids.shape)}")
            V = config.sampled_image_vocab_size
            if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= V):
                raise ValueError(f"image_ids must be VQGAN codes in [0, {V})")

    def encode_text(self, input_ids: torch.LongTensor, cache: DalleBartCache) -> torch.Tensor:
        """Encode the prompts and put each decoder layer's cross-attention keys and values in `cache`.

        Identical rows are encoded once (guidance repeats the unconditional prompt, and `num_images_per_prompt`
        each prompt): a 3 x 3 grid encodes 2 rows, not 18. Returns the encoder states (B, text_seq_len, d_model).
        """
        unique_ids, inverse = torch.unique(input_ids, dim=0, return_inverse=True)  # (U, L), (B,)
        states = self.encoder(unique_ids)  # (U, L, C)
        for layer in self.decoder.layers:
            k, v = layer.encoder_attn.keys_values(states)  # (U, nh, L, hs)
            cache.encoder_keys.append(k.index_select(0, inverse).to(cache.keys.dtype))
            cache.encoder_values.append(v.index_select(0, inverse).to(cache.keys.dtype))
        cache.set_encoder_attention_mask((input_ids != self.config.text_pad_token_id)[:, None, None, :])
        return states.index_select(0, inverse)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        image_ids: torch.LongTensor | None = None,
        cache: DalleBartCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
    ) -> DalleBartOutput:
        r"""
        Teacher-forced decoding of `[start ; image_ids]` given the prompt, or of more codes from a cache.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_seq_len)`, *optional*):
                BART token ids padded with `config.text_pad_token_id`. Required on the first call; the decoder then
                starts from `config.decoder_start_token_id`.
            image_ids (`torch.LongTensor` of shape `(batch_size, n)`, *optional*):
                VQGAN codes in raster order: known codes after the start token, or more codes after the cached
                ones. At most `image_seq_len - 1` codes follow the start token (the last code predicts nothing).
            cache (`DalleBartCache`, *optional*):
                A cache to continue from; it is filled in place and returned.
            use_cache (`bool`, *optional*, defaults to `False`):
                Allocate a cache for all `image_seq_len` positions when none is given, and return it.
            logits_to_keep (`int`, *optional*, defaults to 0):
                Return logits for only the last `logits_to_keep` positions (0: all), e.g. 1 when sampling.
            return_dict (`bool`, *optional*, defaults to `True`):
                Accepted for transformers' API; a [`DalleBartOutput`] is always returned.

        Returns:
            [`DalleBartOutput`]
        """
        self._check_inputs(input_ids, image_ids, cache)
        decoder_ids = image_ids
        if input_ids is not None:
            start = torch.full(
                (input_ids.shape[0], 1), self.config.decoder_start_token_id, dtype=torch.long, device=input_ids.device
            )  # (B, 1)
            decoder_ids = start if image_ids is None else torch.cat([start, image_ids], dim=1)  # (B, 1 + n)
        length = (0 if cache is None else cache.length) + decoder_ids.shape[1]
        if length > self.config.image_seq_len:
            raise ValueError(f"{length} decoder positions asked; the decoder has {self.config.image_seq_len}")
        keep_cache = use_cache or cache is not None
        if cache is None:  # without use_cache the cache only spans this call
            cache = DalleBartCache(
                self.config, decoder_ids.shape[0], device=decoder_ids.device, dtype=self.cache_dtype,
                max_length=None if use_cache else decoder_ids.shape[1],
            )  # fmt: skip
        encoder_states = None if input_ids is None else self.encode_text(input_ids, cache)
        x = self.decoder(decoder_ids, cache)  # (B, T, C)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return DalleBartOutput(
            logits=self.decoder.lm_head(x),
            cache=cache if keep_cache else None,
            last_hidden_state=x,
            encoder_last_hidden_state=encoder_states,
        )

    def decode_step(self, image_ids: torch.LongTensor, cache: DalleBartCache) -> torch.Tensor:
        r"""
        One sampling step: the logits of the codes sampling keeps, after one new code per row.

        What `image_logits(forward(image_ids=image_ids, cache=cache).logits[:, -1])` computes, without input
        validation (the caller owns the loop) and with only the head's rows that are sampled.

        Args:
            image_ids (`torch.LongTensor` of shape `(batch_size, 1)`):
                The code sampled for position `cache.length - 1`.
            cache (`DalleBartCache`):
                The cache after the prompt; filled in place and advanced by one position.

        Returns:
            `torch.Tensor` of shape `(batch_size, sampled_image_vocab_size)` in the model's compute dtype.
        """
        x = self.decode_step_hidden_state(image_ids, cache)  # (B, C)
        return F.linear(x, self.decoder.lm_head.weight[: self.config.sampled_image_vocab_size])  # (B, V_s)

    def decode_step_hidden_state(self, image_ids: torch.LongTensor, cache: DalleBartCache) -> torch.Tensor:
        """`decode_step` up to the head: the final LayerNorm's output (B, d_model) after one new code per row."""
        return self.decoder(image_ids, cache)[:, -1]

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The sampled slice of the head's logits: (..., image_vocab_size + 1) -> (..., sampled_image_vocab_size)."""
        return logits[..., : self.config.sampled_image_vocab_size]

    def image_log_probs(self, hidden_states: torch.Tensor) -> torch.DoubleTensor:
        r"""
        Log-probabilities of the next code over the codes sampling keeps, the head's projection and the softmax in
        float64 (as [`DalleForImageGeneration.image_log_probs`], so that scores and compression agree across the
        teacher-forced and cached paths).

        Args:
            hidden_states (`torch.Tensor` of shape `(..., d_model)`):
                `DalleBartOutput.last_hidden_state` or `decode_step_hidden_state`.

        Returns:
            `torch.DoubleTensor` of shape `(..., sampled_image_vocab_size)`.
        """
        weight = self.decoder.lm_head.weight[: self.config.sampled_image_vocab_size]
        return F.linear(hidden_states.double(), weight.double()).log_softmax(dim=-1)


__all__ = [
    "DalleBartCache",
    "DalleBartConfig",
    "DalleBartForImageGeneration",
    "DalleBartOutput",
    "DalleBartPreTrainedModel",
    "LayerNormNoScale",
]
