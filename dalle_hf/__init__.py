"""dalle-hf: DALL-E (Ramesh et al. 2021) rebuilt the Hugging Face way.

A discrete VAE turns images into a grid of codes, a decoder-only transformer models
[text tokens ; image tokens], and CLIP reranks the samples. The models are imported here and registered with
`AutoConfig` / `AutoModel`, and one bitsandbytes log message is filtered (the only import-time effects);
pipelines and training code load lazily on first use, so `import dalle_hf` does not pull in diffusers.
"""

import importlib
import logging

from transformers import AutoConfig, AutoModel

from .configuration_dalle import DalleConfig
from .configuration_dalle_bart import DalleBartConfig
from .configuration_dvae import DalleVAEConfig
from .modeling_dalle import DalleForImageGeneration, DalleKVCache, DalleOutput
from .modeling_dalle_bart import DalleBartForImageGeneration
from .modeling_dvae import DalleVAE, DalleVAEOutput

__version__ = "0.1.0"

AutoConfig.register(DalleConfig.model_type, DalleConfig, exist_ok=True)
AutoConfig.register(DalleVAEConfig.model_type, DalleVAEConfig, exist_ok=True)
AutoConfig.register(DalleBartConfig.model_type, DalleBartConfig, exist_ok=True)
AutoModel.register(DalleConfig, DalleForImageGeneration, exist_ok=True)
AutoModel.register(DalleVAEConfig, DalleVAE, exist_ok=True)
AutoModel.register(DalleBartConfig, DalleBartForImageGeneration, exist_ok=True)


class _OptionalKernelFilter(logging.Filter):
    """Drop bitsandbytes' import-time warning that its optional `kernels` package is missing.

    bitsandbytes 0.50 logs "Failed to load CPU gemm_4bit_forward from kernels-community" whenever it is imported on a
    CPU with AVX-512 bf16 (diffusers imports it when it is installed): that kernel would only speed up 4-bit on the
    CPU and is fetched from the Hub, which our users cannot fix and need not. Every other bitsandbytes message passes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_OptionalKernelFilter())

_LAZY = {
    "DallePipeline": "pipeline_dalle",
    "DallePipelineOutput": "pipeline_dalle",
    "DalleScoreOutput": "pipeline_dalle",
    "DalleClassificationOutput": "pipeline_dalle",
    "DalleImageVariationPipeline": "pipeline_dalle_variation",
    "DalleInpaintPipeline": "pipeline_dalle_inpaint",
    "DalleInpaintPipelineOutput": "pipeline_dalle_inpaint",
    "DalleMiniPipeline": "pipeline_dalle_mini",
    "DalleMiniInpaintPipeline": "pipeline_dalle_mini",
    "DalleMiniImageVariationPipeline": "pipeline_dalle_mini",
    "train_text_tokenizer": "tokenization",
    "make_clip_config": "clip",
    "make_clip_processor": "clip",
}

# Written out (not built from _LAZY) so linters see the re-exports above; a test checks it against _LAZY.
__all__ = [
    "DalleBartConfig",
    "DalleBartForImageGeneration",
    "DalleClassificationOutput",
    "DalleConfig",
    "DalleForImageGeneration",
    "DalleImageVariationPipeline",
    "DalleInpaintPipeline",
    "DalleInpaintPipelineOutput",
    "DalleKVCache",
    "DalleMiniImageVariationPipeline",
    "DalleMiniInpaintPipeline",
    "DalleMiniPipeline",
    "DalleOutput",
    "DallePipeline",
    "DallePipelineOutput",
    "DalleScoreOutput",
    "DalleVAE",
    "DalleVAEConfig",
    "DalleVAEOutput",
    "make_clip_config",
    "make_clip_processor",
    "train_text_tokenizer",
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module 'dalle_hf' has no attribute {name!r}")


def __dir__():
    return __all__
