"""Sampling for a request: the pipeline runs in a worker thread while the request streams partial images, stops
when the request goes away, and gives its memory back however it ends.
"""

import contextvars
import ctypes
import functools
import html
import json
import logging
import queue
import threading
import time
import traceback

import gradio as gr
import PIL.Image

logger = logging.getLogger("dalle_hf.app")

PREVIEW_INTERVAL = 0.3  # seconds between streamed partial grids: decoding them costs dVAE passes


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return None


def limit_malloc_arenas(arenas: int = 2):
    """Share glibc's malloc arenas among the server's threads. With one arena per thread (up to 8 per core), the
    sampling buffers freed in each stay mapped: measured here, 8 clients left the server 15% above its warmed-up
    memory; with 2 arenas, 1-2%. Call before the server starts its threads (like the MALLOC_ARENA_MAX env var)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-8, arenas)  # M_ARENA_MAX


def release_memory():
    """Return freed sampling buffers to the OS after a request, so a long-running server's memory settles back.
    No `gc.collect()`: it costs most of a second here."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class _Cancelled(Exception):
    """Raised inside the sampling loop when the request went away (the browser closed or the user stopped)."""


def without_tracebacks(exc: BaseException) -> BaseException:
    """`exc` ready to outlive its thread: the traceback of `exc` and of the exceptions chained to it written into a
    note on `exc` (for the log) and dropped, their frames cleared.

    A traceback holds the frames it passed through, with their locals: the sampling loop's KV cache (two 54 MB
    buffers for the shipped model). An exception kept with its traceback (in the request's queue, or in the frame
    that re-raises it) closes a reference cycle that only a full garbage collection frees, and that rarely runs
    in this app: about 100 MB per cancelled request stayed until then.
    """
    if exc.__traceback__ is not None:
        exc.add_note("Raised in the sampling thread:\n" + "".join(traceback.format_exception(exc)).rstrip())
    pending, seen = [exc], set()
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)  # frames still running (this thread's) are skipped
        e.__traceback__ = None
        pending += [e.__cause__, e.__context__]
    return exc


def stream_sampling(model, call, preview_count: int):
    """Run `call(callback_on_step_end)` in a worker thread; yield partial images of `model` (an `AppModel`) every
    `model.preview_every` tokens (at most every PREVIEW_INTERVAL s); return the pipeline output.

    The worker runs in a copy of this context, so `gr.Progress(track_tqdm=True)` follows the pipeline's progress bar.
    """
    updates, cancelled = queue.Queue(), threading.Event()
    every, total = model.preview_every, model.grid_size**2
    last_preview = [time.monotonic()]

    def callback(_pipe, _step, index, tensors):
        if cancelled.is_set():
            raise _Cancelled
        if (index + 1) % every == 0 and index + 1 < total and time.monotonic() - last_preview[0] > PREVIEW_INTERVAL:
            updates.put(("preview", model.decode_preview(tensors["image_tokens"], preview_count)))
            last_preview[0] = time.monotonic()
        return tensors

    def work():
        try:
            updates.put(("done", call(callback)))
        except BaseException as e:
            without_tracebacks(e)  # (see there: a kept traceback keeps the request's KV cache)
            if not cancelled.is_set():  # handed to the request's thread, which reports it
                updates.put(("error", e))
        finally:
            if cancelled.is_set():  # the request's thread trimmed before this one let go of the KV cache
                release_memory()

    worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="dalle-hf-sampling",
                              daemon=True)
    worker.start()
    try:
        while True:
            kind, value = updates.get()
            if kind == "preview":
                yield value
            elif kind == "done":
                return value
            else:
                try:
                    raise value
                finally:
                    del value  # its new traceback holds this frame: no cycle through the frame's locals
    finally:
        cancelled.set()  # stops the worker if the request was cancelled mid-way


def with_metadata(images: list[PIL.Image.Image], info: dict, scores: list[float] | None = None) -> list:
    """Store `info` (and the rank and score) as a PNG text chunk, so a downloaded image says how it was made.

    `info` includes a request id: gradio caches outputs under their content hash and rewrites an existing file in
    place, so two identical requests at once would otherwise share (and truncate) each other's files.
    """
    for i, image in enumerate(images):
        extra = {} if scores is None else {"rank": i + 1, "score": round(scores[i], 4)}
        image.info["dalle-hf"] = json.dumps({**info, **extra})
    return images


def sample_with_previews(model, call, preview_count: int, label: str, seed: int, notes: list[str], running: str,
                         info: dict):
    """`stream_sampling` as (gallery, seed, status) outputs with "sampling…" captions; returns the pipeline output.
    The pipelines' errors become messages for the UI, and memory is released however the request ends."""
    sampling = stream_sampling(model, call, preview_count)
    try:
        while True:
            try:
                partial = next(sampling)
            except StopIteration as stop:
                return stop.value
            partial = with_metadata(partial, {"request": info["request"], "partial": True})
            yield [(image, "sampling…") for image in partial], seed, format_status(notes, running)
    except gr.Error:
        raise
    except ValueError as e:  # the pipelines' input checks
        raise gr.Error(html.escape(str(e), quote=False)) from None
    except Exception as e:
        logger.exception("%s failed", label)
        raise gr.Error(f"{label} failed ({type(e).__name__}: {html.escape(str(e), quote=False)}). The app is still "
                       "running; try fewer candidates.", title="Generation failed") from None
    finally:
        sampling.close()
        release_memory()


def format_status(notes: list[str], summary: str) -> str:
    return "\n".join([f"- {n}" for n in notes] + ([""] if notes else []) + [summary])

