"""The DALL-E transformer (Ramesh et al. 2021, §2.2): a decoder-only model over [text tokens ; image tokens].

The sequence is `[BOS ; t_1 .. t_L ; i_1 .. i_N]`: `L = text_seq_len` BPE tokens (padding replaced by a learned
token per position) followed by `N = image_grid_size ** 2` dVAE codes in raster order. Logits at position `j`
predict the token at position `j + 1`; a logits mask keeps text positions on text tokens and image positions
on image tokens. The layout follows nanoGPT (`Block(config)`, fused qkv, scaled residual init) with
min-dalle's preallocated key/value cache for sampling.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_dalle import DalleConfig
from .quantization import unpack_bnb_4bit_cpu_weights


class DalleKVCache:
    """Preallocated keys and values for incremental decoding (as in min-dalle).

    Holds values as `(n_layer, B, n_head, capacity, head_dim)` and keys transposed, `(n_layer, B, n_head, head_dim,
    capacity)`, as views of two buffers allocated once for `max_length` positions; each forward writes its new
    positions in place. A one-token step computes `q @ K^T` and `att @ V` over the first `capacity` positions
    (masked past the new token; see `DalleAttention.attend_one`), so the layout is chosen for those two matmuls:

    - keys are stored transposed: with `K^T` contiguous along positions the CPU kernels stream it, about 2x faster
      in bf16 than reading a transposed view;
    - `capacity` is the filled length rounded up to a multiple of `window_size` (32), and the views are laid out
      for exactly that many positions, so a layer's keys and values are contiguous tensors. Slicing a
      `max_length` layout to the window instead made every step copy the window first (bf16 matmuls need dense
      inputs): 2-3x the cost of the attention (docs/performance.md). Crossing a window boundary re-lays the
      buffers out in place, once per 32 tokens, with one layer's worth of scratch memory.

    Args:
        config (`DalleConfig`): the model's config (layer count, heads, width, maximum length).
        batch_size (`int`): rows in the batch (with guidance: twice the number of samples).
        device, dtype: where and how to store; use the model's.
        max_length (`int`, *optional*): positions to reserve, defaults to `config.total_seq_len`.
    """

    window_size = 32  # a sampling step reads keys in multiples of this many positions (see `window`)

    def __init__(self, config: DalleConfig, batch_size: int, device=None, dtype=None, max_length: int | None = None):
        self.max_length = max_length or config.total_seq_len
        self._allocate(config.n_layer, batch_size, config.n_head, config.n_embd // config.n_head, device, dtype)
        self.length = 0  # positions filled so far; advanced by the model after all layers have written

    def _allocate(self, n_layer, batch_size, n_head, head_dim, device, dtype, capacity: int = 0):
        self._dims = (n_layer, batch_size, n_head, head_dim)
        numel = n_layer * batch_size * n_head * head_dim * self.max_length
        self._key_buffer = torch.zeros(numel, device=device, dtype=dtype)
        self._value_buffer = torch.zeros(numel, device=device, dtype=dtype)
        self.keys, self.values = self._views(capacity)

    def _views(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffers laid out for `capacity` positions: keys (L, B, nh, hs, capacity),
        values (L, B, nh, capacity, hs)."""
        L, B, nh, hs = self._dims
        numel = L * B * nh * hs * capacity
        keys = self._key_buffer[:numel].view(L, B, nh, hs, capacity)
        values = self._value_buffer[:numel].view(L, B, nh, capacity, hs)
        return keys, values

    @property
    def batch_size(self) -> int:
        return self._dims[1]

    @property
    def capacity(self) -> int:
        """Positions the current views are laid out for (a multiple of `window_size`, or `max_length`)."""
        return self.keys.shape[-1]

    def reserve(self, end: int) -> None:
        """Make room for positions `[0, end)`: grow `capacity` to `window(end)`, keeping the filled positions."""
        if end <= self.capacity:
            return
        if end > self.max_length:
            raise ValueError(f"the KV cache holds {self.max_length} positions, asked to write up to {end}")
        capacity = self.window(end)
        old_keys, old_values = self.keys, self.values
        self.keys, self.values = self._views(capacity)
        n = min(self.length, old_keys.shape[-1])  # positions to keep
        # In place: every (layer, row, head) block moves to a higher offset, so moving layers from the last to
        # the first only overwrites what was already moved, except inside the layer at hand; clone that one.
        for layer in reversed(range(self._dims[0])):
            kept_keys = old_keys[layer, ..., :n].clone()
            kept_values = old_values[layer, :, :, :n].clone()
            self.keys[layer, ..., n:] = 0  # unfilled positions: masked, but must be finite (0 * nan is nan)
            self.values[layer, :, :, n:] = 0
            self.keys[layer, ..., :n] = kept_keys
            self.values[layer, :, :, :n] = kept_values

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k, v` of shape (B, nh, T, hs) after the cached positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.reserve(end)  # the first layer to write grows every layer's views
        self.keys[layer_idx, ..., self.length : end] = k.transpose(-2, -1)
        self.values[layer_idx, :, :, self.length : end] = v
        return self.keys[layer_idx, ..., :end].transpose(-2, -1), self.values[layer_idx, :, :, :end]

    def window(self, end: int) -> int:
        """Positions a one-token step reads to see `[0, end)`: `end` rounded up to a multiple of `window_size`."""
        return min(self.max_length, -(-end // self.window_size) * self.window_size)

    def reorder(self, index: torch.LongTensor) -> "DalleKVCache":
        """Keep and reorder batch rows in place (`index` of shape (B',))."""
        keys, values = self.keys.index_select(1, index), self.values.index_select(1, index)
        L, _, nh, hs = self._dims
        self._allocate(L, len(index), nh, hs, keys.device, keys.dtype, capacity=self.capacity)
        self.keys.copy_(keys)
        self.values.copy_(values)
        return self


@dataclass
class DalleOutput(ModelOutput):
    """Output of [`DalleForImageGeneration`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned with `return_loss=True`):
            `(text_loss + w * image_loss) / (1 + w)` with `w = config.image_loss_weight` (paper: 7).
        text_loss, image_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean cross-entropy over text / image targets.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
            Next-token logits over the joint vocabulary `[text ; per-position padding ; image]`, masked so text
            positions only score text tokens and image positions only image tokens.
        cache (`DalleKVCache`, *optional*, returned with `use_cache=True`):
            The filled KV cache. Named `cache` as in transformers >= 5.24 (earlier: `past_key_values`).
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, n_embd)`):
            The final LayerNorm's output at the positions `logits` covers: what `image_log_probs` projects in
            float64 for likelihoods and compression (docs/likelihood.md).
    """

    loss: torch.FloatTensor | None = None
    text_loss: torch.FloatTensor | None = None
    image_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: DalleKVCache | None = None
    last_hidden_state: torch.FloatTensor | None = None


def attention_mask_for_layout(
    attention_type: str, config: DalleConfig, query_positions: torch.Tensor, key_length: int
) -> torch.Tensor:
    """Boolean mask (T, S), True where attention is allowed.

    Positions index `[BOS ; text ; image]`. Every layout is causal and lets image tokens see all text tokens
    (paper §B.1); the sparse ones restrict image-to-image attention, and `config.text_self_attention=False`
    text-to-text attention.
    """
    q = query_positions[:, None]  # (T, 1)
    k = torch.arange(key_length, device=query_positions.device)[None, :]  # (1, S)
    causal = k <= q
    text_end = 1 + config.text_seq_len  # BOS and text occupy positions [0, text_end)
    if not config.text_self_attention:  # a text token sees BOS and itself only
        causal = causal & ~((q >= 1) & (q < text_end) & (k >= 1) & (k != q))
    if attention_type == "full":
        return causal
    g = config.image_grid_size
    q_img, k_img = (q - text_end).clamp(min=0), (k - text_end).clamp(min=0)
    q_row, q_col, k_row, k_col = q_img // g, q_img % g, k_img // g, k_img % g
    if attention_type == "row":
        near = q_row == k_row
    elif attention_type == "column":
        near = q_col == k_col
    else:  # "conv": a causal kernel x kernel neighbourhood
        r = config.conv_kernel_size // 2
        near = ((q_row - k_row).abs() <= r) & ((q_col - k_col).abs() <= r)
    allowed = (k < text_end) | (q < text_end) | near | (k == q)
    return causal & allowed


class DalleAttention(nn.Module):
    def __init__(self, config: DalleConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.attention_type = config.attention_types[layer_idx]
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DalleKVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        if cache is not None and cache.keys.dtype != q.dtype:  # a cache made by the caller in another dtype
            q, k, v = q.float(), k.float(), v.float()
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is not None and T == 1 and dropout_p == 0.0:
            y = self.attend_one(q, k, v, cache)  # a sampling step
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, nh, S, hs), S = cached + T
            S = k.shape[2]
            if self.attention_type == "full" and S == T and self.config.text_self_attention:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
            else:
                mask = attention_mask_for_layout(self.attention_type, self.config, positions, S)  # (T, S)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def attend_one(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: DalleKVCache) -> torch.Tensor:
        """Attention of one new token (B, nh, 1, hs) to the cache, with two small matmuls: CPU SDPA kernels are
        tuned for long queries and are several times slower for one (in bf16 over 10x). The keys are read in
        windows of `cache.window_size` positions, masked past the new token, so the matmul shapes repeat: CPU
        kernels are set up per shape, which costs more than the matmul when the shape changes every token."""
        position = cache.length  # of the new token
        cache.update(self.layer_idx, k, v)
        keys_t = cache.keys[self.layer_idx]  # (B, nh, hs, W), stored transposed; W = cache.capacity
        values = cache.values[self.layer_idx]  # (B, nh, W, hs); both contiguous
        W = keys_t.shape[-1]
        att = (q * (1.0 / math.sqrt(q.shape[-1]))) @ keys_t  # (B, nh, 1, W)
        att = att.masked_fill_(self.blocked_positions(q.device)[position, :W], float("-inf"))
        # Softmax in fp32 whatever the cache dtype (it is B x nh x W numbers, no cost): bf16 probabilities would
        # carry 3 significant digits into the weighted sum.
        return att.softmax(dim=-1, dtype=torch.float32).to(values.dtype) @ values  # (B, nh, 1, hs)

    def blocked_positions(self, device) -> torch.Tensor:
        """(total_seq_len, total_seq_len) bool, True where a query may not attend: the layout's mask, inverted,
        built once per device (1 MB at 32 x 32 image tokens)."""
        table = getattr(self, "_blocked", None)
        if table is None or table.device != device:
            positions = torch.arange(self.config.total_seq_len, device=device)
            table = ~attention_mask_for_layout(self.attention_type, self.config, positions, len(positions))
            self._blocked = table
        return table


class DalleMLP(nn.Module):
    def __init__(self, config: DalleConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class DalleBlock(nn.Module):
    """A pre-LayerNorm transformer block (GPT-2; the paper's blocks are pre-norm too, §B.1)."""

    def __init__(self, config: DalleConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = DalleAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = DalleMLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DalleKVCache | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), positions, cache)
        return x + self.mlp(self.ln_2(x))


class DallePreTrainedModel(PreTrainedModel):
    config_class = DalleConfig
    config: DalleConfig
    base_model_prefix = "dalle"
    main_input_name = "input_ids"
    _no_split_modules = ["DalleBlock"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # GPT-2's scaled init of the two residual projections per block: std / sqrt(2 * n_layer).
        # Checked on the Linear itself: modules are initialized parent-first, so a parent's init would be undone.
        if isinstance(module, nn.Linear) and getattr(module, "is_residual_projection", False):
            init.normal_(
                module.weight, mean=0.0, std=self.config.initializer_range / math.sqrt(2 * self.config.n_layer)
            )
        if isinstance(module, DalleForImageGeneration):
            init.normal_(module.bos_embedding, mean=0.0, std=self.config.initializer_range)


class DalleForImageGeneration(DallePreTrainedModel):
    r"""
    The DALL-E transformer: text and image token embeddings, learned text positions and row + column image
    positions (paper §B.1), pre-LayerNorm blocks, and one head over the joint vocabulary.

    Joint vocabulary (`config`-derived): ids `[0, V_t)` are BPE tokens, `[V_t, V_t + L)` the per-position padding
    tokens, `[V_t + L, V_t + L + V_i)` the image codes (`image_token_offset = V_t + L`).

    Example:

    ```python
    >>> import torch
    >>> from dalle_hf import DalleConfig, DalleForImageGeneration
    >>> config = DalleConfig(text_vocab_size=300, text_seq_len=8, image_vocab_size=32, image_grid_size=4,
    ...                      n_layer=2, n_head=2, n_embd=32)
    >>> model = DalleForImageGeneration(config)
    >>> text = torch.randint(0, 300, (2, 8)); image = torch.randint(0, 32, (2, 16))
    >>> out = model(input_ids=text, image_ids=image, return_loss=True)
    >>> out.logits.shape
    torch.Size([2, 25, 364])
    ```
    """

    def __init__(self, config: DalleConfig):
        super().__init__(config)
        # Per-position padding tokens live after the BPE vocabulary (paper §2.2).
        self.text_embedding = nn.Embedding(config.text_vocab_size + config.text_seq_len, config.n_embd)
        self.image_embedding = nn.Embedding(config.image_vocab_size, config.n_embd)
        self.bos_embedding = nn.Parameter(torch.zeros(config.n_embd))
        self.text_position_embedding = nn.Embedding(1 + config.text_seq_len, config.n_embd)  # BOS + text
        self.image_row_embedding = nn.Embedding(config.image_grid_size, config.n_embd)
        self.image_column_embedding = nn.Embedding(config.image_grid_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([DalleBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.n_embd, self.vocab_size, bias=False)
        # bitsandbytes 4-bit on CPU: make a checkpoint saved after a forward reload right (see the function).
        self.register_state_dict_pre_hook(unpack_bnb_4bit_cpu_weights)
        self.post_init()

    @property
    def image_token_offset(self) -> int:
        """First image-code id in the joint vocabulary."""
        return self.config.text_vocab_size + self.config.text_seq_len

    @property
    def cache_dtype(self) -> torch.dtype:
        """dtype of a new `DalleKVCache`: the compute dtype. (With keys stored transposed a bf16 cache is also the
        fastest on CPU: a sampling step streams the cache from memory, and bf16 reads half the bytes;
        docs/performance.md.)"""
        return self.bos_embedding.dtype

    @property
    def vocab_size(self) -> int:
        return self.image_token_offset + self.config.image_vocab_size

    def remap_text_padding(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """Replace padding ids by the padding token of their position: (B, L) -> (B, L)."""
        L = input_ids.shape[1]
        per_position = self.config.text_vocab_size + torch.arange(L, device=input_ids.device)  # (L,)
        return torch.where(input_ids == self.config.pad_token_id, per_position, input_ids)

    def _check_inputs(self, input_ids, image_ids, cache):
        config = self.config
        if input_ids is not None:
            if input_ids.dim() != 2 or input_ids.shape[1] != config.text_seq_len:
                raise ValueError(
                    f"input_ids must be (batch, text_seq_len={config.text_seq_len}), got {tuple(input_ids.shape)}"
                )
            if cache is not None and cache.length > 0:
                raise ValueError("input_ids (text) can only be given at the start, with an empty cache")
            if input_ids.min() < 0 or input_ids.max() >= config.text_vocab_size:
                raise ValueError(f"input_ids must be text token ids in [0, {config.text_vocab_size})")
        elif cache is None or cache.length == 0:
            raise ValueError("input_ids (text) are required unless continuing from cache")
        if image_ids is not None:
            if image_ids.dim() != 2:
                raise ValueError(f"image_ids must be (batch, num_image_tokens), got {tuple(image_ids.shape)}")
            if image_ids.numel() and (image_ids.min() < 0 or image_ids.max() >= config.image_vocab_size):
                raise ValueError(f"image_ids must be dVAE codes in [0, {config.image_vocab_size})")

    def embed(self, input_ids, image_ids, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token + position embeddings of the new positions; returns (x (B, T, C), positions (T,))."""
        parts = []
        device = self.bos_embedding.device
        if input_ids is not None:
            B = input_ids.shape[0]
            text = self.text_embedding(self.remap_text_padding(input_ids))  # (B, L, C)
            bos = self.bos_embedding.expand(B, 1, -1)  # (B, 1, C)
            tokens = torch.cat([bos, text], dim=1)  # (B, 1 + L, C)
            parts.append(tokens + self.text_position_embedding.weight[None])
        if image_ids is not None and image_ids.shape[1] > 0:
            text_end = 1 + self.config.text_seq_len
            first = max(start, text_end) - text_end  # index of the first new image token
            idx = torch.arange(first, first + image_ids.shape[1], device=device)  # (T_img,)
            g = self.config.image_grid_size
            pos = self.image_row_embedding(idx // g) + self.image_column_embedding(idx % g)  # (T_img, C)
            parts.append(self.image_embedding(image_ids) + pos[None])
        x = torch.cat(parts, dim=1)
        positions = torch.arange(start, start + x.shape[1], device=device)
        return x, positions

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        image_ids: torch.LongTensor | None = None,
        cache: DalleKVCache | None = None,
        use_cache: bool = False,
        return_loss: bool = False,
        logits_to_keep: int = 0,
        return_dict: bool = True,
    ) -> DalleOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, text_seq_len)`, *optional*):
                Tokenized captions padded with `config.pad_token_id`. Required on the first call.
            image_ids (`torch.LongTensor` of shape `(batch_size, n)`, *optional*):
                dVAE codes in raster order (`0 <= n <= image_seq_len`): the whole image for training, a prefix for
                variations, or one new token per step when continuing from `cache`.
            cache (`DalleKVCache`, *optional*):
                A cache to continue from; it is filled in place and returned.
            use_cache (`bool`, *optional*, defaults to `False`):
                Allocate a `DalleKVCache` when none is given, and return it.
            return_loss (`bool`, *optional*, defaults to `False`):
                Compute the next-token loss on the given text and image tokens (weighted text:image 1:7).
            logits_to_keep (`int`, *optional*, defaults to 0):
                Return logits for only the last `logits_to_keep` positions (0: all), e.g. 1 when sampling.
        """
        self._check_inputs(input_ids, image_ids, cache)
        if use_cache and cache is None:
            batch = (input_ids if input_ids is not None else image_ids).shape[0]
            cache = DalleKVCache(self.config, batch, device=self.bos_embedding.device, dtype=self.cache_dtype)
        start = cache.length if cache is not None else 0
        if (
            start
            + (0 if input_ids is None else 1 + input_ids.shape[1])
            + (0 if image_ids is None else image_ids.shape[1])
            > self.config.total_seq_len
        ):
            raise ValueError(f"the sequence is longer than config.total_seq_len={self.config.total_seq_len}")

        x, positions = self.embed(input_ids, image_ids, start)  # (B, T, C), (T,)
        x = self.drop(x)
        for block in self.h:
            x = block(x, positions, cache)
        x = self.ln_f(x)
        if cache is not None:
            cache.length += x.shape[1]

        if logits_to_keep:
            x, positions = x[:, -logits_to_keep:], positions[-logits_to_keep:]
        logits = self.mask_logits(self.lm_head(x), positions)  # (B, T', V)
        loss = text_loss = image_loss = None
        if return_loss:
            if logits_to_keep:
                raise ValueError("return_loss=True needs the logits of every position (logits_to_keep=0)")
            loss, text_loss, image_loss = self.loss(logits, input_ids, image_ids)
        return DalleOutput(
            loss=loss,
            text_loss=text_loss,
            image_loss=image_loss,
            logits=logits,
            cache=cache if use_cache or cache is not None else None,
            last_hidden_state=x,
        )

    def decode_step(self, image_ids: torch.LongTensor, cache: DalleKVCache) -> torch.Tensor:
        r"""
        One sampling step: the image-code logits that follow one new image token per row.

        Computes what `image_logits(forward(image_ids=image_ids, cache=cache,
        logits_to_keep=1).logits[:, -1])` does, minus the per-call work that costs more than the matmuls at
        sampling batch sizes: no input validation (the caller owns the loop), no logits over the text
        vocabulary and no logits mask (an image position only scores image codes).

        Args:
            image_ids (`torch.LongTensor` of shape `(batch_size, 1)`):
                The dVAE code sampled at position `cache.length`, an image position.
            cache (`DalleKVCache`):
                The cache after the prefill; filled in place and advanced by one position.

        Returns:
            `torch.Tensor` of shape `(batch_size, image_vocab_size)` in the model's compute dtype.
        """
        x = self.decode_step_hidden_state(image_ids, cache)  # (B, C)
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            return F.linear(x, head.weight[self.image_token_offset :])  # (B, V_i): only the image rows of the head
        return self.image_logits(head(x))  # a quantized head: compute all, keep the image slice

    def decode_step_hidden_state(self, image_ids: torch.LongTensor, cache: DalleKVCache) -> torch.Tensor:
        """`decode_step` up to the head: the final LayerNorm's output (B, C) after one new image token per row."""
        start = cache.length
        i = start - 1 - self.config.text_seq_len  # raster index of this image token
        g = self.config.image_grid_size
        pos = self.image_row_embedding.weight[i // g] + self.image_column_embedding.weight[i % g]  # (C,)
        x = self.image_embedding(image_ids) + pos  # (B, 1, C)
        positions = torch.arange(start, start + 1, device=x.device)  # (1,)
        for block in self.h:
            x = block(x, positions, cache)
        cache.length += 1
        return self.ln_f(x[:, -1])  # (B, C)

    def image_log_probs(self, hidden_states: torch.Tensor) -> torch.DoubleTensor:
        r"""
        Log-probabilities of the next image code, with the head's projection and the softmax in float64.

        Float32 probabilities of one model differ by about 1e-6 between a teacher-forced pass and KV-cached steps,
        and between thread counts; an arithmetic decoder that sees the other side's numbers decodes wrong codes.
        In float64 those paths agreed (docs/likelihood.md). A quantized head is applied as it is, then cast.

        Args:
            hidden_states (`torch.Tensor` of shape `(..., n_embd)`):
                Outputs of the final LayerNorm (`DalleOutput.last_hidden_state`, `decode_step_hidden_state`) at
                positions that predict an image code.

        Returns:
            `torch.DoubleTensor` of shape `(..., image_vocab_size)`: log-softmax over the image codes.
        """
        head = self.lm_head
        if type(head) is nn.Linear and head.bias is None:
            logits = F.linear(hidden_states.double(), head.weight[self.image_token_offset :].double())  # (..., V_i)
        else:
            logits = self.image_logits(head(hidden_states)).double()
        return logits.log_softmax(dim=-1)

    def mask_logits(self, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits mask (paper; DALLE-pytorch's `logits_mask`): position `j` predicts token `j + 1`, so positions
        before the last text token score only text (and padding) tokens, the rest only image codes."""
        predicts_text = (positions < self.config.text_seq_len)[:, None]  # (T, 1)
        is_text_token = (
            torch.arange(self.vocab_size, device=logits.device) < self.image_token_offset
        )[None, :]  # (1, V)
        allowed = predicts_text == is_text_token  # (T, V)
        return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)

    def loss(self, logits, input_ids, image_ids):
        """(text_loss + w * image_loss) / (1 + w): text positions [0, L) predict the (remapped) text tokens,
        positions [L, L + n) predict the image codes."""
        if input_ids is None or image_ids is None:
            raise ValueError("return_loss=True needs both input_ids and image_ids, from an empty cache")
        L, n = self.config.text_seq_len, image_ids.shape[1]
        logits = logits.float()
        text_targets = self.remap_text_padding(input_ids)  # (B, L)
        text_loss = F.cross_entropy(logits[:, :L].reshape(-1, self.vocab_size), text_targets.reshape(-1))
        image_logits = logits[:, L : L + n, self.image_token_offset :]  # (B, n, V_i)
        image_loss = F.cross_entropy(image_logits.reshape(-1, self.config.image_vocab_size), image_ids.reshape(-1))
        w = self.config.image_loss_weight
        return (text_loss + w * image_loss) / (1 + w), text_loss, image_loss

    def image_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The image-code slice of joint-vocabulary logits: (..., V) -> (..., image_vocab_size)."""
        return logits[..., self.image_token_offset :]


__all__ = ["DalleConfig", "DalleForImageGeneration", "DalleKVCache", "DalleOutput", "DallePreTrainedModel"]
