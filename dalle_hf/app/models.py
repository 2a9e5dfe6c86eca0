"""Which models the app serves and how they load: the checkpoint folders and the models named on the command line
(`--model` / `$DALLE_HF_MODELS`: folders or Hub repo ids), one `AppModel` per loaded model, and the model families
that know how to load and describe a saved folder (DALL-E, and DALL·E mini / Mega converted by
`dalle-hf convert-dalle-mini`).

The handlers, the sampling stream and the layout use only `AppModel` and the info dict of `read_model_info`, never a
pipeline class: a new family of models joins by adding a `ModelFamily` to `FAMILIES`.
"""

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import diffusers
import gradio as gr
import huggingface_hub
import PIL.Image
import psutil
import torch
import transformers

from dalle_hf.loading import check_precision, load_pipeline, resolve_device
from dalle_hf.model_card import DALLE_MINI_SAMPLE_PROMPTS
from dalle_hf.pipeline_dalle import DallePipeline
from dalle_hf.pipeline_dalle_inpaint import DalleInpaintPipeline
from dalle_hf.pipeline_dalle_mini import (
    DalleMiniImageVariationPipeline,
    DalleMiniInpaintPipeline,
    DalleMiniPipeline,
)
from dalle_hf.pipeline_dalle_variation import DalleImageVariationPipeline

logger = logging.getLogger("dalle_hf.app")

CHECKPOINTS_ENV = "DALLE_HF_CHECKPOINTS"
MODELS_ENV = "DALLE_HF_MODELS"  # comma-separated folders or Hub repo ids, added like `--model`
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "org/name", as huggingface_hub's validate_repo_id allows
# The repository's checkpoints/, next to app.py: the app runs from any working directory.
DEFAULT_CHECKPOINTS = Path(__file__).resolve().parents[2] / "checkpoints"
DEFAULT_MODEL = "dalle-shapes"  # listed first when present
DEFAULT_GUIDANCE_SCALE = 1.0  # the pipelines' own default (no guidance), for a model that saved none
PREVIEW_GRAY = 0.5  # pixels of a streamed partial image not sampled yet
PROGRESS_DESC = "Sampling image tokens"  # the progress bar the status line follows
# What an image costs. A sampling step is memory-bound on a CPU: it reads the transformer's weights once per image
# token, so an image costs about (weights a step reads) x (image tokens) "weight reads" (`read_info`'s
# `weights_read_per_image`), and seconds = weight reads x the device's rate below. Guidance's second row and more
# candidates in the batch read the same weights again for little (a 3 x 3 mini grid took 2.8x one image), so the
# estimate per candidate is an upper bound. The CPU rate comes from this project's 2-core machine: DALL·E mini 9.5 s
# per guided image (fp32, 2 threads, benchmarks/bench_dalle_mini.py, docs/dalle-mini.md) is 1.9e-10 s a read, Mega
# 78.7 s (bf16, 1 thread, benchmarks/bench_dalle_mega_cpu.py, docs/performance.md) 2.5e-10: Mega's, the slower,
# since the app's concurrent requests get one thread each. On a GPU: not measured (no GPU where this was written);
# assumed 10x the CPU's rate, little for a GPU's memory bandwidth.
SECONDS_PER_WEIGHT_READ = {"cpu": 2.5e-10, "cuda": 2.5e-11}
# Where the app samples and in which dtype, set once at start by `use_device` (`--device`, `--dtype`): the CPU, and
# each model in the dtype it was saved in, unless asked otherwise.
DEVICE = "cpu"
DTYPE: str | None = None  # None: the saved dtype on the CPU; on CUDA, the family's `cuda_dtype`


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folders
# ----------------------------------------------------------------------------------------------------------------
def checkpoints_root(checkpoints: str | os.PathLike | None = None) -> Path:
    """`checkpoints`, else `$DALLE_HF_CHECKPOINTS`, else `checkpoints/` next to app.py."""
    return Path(checkpoints or os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINTS)


def find_checkpoints(root: str | os.PathLike) -> dict[str, Path]:
    """Model name -> folder: `root` itself if it holds a `model_index.json`, else its sub-folders that do
    (`dalle-shapes` first, then by name)."""
    root = Path(root)
    if (root / "model_index.json").is_file():
        return {root.resolve().name: root}
    if not root.is_dir():
        return {}
    found = sorted(p for p in root.iterdir() if (p / "model_index.json").is_file())
    found.sort(key=lambda p: p.name != DEFAULT_MODEL)
    return {p.name: p for p in found}


def no_checkpoint_message(root: Path | None = None) -> str:
    return (
        f"No model found in `{root or 'checkpoints/'}`: a model is a folder with a `model_index.json` "
        f"(`pipe.save_pretrained(DIR)`). Train one (see the README), or point the app at one with "
        f"`--checkpoints DIR` or `{CHECKPOINTS_ENV}=DIR`."
    )


def model_specs(cli_models: list[str] | None = None) -> list[str]:
    """The models to add beside the checkpoints: `--model` values, then `$DALLE_HF_MODELS`'s (comma-separated)."""
    env = [spec.strip() for spec in os.environ.get(MODELS_ENV, "").split(",")]
    return [*(cli_models or []), *(spec for spec in env if spec)]


def resolve_model(spec: str) -> tuple[str, Path]:
    """A `--model` value -> (the name the selector shows, the model's folder); a `ValueError` naming `spec` if it is
    neither a model folder nor a Hub repository of one the app can serve.

    A folder is named by its last part; a repo id (`org/name`, when no such folder exists) is fetched with
    huggingface_hub's `snapshot_download` (from its cache when `HF_HUB_OFFLINE=1`) and named by the id.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        name = path.resolve().name
    elif REPO_ID.fullmatch(spec) and not path.exists():
        try:
            # model_index.json first: a repository of unconverted weights (dalle-mini/dalle-mega's 10 GB of Flax)
            # is refused before anything large is downloaded (the family is checked below)
            index = Path(huggingface_hub.hf_hub_download(spec, "model_index.json"))
            path = Path(huggingface_hub.snapshot_download(spec)) if known_family(index.parent) else index.parent
        except Exception as e:  # not found, no model_index.json, offline and not cached, no access, no network
            raise ValueError(f"--model {spec}: no such folder, and the Hub repository {spec!r} could not be "
                             f"fetched ({type(e).__name__}: {e}); a published DALL·E mini / Mega needs converting "
                             "first (dalle-hf convert-dalle-mini)") from None
        name = spec
    else:
        raise ValueError(f"--model {spec}: expected a model folder (with a model_index.json) or a Hub repo id "
                         "(org/name)")
    if not (path / "model_index.json").is_file():
        raise ValueError(f"--model {spec}: {path} has no model_index.json, so it is not a saved pipeline "
                         "(convert DALL·E mini / Mega with `dalle-hf convert-dalle-mini`)")
    try:
        family_of(path)
    except ValueError as e:
        raise ValueError(f"--model {spec}: {e}") from None
    return name, path


def known_family(path: Path) -> bool:
    try:
        family_of(path)
        return True
    except ValueError:
        return False


def find_models(root: str | os.PathLike, specs: list[str] = ()) -> dict[str, Path]:
    """Model name -> folder: the models `specs` name (`resolve_model`), first, in order, then the checkpoint folders
    of `root` (`find_checkpoints`) not named already. Two different models under one name are a `ValueError`."""
    models: dict[str, Path] = {}
    for name, path in [*(resolve_model(spec) for spec in specs), *find_checkpoints(root).items()]:
        if path.resolve() in {p.resolve() for p in models.values()}:
            continue
        if name in models:
            raise ValueError(f"two models are named {name!r}: {models[name]} and {path}; rename one folder")
        models[name] = path
    return models


def read_json(file: Path) -> dict:
    """A saved config as a dict; {} if it is missing or unreadable (loading the model reports the error when it is
    used)."""
    try:
        data = json.loads(file.read_text()) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# A loaded model, as the handlers use it
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class AppModel:
    """A loaded model as the app uses it: its pipelines and the few numbers the handlers need.

    The pipelines take the diffusers-style arguments of `DallePipeline` (`prompt`, `num_images_per_prompt`,
    `num_images_to_keep`, sampling settings, `generator`, `callback_on_step_end` with the sampled `image_tokens`)
    and return images with `clip_scores`. Sampling only reads the weights (every request has its own KV cache and
    generator), so all requests share one `AppModel`.
    """

    text_to_image: DallePipeline
    variations: DalleImageVariationPipeline
    make_inpaint: Callable[[], DalleInpaintPipeline]  # built on the first edit, on the same modules
    grid_size: int  # image tokens per side
    image_size: int  # pixels per side of an image
    text_seq_len: int  # text tokens the model reads; a longer prompt is truncated
    preview_every: int  # image tokens between streamed partial images (a row of the grid for DALL-E)
    decode_preview: Callable[[torch.LongTensor, int], list[PIL.Image.Image]]  # (tokens so far, count) -> images
    _inpaint: DalleInpaintPipeline | None = None
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    @property
    def inpaint(self) -> DalleInpaintPipeline:
        """The inpainting pipeline, made once (two first edits at once make one)."""
        with self._lock:
            if self._inpaint is None:
                self._inpaint = self.make_inpaint()
            return self._inpaint

    def prompt_token_count(self, prompt: str) -> int:
        return self.text_to_image.prompt_token_count(prompt)

    def prompt_as_read(self, prompt: str) -> str:
        """What the model reads of a prompt longer than `text_seq_len` tokens (no half characters)."""
        tokenizer = self.text_to_image.tokenizer
        ids = tokenizer(prompt, truncation=True, max_length=self.text_seq_len)["input_ids"]
        return tokenizer.decode(ids, skip_special_tokens=True).replace("\ufffd", "").strip()


# ----------------------------------------------------------------------------------------------------------------
# Model families: how a saved folder is recognized, described and loaded
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """One family of saved models. `read_info` reads the numbers the page shows from the saved configs, without
    loading weights (keys: `guidance_scale`, `grid`, `image_size`, `how_it_works`, `weights_read_per_image`); `load`
    makes its `AppModel`."""

    name: str
    pipeline_classes: tuple[str, ...]  # the `_class_name`s of `model_index.json` this family loads
    read_info: Callable[[Path], dict]
    load: Callable[[Path], AppModel]


@torch.no_grad()
def dalle_preview(pipe: DallePipeline, tokens: torch.LongTensor, count: int) -> list[PIL.Image.Image]:
    """Decode the complete rows of the first `count` candidates; rows not sampled yet are gray.

    `vae.decode_code` needs a full grid, so the last complete row is repeated below and then painted over.
    """
    g = pipe.transformer.config.image_grid_size
    rows = tokens.shape[1] // g
    done = tokens[:count, : rows * g].view(-1, rows, g)  # (count, rows, g)
    grid = torch.cat([done, done[:, -1:].expand(-1, g - rows, -1)], dim=1)  # (count, g, g)
    images = pipe.decode_image_tokens(grid.reshape(grid.shape[0], -1))  # (count, 3, H, W)
    images[:, :, images.shape[2] * rows // g :] = PREVIEW_GRAY
    return pipe.postprocess(images, "pil")


def use_device(device: str = "auto", dtype: str | None = None) -> str:
    """Set where the app samples (`DEVICE`) and in which dtype (`DTYPE`), before any model loads: `device` is
    `--device` (auto: CUDA when torch sees a GPU), `dtype` is `--dtype` (None: the family's choice, `load_pipelines`).
    A `ValueError` for a device that is not there or a dtype it cannot run (float16 on the CPU). Returns the device."""
    global DEVICE, DTYPE
    chosen = resolve_device(device, torch.cuda.is_available())
    check_precision(dtype, "none", chosen)
    DEVICE, DTYPE = chosen, dtype
    return chosen


def load_pipelines(path: Path, text_to_image: type, variations: type, inpaint: type,
                   cuda_dtype: str | None = None) -> AppModel:
    """A saved text-to-image pipeline and its family's variation and inpainting pipelines on the same modules (one
    copy of the weights for all three tabs, `from_pipe`), on `DEVICE` in `DTYPE`; with no `DTYPE`, the saved dtype on
    the CPU and `cuda_dtype` on CUDA. A copy that carries its code (a Hub repository from `dalle-hf push`, a
    converted DALL·E mini folder) loads with dalle-hf's own classes too: its code files are never run
    (`DallePipeline.from_pretrained`)."""
    dtype = DTYPE or (cuda_dtype if DEVICE == "cuda" else None)
    pipe = load_pipeline(str(path), dtype, device=DEVICE, pipeline_cls=text_to_image)

    def make_inpaint():
        edit = inpaint.from_pipe(pipe)
        edit.set_progress_bar_config(desc=PROGRESS_DESC, leave=False)
        return edit

    vary = variations.from_pipe(pipe)
    for p in (pipe, vary):
        p.set_progress_bar_config(desc=PROGRESS_DESC, leave=False)
    config = pipe.transformer.config
    return AppModel(
        text_to_image=pipe, variations=vary, make_inpaint=make_inpaint, grid_size=config.image_grid_size,
        image_size=pipe.image_size, text_seq_len=config.text_seq_len, preview_every=config.image_grid_size,
        decode_preview=lambda tokens, count: dalle_preview(pipe, tokens, count),
    )


def load_dalle(path: Path) -> AppModel:
    return load_pipelines(path, DallePipeline, DalleImageVariationPipeline, DalleInpaintPipeline)


def dalle_info(path: Path) -> dict:
    transformer, vae = read_json(path / "transformer" / "config.json"), read_json(path / "vae" / "config.json")
    info = {
        "guidance_scale": read_json(path / "model_index.json").get("default_guidance_scale", DEFAULT_GUIDANCE_SCALE),
        "grid": transformer.get("image_grid_size", 8),
        "text_seq_len": transformer.get("text_seq_len"),
        "n_layer": transformer.get("n_layer"),
        "n_embd": transformer.get("n_embd"),
        "image_vocab_size": transformer.get("image_vocab_size"),
        "image_size": vae.get("image_size"),
        "clip": (path / "clip_model").is_dir(),
    }
    return {**info, "examples": None, "how_it_works": dalle_how_it_works(info),
            "weights_read_per_image": dalle_weights_read_per_image(transformer)}


def dalle_weights_read_per_image(config: dict) -> int:
    """A step reads each block's attention (4 d^2) and MLP (2 x mlp_ratio x d^2) weights and the head's image rows,
    once per image token; 0 for a config it cannot read (its load reports the error)."""
    d, layers = config.get("n_embd") or 0, config.get("n_layer") or 0
    step = layers * (4 + 2 * config.get("mlp_ratio", 4)) * d * d + d * (config.get("image_vocab_size") or 0)
    return step * (config.get("image_grid_size") or 0) ** 2


def dalle_how_it_works(info: dict | None) -> str:
    numbers = ""
    if info:
        numbers = (
            f"\n\nThis model: {info['image_size']} px images as a {info['grid']}x{info['grid']} grid of "
            f"{info['image_vocab_size']} codes; a {info['n_layer']}-layer, {info['n_embd']}-wide transformer reading "
            f"{info['text_seq_len']} text tokens; {'a' if info['clip'] else 'no'} CLIP reranker."
        )
    return (
        "DALL-E ([Ramesh et al. 2021](https://arxiv.org/abs/2102.12092)) in three models:\n\n"
        "1. **dVAE**: a discrete VAE turns an image into a grid of codes (tokens) and back.\n"
        "2. **Transformer**: a decoder-only transformer reads the prompt's BPE tokens and samples image tokens one at "
        "a time, row by row (the partial images you see while it runs), with temperature, top-k / top-p and "
        "optional classifier-free guidance.\n"
        "3. **CLIP rerank**: the dVAE decodes all N candidates and CLIP keeps the k that match the prompt best "
        "(variations: the k closest to the input image).\n\n"
        "Variations keep the top rows of the input's codes and let the transformer complete the rest. Edits "
        "resample the code cells the painted mask touches (a kept cell is fed its own code), rank the candidates by "
        "CLIP (or by the transformer's likelihood of the whole image, or both), and paste the input back outside "
        "the mask."
        + numbers
    )


def how_it_works(info: dict | None) -> str:
    """The "How it works" text of a model's info; with no model, DALL-E's without numbers."""
    return info["how_it_works"] if info else dalle_how_it_works(None)


DALLE = ModelFamily("DALL-E", ("DallePipeline", "DalleImageVariationPipeline", "DalleInpaintPipeline"),
                    read_info=dalle_info, load=load_dalle)


def load_dalle_mini(path: Path) -> AppModel:
    """A converted DALL·E mini / Mega folder: 16 x 16 VQGAN codes of 256 px images, a preview per row of 16 codes; on
    CUDA in float16, as the exported Space runs it (Mega: 5.2 GB of weights)."""
    return load_pipelines(path, DalleMiniPipeline, DalleMiniImageVariationPipeline, DalleMiniInpaintPipeline,
                          cuda_dtype="float16")


def dalle_mini_info(path: Path) -> dict:
    transformer, vae = read_json(path / "transformer" / "config.json"), read_json(path / "vae" / "config.json")
    index = read_json(path / "model_index.json")
    grid = math.isqrt(transformer.get("image_seq_len", 256))
    info = {
        "guidance_scale": index.get("default_guidance_scale", 10.0),  # DalleMiniPipeline's default: dalle-mini's
        "grid": grid,
        "image_size": grid * 2 ** (len(vae.get("block_out_channels", (0,) * 5)) - 1),  # 16 px cells for the f16 VQGAN
        "text_seq_len": transformer.get("text_seq_len"),
        "d_model": transformer.get("d_model"),
        "layers": (transformer.get("encoder_layers"), transformer.get("decoder_layers")),
        "image_vocab_size": transformer.get("sampled_image_vocab_size"),
        "vae_has_encoder": index.get("vae_has_encoder", True),
        "clip": (path / "clip_model").is_dir(),
        # no world.json: everyday prompts (the converted model card's), and no unseen-word note (its BPE vocabulary
        # says nothing about which words dalle-mini's captions had)
        "examples": tuple(DALLE_MINI_SAMPLE_PROMPTS),
    }
    return {**info, "how_it_works": dalle_mini_how_it_works(info),
            "weights_read_per_image": dalle_mini_weights_read_per_image(transformer)}


def dalle_mini_weights_read_per_image(config: dict) -> int:
    """A step reads each decoder layer's self-attention (4 d^2), cross-attention queries and output (2 d^2: the text's
    keys and values are computed once per prompt) and GLU (3 d x glu_dim) weights and the head's sampled rows, once
    per image token (mini: 193M x 256; Mega: 1.24B x 256); the encoder runs once."""
    d, glu = config.get("d_model") or 0, config.get("glu_dim") or 0
    vocab = config.get("sampled_image_vocab_size") or config.get("image_vocab_size") or 0
    step = (config.get("decoder_layers") or 0) * (6 * d * d + 3 * d * glu) + d * vocab
    return step * (config.get("image_seq_len") or 0)


def dalle_mini_how_it_works(info: dict) -> str:
    encoder, decoder = info["layers"]
    return (
        "DALL·E mini / Mega (Boris Dayma et al., [dalle-mini](https://github.com/borisdayma/dalle-mini), Apache-2.0), "
        "converted to dalle-hf:\n\n"
        "1. **VQGAN** (Esser, Rombach and Ommer): turns a 256 x 256 image into a 16 x 16 grid of codes and back.\n"
        "2. **BART encoder-decoder**: the encoder reads the normalized prompt's BPE tokens; the decoder samples the "
        "image codes one at a time, row by row (the partial images you see), with super-conditioning "
        "(the guidance scale; dalle-mini's notebook uses 10).\n"
        "3. **CLIP rerank** (when the folder has one): keeps the k candidates that match the prompt best.\n\n"
        "Variations and edits encode the input with the VQGAN's encoder and resample the rows or cells to change"
        + ("." if info["vae_has_encoder"] else ": this conversion (min-dalle's files) has no encoder, so they are "
           "refused; convert the Flax weights for them.")
        + f"\n\nThis model: {info['image_size']} px images as a {info['grid']}x{info['grid']} grid of "
        f"{info['image_vocab_size']} codes; {encoder} + {decoder} layers, {info['d_model']} wide, reading "
        f"{info['text_seq_len']} text tokens; {'a' if info['clip'] else 'no'} CLIP reranker."
    )


DALLE_MINI = ModelFamily(
    "DALL·E mini", ("DalleMiniPipeline", "DalleMiniImageVariationPipeline", "DalleMiniInpaintPipeline"),
    read_info=dalle_mini_info, load=load_dalle_mini,
)
FAMILIES = (DALLE, DALLE_MINI)  # the family whose `pipeline_classes` name a folder's `_class_name` loads it


def family_of(path: Path) -> ModelFamily:
    """The family that loads the model folder `path`. A `model_index.json` without a class name (or unreadable)
    goes to DALL-E, whose loading then reports what is wrong. A published folder names its class with the code
    file, `["pipeline_dalle_mini", "DalleMiniPipeline"]`."""
    class_name = read_json(Path(path) / "model_index.json").get("_class_name")
    if class_name is None:
        return DALLE
    if isinstance(class_name, list) and len(class_name) == 2:
        class_name = class_name[1]
    family = next((f for f in FAMILIES if class_name in f.pipeline_classes), None)
    if family is None:
        raise ValueError(f"the app does not know the pipeline class {class_name!r} (it serves "
                         f"{', '.join(c for f in FAMILIES for c in f.pipeline_classes)})")
    return family


def read_model_info(path: Path) -> dict:
    """The numbers the page shows for a model folder, read from its saved configs without loading weights, and what
    an image costs where the app samples (`seconds_per_image` on `device`)."""
    try:
        info = family_of(path).read_info(Path(path))
    except ValueError:
        info = DALLE.read_info(Path(path))
    seconds = info["weights_read_per_image"] * SECONDS_PER_WEIGHT_READ[DEVICE]
    return {**info, "device": DEVICE, "seconds_per_image": seconds}


# ----------------------------------------------------------------------------------------------------------------
# Loading, once per model
# ----------------------------------------------------------------------------------------------------------------
_MODELS: dict[Path, AppModel] = {}
_MODELS_LOCK = threading.Lock()  # one load per model, however many requests arrive at once


def weights_size(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of a model folder's safetensors files, read from their headers (no tensor is loaded)."""
    params = size = 0
    for file in Path(path).rglob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        params += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
        size += file.stat().st_size
    return params, size


def gigabytes(n: float) -> str:
    """Bytes for the log: "5.18 GB", or "12.3 MB" below a gigabyte (a tiny model's load would read "0.00 GB")."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.1f} MB"


def millions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


@contextlib.contextmanager
def loading_progress():
    """The libraries' loading progress bars on while a model loads (the app turns them off otherwise): the console
    shows the components and weights loading, and a request waiting for the load shows them (`track_tqdm`)."""
    was = diffusers.utils.logging.is_progress_bar_enabled(), transformers.utils.logging.is_progress_bar_enabled()
    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()
    try:
        yield
    finally:
        if not was[0]:
            diffusers.utils.logging.disable_progress_bar()
        if not was[1]:
            transformers.utils.logging.disable_progress_bar()


def load_model(path: str | os.PathLike, name: str | None = None) -> AppModel:
    """Load a saved model once per process and share it among all requests. The log says what is loading (its
    parameters and weight bytes), the progress bars follow it, and the log then says what it took: seconds and the
    growth of the process's resident memory."""
    key = Path(path).resolve()
    with _MODELS_LOCK:
        if key not in _MODELS:
            params, size = weights_size(key)
            logger.info("Loading %s: %s parameters, %s of weights, from %s", name or key.name, millions(params),
                        gigabytes(size), key)
            process = psutil.Process()
            rss, start = process.memory_info().rss, time.perf_counter()
            with loading_progress():
                model = _MODELS[key] = family_of(key).load(key)
            modules = [m for m in model.text_to_image.components.values() if isinstance(m, torch.nn.Module)]
            tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
            # safetensors files are memory-mapped: resident memory grows as the weights are first read, so the log
            # gives both the tensors' bytes and the growth so far
            logger.info("Loaded %s in %.1f s: %s of weights in memory (%s), resident memory +%s (now %s)",
                        name or key.name, time.perf_counter() - start,
                        gigabytes(sum(t.numel() * t.element_size() for t in tensors)),
                        ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in tensors})),
                        gigabytes(process.memory_info().rss - rss), gigabytes(process.memory_info().rss))
        return _MODELS[key]


def get_model(models: dict[str, Path], name: str | None) -> AppModel:
    """The model a request names (the first when none is named), loaded; a message if it is unknown or fails."""
    if not models:
        raise gr.Error(no_checkpoint_message(), title="No model")
    if name not in models:
        name = next(iter(models)) if name in (None, "") else name
        if name not in models:
            raise gr.Error(f"Unknown model {name!r}; available: {', '.join(models)}.")
    try:
        return load_model(models[name], name)
    except Exception as e:  # a broken checkpoint must not take the app down
        logger.exception("Loading %s failed", models[name])
        raise gr.Error(f"Could not load the model {name!r}: {type(e).__name__}: {e}", title="Model error") from None
