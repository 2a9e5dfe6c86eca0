"""Lossless compression of dVAE code grids under the DALL-E transformer: its cross-entropy, made into a file.

The transformer's loss on an image's tokens is the length in bits of the best code for them under the model
(Shannon); a range coder gets within a few bits of it. Compressing an image: its dVAE codes, range-coded under the
transformer's next-code distribution given a caption. Decompressing: the identical code grid, then its dVAE
reconstruction. **Lossless for the codes, lossy for the pixels**: the dVAE round trip is the only loss. A DALL·E
mini / Mega pipeline ([`DalleMiniPipeline`]) works the same way: its VQGAN's codes, 16 x 16 of 16384, coded under
the BART decoder given the caption (the file's fingerprint tells the two models, or any two weights, apart).

The coder is `constriction`'s range coder (`stream.queue.RangeEncoder` with `stream.model.Categorical(perfect=False)`;
`perfect=False` is the fast quantizer, the default in 0.5.0 is the slow exact one). Both sides must see bit-identical
probabilities, so they share one probability function, `NextCodeDistribution`: batch 1, KV-cached steps, a pinned
thread count, autocast off, the head's projection and softmax in float64 (docs/likelihood.md says why each).

The file (little-endian):

| bytes | field |
|---|---|
| 4 | magic `b"DHFC"` |
| 1 | format version (1) |
| 1 | flags: bit 0 set = the payload is the raw codes, `ceil(log2(codebook))` bits each (coding would not save bytes) |
| 16 | fingerprint: SHA-256 of the transformer, dVAE and tokenizer, truncated (`model_fingerprint`) |
| 2 | grid size `g` (the grid holds `g * g` codes) |
| 4 | CRC-32 of the codes (uint16 each, raster order) |
| 2 + n | the caption, UTF-8, after its byte count |
| rest | the payload: the range coder's big-endian words cut to the shortest prefix that decodes, or the raw codes |
| 4 | CRC-32 of every byte before it (a changed or truncated byte is reported as such) |

Example:

```python
>>> from dalle_hf import DallePipeline
>>> from dalle_hf.compression import compress_image, decompress
>>> pipe = DallePipeline.from_pretrained("checkpoints/dalle-shapes")
>>> data = compress_image(pipe, "circle.png", "a red circle")
>>> codes, image = decompress(pipe, data)
```
"""

import contextlib
import hashlib
import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

MAGIC = b"DHFC"
FORMAT_VERSION = 1
FLAG_RAW = 1  # the payload holds the codes bit-packed, not range-coded
FINGERPRINT_BYTES = 16  # 128 bits of SHA-256: two different models never collide in practice
CODING_THREADS = 1  # a batch-1 step of a small model gains nothing from threads, and a pinned count pins the sums
_HEADER = struct.Struct("<4sBB16sHI")  # magic, version, flags, fingerprint, grid size, CRC-32 of the codes
_CAPTION_LENGTH = struct.Struct("<H")
_TRAILER = struct.Struct("<I")


class CompressionError(ValueError):
    """A compressed file that cannot be decoded exactly: corrupted, of another format, or made with another model."""


@contextlib.contextmanager
def pinned_num_threads(num_threads: int):
    """Run the block with `torch.set_num_threads(num_threads)`, then restore the previous count.

    A different thread count can split a reduction differently, and change a float32 sum in its last bits.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _coding_context(device: torch.device) -> contextlib.ExitStack:
    """No autograd, no autocast, `CODING_THREADS` threads: the conditions both sides compute probabilities under."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(torch.autocast(device_type=device.type, enabled=False))
    stack.enter_context(pinned_num_threads(CODING_THREADS))
    return stack


def _hash_tensors(digest, prefix: str, state_dict: dict) -> None:
    for name, value in sorted(state_dict.items()):
        if isinstance(value, (tuple, list)):  # torch.ao's packed (weight, bias) of a dynamically quantized Linear
            _hash_tensors(digest, f"{prefix}{name}.", {str(i): v for i, v in enumerate(value)})
            continue
        if not isinstance(value, torch.Tensor):
            continue  # other metadata (a dtype, a scheme name); the weights are tensors
        tensor = value.detach().cpu()
        if tensor.is_quantized:
            tensor = tensor.dequantize()  # the values, scales included (int_repr alone ignores a scale change)
        digest.update(f"{prefix}{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def _tokenizer_description(tokenizer) -> str:
    """The tokenizer's model, normalizer and pre-tokenizer as JSON, without the padding and truncation settings that
    tokenizing with `padding=...` / `truncation=...` changes in place."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return repr(sorted(tokenizer.get_vocab().items()))
    description = json.loads(backend.to_str())
    description.pop("padding", None)
    description.pop("truncation", None)
    return json.dumps(description, sort_keys=True)


def model_fingerprint(pipe) -> bytes:
    """`FINGERPRINT_BYTES` of SHA-256 over the transformer's and dVAE's weights (names, dtypes, shapes, bytes) and
    the tokenizer's vocabulary and merges. The same checkpoint loaded in another dtype is another model here: its
    probabilities differ."""
    digest = hashlib.sha256(b"dalle-hf compression fingerprint 1;")
    _hash_tensors(digest, "transformer.", pipe.transformer.state_dict())
    _hash_tensors(digest, "vae.", pipe.vae.state_dict())
    digest.update(_tokenizer_description(pipe.tokenizer).encode())
    return digest.digest()[:FINGERPRINT_BYTES]


class NextCodeDistribution:
    r"""
    The one probability function of the coder: the transformer's distribution over the next image code, as float64
    probabilities, computed the same way when compressing and when decompressing.

    Batch 1 (a row's numbers never depend on its neighbours), a prefill of the text then one KV-cached
    `decode_step_hidden_state` per code (the decoder knows only the codes before), and the head's projection and
    softmax in float64 (`DalleForImageGeneration.image_log_probs`). Use it inside `_coding_context`.

    Args:
        transformer ([`DalleForImageGeneration`]): the model.
        input_ids (`torch.LongTensor` of shape `(1, text_seq_len)`): the caption's ids.
    """

    def __init__(self, transformer, input_ids: torch.LongTensor):
        self.transformer = transformer
        out = transformer(input_ids=input_ids, use_cache=True, logits_to_keep=1)
        self.cache = out.cache
        self.hidden = out.last_hidden_state[:, -1]  # (1, C): the last text position predicts the first code
        self.device = input_ids.device

    def probabilities(self) -> np.ndarray:
        """float64 (V,) probabilities of the next code, V the codes the model predicts (its `image_log_probs`
        width: the dVAE's codebook, or the 16384 VQGAN codes of DALL·E mini / Mega)."""
        return self.transformer.image_log_probs(self.hidden)[0].exp().cpu().numpy()

    def advance(self, code: int) -> None:
        """Feed the code just coded."""
        ids = torch.tensor([[code]], dtype=torch.long, device=self.device)  # (1, 1)
        self.hidden = self.transformer.decode_step_hidden_state(ids, self.cache)  # (1, C)

    def along(self, codes: np.ndarray) -> np.ndarray:
        """(N, V) float64: the distribution before each of the (N,) `codes`, fed one by one."""
        rows = []
        for i, code in enumerate(codes.tolist()):
            rows.append(self.probabilities())
            if i + 1 < len(codes):
                self.advance(code)
        return np.stack(rows)  # (N, V)


def _categorical(probabilities: np.ndarray):
    import constriction  # its submodules live in a Rust extension: reach them as attributes

    # perfect=False: the fast quantizer (0.5.0 defaults to the exact one, ~200x slower); both sides use the same.
    return constriction.stream.model.Categorical(probabilities, perfect=False)


def _range_decoder(payload: bytes):
    """A range decoder over big-endian 32-bit words; a payload cut inside a word is padded with zero bytes."""
    import constriction

    padded = payload + b"\0" * (-len(payload) % 4)
    return constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype=">u4").astype(np.uint32))


def _decodes_to(payload: bytes, codes: np.ndarray, probabilities: np.ndarray) -> bool:
    decoder = _range_decoder(payload)
    try:
        return all(decoder.decode(_categorical(p)) == code for p, code in zip(probabilities, codes.tolist()))
    except Exception:  # constriction refuses some cut payloads; those are simply not short enough
        return False


def shortest_payload(words: bytes, codes: np.ndarray, probabilities: np.ndarray) -> bytes:
    """The shortest byte string that decodes to `codes` under the recorded `probabilities` (N, V).

    The range coder writes whole 32-bit words and seals the message with more than it needs: up to about 40 bits
    over the model's cross-entropy, a third of a typical shapes image's 100. Read big-endian, the words are the
    digits of one number inside the final coding interval; a shorter prefix, padded with zeros, or that prefix plus
    one in its last byte (rounding up instead of down), usually lands in the interval too. Tried from a little under
    the cross-entropy upwards, with the same quantized distributions the decoder will use, so it costs a few
    model-free decodes; `compress_codes` then checks the result with the transformer itself.
    """
    cross_entropy_bits = -np.log2(probabilities[np.arange(len(codes)), codes]).sum()
    for length in range(max(0, int(cross_entropy_bits) // 8 - 2), len(words)):
        prefix = words[:length]
        candidates = [prefix]
        rounded_up = int.from_bytes(prefix, "big") + 1
        if length and rounded_up < 256**length:
            candidates.append(rounded_up.to_bytes(length, "big"))
        for candidate in candidates:
            if _decodes_to(candidate, codes, probabilities):
                return candidate
    return words


def codes_crc32(codes: np.ndarray) -> int:
    """CRC-32 of (N,) codes written as little-endian uint16."""
    return zlib.crc32(np.asarray(codes, dtype="<u2").tobytes())


def raw_bits_per_code(vocab_size: int) -> int:
    """Bits a code needs without a model: `ceil(log2(vocab_size))` (9 for 512 codes)."""
    return max(1, math.ceil(math.log2(vocab_size)))


def pack_raw(codes: np.ndarray, bits: int) -> bytes:
    """(N,) codes -> `ceil(N * bits / 8)` bytes, each code big-endian in `bits` bits."""
    shifts = np.arange(bits - 1, -1, -1)
    bit_array = (np.asarray(codes, dtype=np.int64)[:, None] >> shifts) & 1  # (N, bits)
    return np.packbits(bit_array.astype(np.uint8).reshape(-1)).tobytes()


def unpack_raw(payload: bytes, n: int, bits: int) -> np.ndarray:
    """Inverse of `pack_raw`: (n,) int64 codes."""
    if len(payload) != math.ceil(n * bits / 8):
        raise CompressionError(f"raw payload of {len(payload)} bytes, expected {math.ceil(n * bits / 8)} for {n} codes")
    bit_array = np.unpackbits(np.frombuffer(payload, dtype=np.uint8))[: n * bits].reshape(n, bits).astype(np.int64)
    return (bit_array << np.arange(bits - 1, -1, -1)).sum(axis=1)


@dataclass
class CompressedHeader:
    """The fields of a compressed file before its payload (see the module docstring)."""

    version: int
    flags: int
    fingerprint: bytes
    grid_size: int
    codes_crc32: int
    caption: str


@dataclass
class DecompressedImage:
    """What [`decompress`] returns: the exact codes, their dVAE reconstruction and the stored caption.

    Args:
        image_tokens (`torch.LongTensor` of shape `(grid, grid)`): the codes, identical to the compressed ones.
        image (`PIL.Image.Image`): their dVAE reconstruction (lossy with respect to the original pixels).
        caption (`str`): the caption the codes were coded under.
    """

    image_tokens: torch.LongTensor
    image: PIL.Image.Image
    caption: str

    def __iter__(self):  # `codes, image = decompress(pipe, data)`
        return iter((self.image_tokens, self.image))


class LikelihoodCoder:
    r"""
    Compresses and decompresses dVAE code grids under one pipeline's transformer. Computes the pipeline's fingerprint
    once: reuse one coder for many images (`compress_image` / `decompress` build one per call).

    Args:
        pipe ([`DallePipeline`]): tokenizer, transformer and dVAE; the same weights must decompress.
    """

    def __init__(self, pipe):
        self.pipe = pipe
        self.fingerprint = model_fingerprint(pipe)
        config = pipe.transformer.config
        self.grid_size, self.vocab_size = config.image_grid_size, pipe.codebook_size
        self.raw_bits = raw_bits_per_code(self.vocab_size)

    # ------------------------------------------------------------------------------------------------------------
    def _input_ids(self, caption: str) -> torch.LongTensor:
        return self.pipe.encode_prompt([caption])  # (1, L)

    def range_encode(self, codes: np.ndarray, caption: str) -> bytes:
        """(N,) codes -> the shortest byte string `range_decode` turns back into them (see `shortest_payload`)."""
        import constriction

        with _coding_context(self.pipe._execution_device):
            distribution = NextCodeDistribution(self.pipe.transformer, self._input_ids(caption))
            probabilities = distribution.along(codes)  # (N, V) float64: each step's distribution
        encoder = constriction.stream.queue.RangeEncoder()
        for code, p in zip(codes.tolist(), probabilities):
            encoder.encode(code, _categorical(p))
        return shortest_payload(encoder.get_compressed().astype(">u4").tobytes(), codes, probabilities)

    def range_decode(self, payload: bytes, n: int, caption: str) -> np.ndarray:
        """Inverse of `range_encode`: (n,) int64 codes."""
        decoder = _range_decoder(payload)
        codes = np.empty(n, dtype=np.int64)
        device = self.pipe._execution_device
        with _coding_context(device):
            distribution = NextCodeDistribution(self.pipe.transformer, self._input_ids(caption))
            for i in range(n):
                codes[i] = decoder.decode(_categorical(distribution.probabilities()))
                if i + 1 < n:
                    distribution.advance(int(codes[i]))
        return codes

    # ------------------------------------------------------------------------------------------------------------
    def compress_codes(self, image_tokens: torch.LongTensor, caption: str = "") -> bytes:
        r"""
        Compress one code grid under the transformer given `caption`.

        Range-codes the grid, decodes the result again with a fresh pass of the same probability function and
        compares (so a file is only written when it decodes here), and falls back to the raw codes when coding
        would not save bytes.

        Args:
            image_tokens (`torch.LongTensor` of shape `(grid, grid)`, `(1, grid, grid)` or `(grid * grid,)`):
                dVAE codes, e.g. `DallePipelineOutput.image_tokens[i]`.
            caption (`str`, *optional*, defaults to `""`):
                The text the codes are coded under (stored in the file); `""` codes them unconditionally.

        Returns:
            `bytes`: the file.
        """
        if not isinstance(caption, str):
            raise ValueError(f"caption must be a str, got {type(caption).__name__}")
        caption_bytes = caption.encode("utf-8")
        if len(caption_bytes) > 0xFFFF:
            raise ValueError(f"caption must be at most 65535 UTF-8 bytes, got {len(caption_bytes)}")
        g = self.grid_size
        if not isinstance(image_tokens, torch.Tensor) or image_tokens.numel() != g * g:
            raise ValueError(f"image_tokens must be one ({g}, {g}) grid of codes, got {image_tokens!r:.80}")
        codes = self.pipe.check_image_tokens(image_tokens.reshape(1, g * g))[0].cpu().numpy().astype(np.int64)

        # 1. Range-code under the model, check that it decodes, fall back to raw codes if that is not smaller
        raw = pack_raw(codes, self.raw_bits)
        payload, flags = self.range_encode(codes, caption), 0
        if len(payload) >= len(raw):
            payload, flags = raw, FLAG_RAW
        elif not np.array_equal(self.range_decode(payload, len(codes), caption), codes):
            raise RuntimeError(
                "decode-after-encode check failed: the transformer gave different probabilities on two identical "
                "passes, so this file would not decompress. Please report it with your torch version and device."
            )

        # 2. Header, caption, payload, file checksum
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, flags, self.fingerprint, g, codes_crc32(codes))
        body = header + _CAPTION_LENGTH.pack(len(caption_bytes)) + caption_bytes + payload
        return body + _TRAILER.pack(zlib.crc32(body))

    def compress_image(self, image, caption: str = "") -> bytes:
        """Compress an image (PIL, `np.ndarray` or `torch.Tensor`; a path opens with PIL): its dVAE codes, coded
        under the transformer given `caption`. Lossless for the codes, lossy for the pixels."""
        if isinstance(image, str):
            image = PIL.Image.open(image)
        codes = self.pipe.encode_images([image])  # (1, g, g)
        return self.compress_codes(codes[0], caption)

    # ------------------------------------------------------------------------------------------------------------
    def read_header(self, data: bytes) -> tuple[CompressedHeader, bytes]:
        """Parse and check a file's framing: magic, file checksum, version, flags. Returns (header, payload)."""
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"data must be bytes, got {type(data).__name__}")
        data = bytes(data)
        minimum = _HEADER.size + _CAPTION_LENGTH.size + _TRAILER.size
        if len(data) < minimum or data[:4] != MAGIC:
            raise CompressionError(f"not a dalle-hf compressed file (expected the magic bytes {MAGIC!r} and at least "
                                   f"{minimum} bytes, got {data[:4]!r} and {len(data)} bytes)")
        (stored_crc,) = _TRAILER.unpack(data[-_TRAILER.size :])
        if zlib.crc32(data[: -_TRAILER.size]) != stored_crc:
            raise CompressionError("the file is corrupted: its CRC-32 does not match its contents (a changed, missing "
                                   "or extra byte); refusing to decode it")
        _, version, flags, fingerprint, grid_size, crc = _HEADER.unpack(data[: _HEADER.size])
        if version != FORMAT_VERSION:
            raise CompressionError(f"format version {version}, this dalle-hf reads version {FORMAT_VERSION}")
        if flags & ~FLAG_RAW:
            raise CompressionError(f"unknown flags {flags:#04x} (this dalle-hf knows {FLAG_RAW:#04x})")
        (caption_length,) = _CAPTION_LENGTH.unpack(data[_HEADER.size : _HEADER.size + _CAPTION_LENGTH.size])
        start = _HEADER.size + _CAPTION_LENGTH.size
        if start + caption_length > len(data) - _TRAILER.size:
            raise CompressionError(f"the caption length ({caption_length} bytes) runs past the end of the file")
        try:
            caption = data[start : start + caption_length].decode("utf-8")
        except UnicodeDecodeError as error:
            raise CompressionError(f"the caption is not UTF-8: {error}") from None
        header = CompressedHeader(version, flags, fingerprint, grid_size, crc, caption)
        return header, data[start + caption_length : -_TRAILER.size]

    def decompress_codes(self, data: bytes) -> tuple[torch.LongTensor, str]:
        """The exact code grid (grid, grid) and the caption of a file made by `compress_codes` with this model."""
        header, payload = self.read_header(data)
        if header.fingerprint != self.fingerprint:
            raise CompressionError(
                f"this file was compressed with another model (fingerprint {header.fingerprint.hex()}, this "
                f"pipeline's is {self.fingerprint.hex()}): decompress it with the same transformer, dVAE and "
                f"tokenizer weights, loaded in the same dtype"
            )
        if header.grid_size != self.grid_size:
            raise CompressionError(f"the file holds a {header.grid_size}x{header.grid_size} grid, the model makes "
                                   f"{self.grid_size}x{self.grid_size}")
        n = self.grid_size**2
        if header.flags & FLAG_RAW:
            codes = unpack_raw(payload, n, self.raw_bits)
        else:
            try:
                codes = self.range_decode(payload, n, header.caption)
            except (ValueError, RuntimeError) as error:  # constriction's refusal of an impossible payload
                raise CompressionError(f"the payload cannot be decoded with this model: {error}") from None
        if codes_crc32(codes) != header.codes_crc32 or codes.max() >= self.vocab_size:
            raise CompressionError(
                "the decoded codes do not match the file's CRC-32: this machine's transformer computed different "
                "probabilities than the one that compressed the file (another torch build or device?); refusing "
                "to return a wrong image"
            )
        return torch.from_numpy(codes).view(self.grid_size, self.grid_size), header.caption

    def decompress(self, data: bytes) -> DecompressedImage:
        """The exact codes of a compressed file, their dVAE reconstruction (a PIL image) and the caption."""
        codes, caption = self.decompress_codes(data)
        pixels = self.pipe.decode_image_tokens(codes.flatten()[None].to(self.pipe._execution_device))  # (1, 3, H, W)
        return DecompressedImage(image_tokens=codes, image=self.pipe.postprocess(pixels, "pil")[0], caption=caption)


def compress_image(pipe, image, caption: str = "") -> bytes:
    """Compress an image's dVAE codes under `pipe`'s transformer given `caption` (see [`LikelihoodCoder`]).

    Lossless for the codes, lossy for the pixels (the dVAE round trip)."""
    return LikelihoodCoder(pipe).compress_image(image, caption)


def compress_codes(pipe, image_tokens: torch.LongTensor, caption: str = "") -> bytes:
    """Compress a (grid, grid) code grid under `pipe`'s transformer given `caption` (see [`LikelihoodCoder`])."""
    return LikelihoodCoder(pipe).compress_codes(image_tokens, caption)


def decompress(pipe, data: bytes) -> DecompressedImage:
    """Decode a file of `compress_image`/`compress_codes` with the same pipeline: `codes, image = decompress(...)`;
    `.caption` holds the stored caption. Raises [`CompressionError`] for a corrupted file or another model."""
    return LikelihoodCoder(pipe).decompress(data)


__all__ = [
    "CODING_THREADS",
    "CompressionError",
    "DecompressedImage",
    "LikelihoodCoder",
    "NextCodeDistribution",
    "compress_codes",
    "compress_image",
    "decompress",
    "model_fingerprint",
    "pinned_num_threads",
]
