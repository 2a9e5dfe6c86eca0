"""dalle-hf Gradio app: prompt -> CLIP-ranked grid, image variations and editing, on the models in `checkpoints/`
and the converted DALL·E mini / Mega models named with `--model`.

    python app.py [--model DIR_OR_REPO_ID ...] [--checkpoints DIR] [--host 127.0.0.1] [--port 7860]
                  [--device auto|cpu|cuda] [--dtype float32|bfloat16|float16]

Every sub-folder of the checkpoints folder with a `model_index.json` is a model (or the folder itself, if it has
one); `DALLE_HF_CHECKPOINTS` overrides the folder like `--checkpoints`. `--model` (repeatable) and
`DALLE_HF_MODELS` (comma-separated) add models, listed first: a saved pipeline folder, or a Hub repo id fetched with
huggingface_hub. A model's `world.json` (written with the checkpoint) gives its example prompts, its styles (a style
selector) and the words of its training captions (a note names a prompt's others); the app itself names no world.
Ready for a Hugging Face Space: the README front matter names this file, and the `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT` that Spaces set are respected.

This file parses the command line, sets up logging and threads, and launches; the app's parts live in
`dalle_hf/app/`: `models` (which models exist, how they load), `inputs` and `components` (input checks and the
checked Gradio components), `sampling` (previews, cancellation, memory), `handlers`, `world` (a model's world.json)
and `layout` (`build_demo()`). Nothing happens at import: pipelines load once per model, on first use or in
`main()`, and are shared by all requests.
"""

import argparse
import logging
import os

import diffusers
import gradio as gr
import torch
import transformers

from dalle_hf.app.inputs import MAX_FILE_SIZE
from dalle_hf.app.layout import CSS, build_demo
from dalle_hf.app.models import (
    CHECKPOINTS_ENV,
    MODELS_ENV,
    checkpoints_root,
    find_models,
    load_model,
    model_specs,
    no_checkpoint_message,
    use_device,
)
from dalle_hf.app.sampling import limit_malloc_arenas
from dalle_hf.loading import DEVICES, DTYPES, check_precision, resolve_device

logger = logging.getLogger("dalle_hf.app")
MAX_LOG_LINE = 300  # characters of a log message; the pipeline's truncation warning quotes a 1,000-character prompt


def short_lines(record: logging.LogRecord) -> bool:
    """A logging filter: a message (not a traceback) on one line of at most MAX_LOG_LINE characters, so that what a
    client sends cannot flood the server log."""
    message = " ".join(record.getMessage().split())
    if len(message) > MAX_LOG_LINE:
        message = message[: MAX_LOG_LINE - 1] + "…"
    record.msg, record.args = message, None
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="The dalle-hf Gradio app.")
    parser.add_argument("--model", action="append", default=None, metavar="DIR_OR_REPO_ID",
                        help=f"A converted model (`dalle-hf convert-dalle-mini --out DIR`) or any saved pipeline: a "
                             f"folder or a Hub repo id; repeatable; listed first (also: ${MODELS_ENV}, "
                             "comma-separated).")
    parser.add_argument("--checkpoints", default=None,
                        help=f"Folder of models, or one model folder (default: ${CHECKPOINTS_ENV} or checkpoints/).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="Address to bind (default: $GRADIO_SERVER_NAME or 127.0.0.1; 0.0.0.0 to serve a network).")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                        help="Port (default: $GRADIO_SERVER_PORT or 7860).")
    parser.add_argument("--concurrency", type=int, default=2, help="Requests sampled at once (they share the CPU).")
    parser.add_argument("--max-queue", type=int, default=24, help="Requests waiting beyond that; more are refused.")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per request (default: CPU cores // concurrency, at least 1).")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="Where the models sample (default auto: cuda when torch sees a GPU, else cpu).")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="The models' dtype (default: as saved on the CPU; on CUDA float16 for DALL·E mini / "
                             "Mega, as saved for the others); float16 needs --device cuda.")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_queue < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--concurrency, --max-queue and --threads must be >= 1")
    try:  # a device that is not there, or a bad --model, stops the start with its name, before anything loads
        args.device = resolve_device(args.device, torch.cuda.is_available())
        check_precision(args.dtype, "none", args.device)
        args.models = find_models(checkpoints_root(args.checkpoints), model_specs(args.model))
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    args = parse_args(argv)
    # What a user reads at start: our own lines (what loaded, from where, how fast) and Gradio's URL. Libraries log
    # at WARNING and up (httpx logs every request at INFO), and the per-file weight-loading bars are off.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(short_lines)
    logger.setLevel(logging.INFO)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    limit_malloc_arenas()
    # Concurrent requests each get their share of the cores: oversubscribed OpenMP threads spin against each
    # other (measured here: 16 candidates took 4.4 s with 1 thread, 117 s with 2 on 2 busy cores).
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.concurrency))
    use_device(args.device, args.dtype)
    root, models = checkpoints_root(args.checkpoints), args.models
    if not models:
        logger.warning(no_checkpoint_message(root) + " Starting anyway.")
    else:
        name = next(iter(models))
        logger.info("Models: %s", ", ".join(models))  # one line each for where they are: the log cuts long lines
        for model_name, path in models.items():
            logger.info("%s: %s", model_name, path)
        try:
            model = load_model(models[name], name)  # warm: the first request does not wait for it
            logger.info("%s: %d x %d image codes, %d px; on %s, %d torch thread(s)", name, model.grid_size,
                        model.grid_size, model.image_size, args.device, torch.get_num_threads())
        except Exception:
            logger.exception("Loading %s failed; the app starts and reports it on each request", name)
    demo = build_demo(root, models)
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size=MAX_FILE_SIZE, theme=gr.themes.Soft(),
                css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
