import pytest
import torch
import torch.nn.functional as F

from dalle_hf.configuration_dalle import DalleConfig
from dalle_hf.modeling_dalle import DalleForImageGeneration, DalleKVCache, attention_mask_for_layout

from .conftest import tiny_dalle_config


def batch(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 300, (B, 8), generator=g)
    text[:, 5:] = 0  # padding
    image = torch.randint(0, 32, (B, 16), generator=g)
    return text, image


def test_forward_shapes_and_loss_weighting(transformer):
    text, image = batch()
    out = transformer(input_ids=text, image_ids=image, return_loss=True)
    assert out.logits.shape == (2, 1 + 8 + 16, 300 + 8 + 32)
    assert out.cache is None
    # loss = (text + 7 * image) / 8, paper §2.2
    assert torch.allclose(out.loss, (out.text_loss + 7 * out.image_loss) / 8)
    # recompute both terms by hand from the logits
    logits = out.logits.float()
    targets_text = text.clone()
    targets_text[:, 5:] = 300 + torch.arange(5, 8)  # per-position padding ids
    text_loss = F.cross_entropy(logits[:, :8].reshape(-1, 340), targets_text.reshape(-1))
    image_loss = F.cross_entropy(logits[:, 8:24, 308:].reshape(-1, 32), image.reshape(-1))
    assert torch.allclose(out.text_loss, text_loss, atol=1e-5)
    assert torch.allclose(out.image_loss, image_loss, atol=1e-5)


def test_logits_mask(transformer):
    text, image = batch()
    logits = transformer(input_ids=text, image_ids=image).logits
    very_negative = torch.finfo(logits.dtype).min
    # positions 0..7 predict text tokens (BPE + padding), positions 8.. predict image codes
    assert (logits[:, :8, 308:] == very_negative).all()
    assert (logits[:, :8, :308] > very_negative).all()
    assert (logits[:, 8:, :308] == very_negative).all()
    assert (logits[:, 8:, 308:] > very_negative).all()


def test_per_position_padding_tokens(transformer):
    text = torch.zeros(1, 8, dtype=torch.long)
    remapped = transformer.remap_text_padding(text)
    assert remapped.tolist() == [[300 + i for i in range(8)]]
    # the model embeds position 5's padding with row 300 + 5: changing that row changes the output only when
    # position 5 is padding
    padded = torch.tensor([[5, 6, 1, 0, 0, 0, 0, 0]])
    unpadded = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 1]])
    before = [transformer(input_ids=t).logits for t in (padded, unpadded)]
    with torch.no_grad():
        transformer.text_embedding.weight[300 + 5] += 1.0
    after = [transformer(input_ids=t).logits for t in (padded, unpadded)]
    assert not torch.allclose(before[0][:, 6:], after[0][:, 6:])
    assert torch.equal(before[1], after[1])


@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"attention_types": ["row", "column"]},
        {"attention_types": ["conv", "full"]},
        {"text_self_attention": False},
        {"attention_types": ["conv", "full"], "text_self_attention": False},
    ],
)
def test_kv_cache_matches_full_recomputation(layout):
    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config(conv_kernel_size=3, **layout)).eval()
    text, image = batch()
    full = model(input_ids=text, image_ids=image).logits  # (B, 25, V)
    out = model(input_ids=text, image_ids=image[:, :3], use_cache=True)  # prefill text + 3 image tokens
    assert isinstance(out.cache, DalleKVCache) and out.cache.length == 12
    steps = [out.logits[:, -1]]
    for i in range(3, 16):
        out = model(image_ids=image[:, i : i + 1], cache=out.cache)
        steps.append(out.logits[:, -1])
    incremental = torch.stack(steps, dim=1)  # (B, 14, V)
    assert torch.allclose(model.image_logits(incremental), model.image_logits(full[:, 11:25]), atol=1e-5)


def decode_all(model, text, image, cache):
    """Prefill the text into `cache`, then feed the image one token per `decode_step`: (B, 16, V_i) logits."""
    model(input_ids=text, cache=cache)
    steps = [model.decode_step(image[:, i : i + 1], cache) for i in range(image.shape[1])]
    return torch.stack(steps, dim=1)


@torch.no_grad()
def test_kv_cache_grows_window_by_window_and_stays_exact():
    # Windows of 4 positions: the 25-position sequence crosses six window boundaries, each re-laying the buffers
    # out in place. Every step must still match full recomputation, and the views a step reads must be dense.
    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config(n_layer=3)).eval()
    text, image = batch(B=3)
    full = model.image_logits(model(input_ids=text, image_ids=image).logits[:, 9:25])  # (B, 16, V_i)
    cache = DalleKVCache(model.config, 3)
    cache.window_size = 4
    model(input_ids=text, cache=cache)
    assert cache.length == 9 and cache.capacity == 12
    steps = []
    for i in range(16):
        steps.append(model.decode_step(image[:, i : i + 1], cache))
        assert cache.capacity == cache.window(cache.length) and cache.keys.shape[-1] == cache.capacity
        assert cache.keys[1].is_contiguous() and cache.values[1].is_contiguous()
    # decode_step of image token i runs position 9 + i, the same logits as full[:, i]
    assert torch.allclose(torch.stack(steps, dim=1), full, atol=1e-5)
    big = DalleKVCache(model.config, 3)  # one window holds everything: no re-layout
    assert torch.allclose(decode_all(model, text, image, big), full, atol=1e-5)
    with pytest.raises(ValueError, match="holds 25 positions"):
        cache.reserve(26)


@torch.no_grad()
def test_kv_cache_reorder_keeps_the_selected_rows():
    torch.manual_seed(0)
    model = DalleForImageGeneration(tiny_dalle_config()).eval()
    text, image = batch(B=2)
    cache = DalleKVCache(model.config, 2)
    cache.window_size = 4
    model(input_ids=text, cache=cache)
    for i in range(5):
        model.decode_step(image[:, i : i + 1], cache)
    index = torch.tensor([1, 0, 1])
    cache.reorder(index)
    assert cache.batch_size == 3 and cache.keys.shape[1] == 3 and cache.length == 14
    rest = torch.stack([model.decode_step(image[index, i : i + 1], cache) for i in range(5, 16)], dim=1)
    fresh = decode_all(model, text[index], image[index], DalleKVCache(model.config, 3))[:, 5:]
    assert torch.allclose(rest, fresh, atol=1e-5)


def test_sparse_layouts_restrict_image_attention():
    config = tiny_dalle_config(n_layer=3, attention_types=["row", "column", "conv"], conv_kernel_size=3)
    positions = torch.arange(config.total_seq_len)
    text_end = 1 + config.text_seq_len
    q = text_end + 2 * 4 + 3  # image token at row 2, col 3
    row = attention_mask_for_layout("row", config, positions, config.total_seq_len)[q]
    col = attention_mask_for_layout("column", config, positions, config.total_seq_len)[q]
    conv = attention_mask_for_layout("conv", config, positions, config.total_seq_len)[q]
    for mask in (row, col, conv):
        assert mask[:text_end].all()  # all text, always
        assert not mask[q + 1 :].any()  # causal
    img = lambda m: m[text_end:].view(4, 4).int().tolist()  # noqa: E731
    assert img(row) == [[0] * 4, [0] * 4, [1, 1, 1, 1], [0] * 4]
    assert img(col) == [[0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1], [0] * 4]
    assert img(conv) == [[0] * 4, [0, 0, 1, 1], [0, 0, 1, 1], [0] * 4]


@torch.no_grad()
def test_text_self_attention_off_isolates_text_tokens():
    config = tiny_dalle_config(text_self_attention=False)
    text_end = 1 + config.text_seq_len
    positions = torch.arange(config.total_seq_len)
    mask = attention_mask_for_layout("full", config, positions, config.total_seq_len)
    assert mask[3, :text_end].tolist() == [True, False, False, True] + [False] * (text_end - 4)  # BOS and itself
    assert mask[text_end + 2, : text_end + 3].all()  # an image token still sees BOS, every word, earlier codes
    torch.manual_seed(0)
    isolated = DalleForImageGeneration(config).eval()
    causal = DalleForImageGeneration(tiny_dalle_config()).eval()
    causal.load_state_dict(isolated.state_dict())  # same weights: only the mask differs
    text, image = batch()
    changed = text.clone()
    changed[:, 0] = text[:, 0] % 200 + 3  # a different first word
    for model, text_moves in ((isolated, False), (causal, True)):
        before, after = model(input_ids=text, image_ids=image).logits, model(input_ids=changed, image_ids=image).logits
        # position 1 holds the first word; positions 2.. text_end - 1 hold later words and predict the next one
        assert torch.allclose(before[:, 2:text_end], after[:, 2:text_end]) != text_moves
        assert not torch.allclose(before[:, text_end:], after[:, text_end:])  # the image reads every word


def test_residual_init_is_scaled(transformer):
    std = transformer.h[0].attn.c_proj.weight.std().item()
    config = transformer.config
    assert std == pytest.approx(config.initializer_range / (2 * config.n_layer) ** 0.5, rel=0.2)


def test_save_load_round_trip(tmp_path, transformer):
    text, image = batch()
    transformer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded = DalleForImageGeneration.from_pretrained(tmp_path).eval()
    assert torch.equal(
        loaded(input_ids=text, image_ids=image).logits, transformer(input_ids=text, image_ids=image).logits
    )


def test_auto_classes(tmp_path, transformer):
    from transformers import AutoConfig, AutoModel

    import dalle_hf  # noqa: F401  (registers the auto classes)

    transformer.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DalleConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DalleForImageGeneration)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_embd=30, n_head=4), "multiple of n_head"),
        (dict(attention_types=["full"]), "one layout per layer"),
        (dict(attention_types=["full", "diagonal"]), "attention_types must be from"),
        (dict(conv_kernel_size=4), "odd"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_dalle_config(**kwargs)


def test_bad_inputs_raise(transformer):
    text, image = batch()
    with pytest.raises(ValueError, match="text_seq_len=8"):
        transformer(input_ids=text[:, :5])
    with pytest.raises(ValueError, match="dVAE codes"):
        transformer(input_ids=text, image_ids=image + 100)
    with pytest.raises(ValueError, match="input_ids"):
        transformer(image_ids=image)
    with pytest.raises(ValueError, match="total_seq_len"):
        transformer(input_ids=text, image_ids=torch.zeros(2, 17, dtype=torch.long))
