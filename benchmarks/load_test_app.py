"""Load test of the Gradio app: concurrent `gradio_client` clients against `python app.py` on 127.0.0.1.

    OMP_NUM_THREADS=1 python benchmarks/load_test_app.py [--clients 8] [--requests 3] [--size tiny|shapes]
    OMP_NUM_THREADS=1 python benchmarks/load_test_app.py --cancel-cycles 20 [--checkpoint checkpoints/dalle-shapes]

Starts the app on a free port (the checkpoint if given and present, else a random-weight pipeline of `--size`, saved
to a temporary folder), warms it up with one request, then runs `--clients` threads, each with its own `Client`,
sending `--requests` text-to-image requests (every other one a variation of the first grid's best image). Prints
how many succeeded, request latencies, and the server's resident memory (Linux /proc): after the warm-up, at its
peak, and after the load once idle. Exits 1 if a request failed or the memory did not settle within `--tolerance`.

`--cancel-cycles N` instead cancels requests (the leak it guards against: each cancelled request used to keep its
KV cache, about 100 MB with the shipped model, until a full garbage collection): on the shipped checkpoint unless
`--checkpoint` says otherwise, after one complete request as warm-up, N times: submit `/generate`, wait for the
first partial grid (the server is sampling), `job.cancel()`, wait for the server to go idle, read its RSS. Prints
the series and exits 1 if the last value is more than `--cancel-tolerance-mb` above the warmed-up start.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_app import SHAPES_CHECKPOINT, free_port, save_random_pipeline, start_app, stop_app  # noqa: E402


def rss_mb(pid: int) -> float:
    """Resident memory of `pid` in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.05)


def cancel_cycles(args):
    """`--cancel-cycles`: RSS of the server after each of N requests cancelled while sampling."""
    from gradio_client import Client

    checkpoint = Path(args.checkpoint or SHAPES_CHECKPOINT)
    if not (checkpoint / "model_index.json").is_file():
        sys.exit(f"{checkpoint} is not a saved pipeline (no model_index.json)")
    guidance = json.loads((checkpoint / "model_index.json").read_text()).get("default_guidance_scale", 1.0)
    prompt = "a blue square and a yellow triangle"
    with tempfile.TemporaryDirectory() as tmp:
        log, port = open(Path(tmp) / "app.log", "w"), free_port()
        proc = start_app(checkpoint, port, "--concurrency", str(args.concurrency), log=log)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            client.predict(None, prompt, args.candidates, args.keep, 1.0, 0, 1.0, guidance, 0, False,
                           api_name="/generate")  # warm-up: one complete request
            time.sleep(2)
            start_rss, series = rss_mb(proc.pid), []
            for cycle in range(args.cancel_cycles):
                job = client.submit(None, prompt, args.candidates, args.keep, 1.0, 0, 1.0, guidance, cycle + 1, False,
                                    api_name="/generate")
                wait_for(lambda: any(out[0] and out[0][0]["caption"] == "sampling…" for out in job.outputs()), 120,
                         "partial grid")  # the server is sampling
                job.cancel()
                wait_for(job.done, 60, "end of the cancelled job")
                time.sleep(2)  # the sampling thread stops at its next token (milliseconds); then the server is idle
                series.append(rss_mb(proc.pid))
        finally:
            stop_app(proc)
            log.close()
            server_log = (Path(tmp) / "app.log").read_text()

    growth = series[-1] - start_rss
    print(f"cancel test: {args.cancel_cycles} requests cancelled while sampling (job.cancel() after the first partial "
          f"grid; {args.candidates} candidates, guidance {guidance}), checkpoint {checkpoint}, app --concurrency "
          f"{args.concurrency}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"  server RSS: {start_rss:.0f} MB after a warm-up request; after each cancel: "
          + ", ".join(f"{r:.0f}" for r in series) + " MB")
    print(f"  last - start: {growth:+.0f} MB (tolerance {args.cancel_tolerance_mb:.0f} MB); max {max(series):.0f} MB")
    if "Traceback" in server_log:
        print("  server log (tail):\n" + server_log[-4000:])
    ok = growth <= args.cancel_tolerance_mb
    print("OK" if ok else "NOT OK")
    sys.exit(0 if ok else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="A saved pipeline; default: random weights of --size.")
    parser.add_argument("--size", default="tiny", choices=["tiny", "shapes"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=3, help="Requests per client.")
    parser.add_argument("--candidates", type=int, default=None,
                        help="Per request; default 8, and 16 (the app's default) with --cancel-cycles.")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2, help="The app's --concurrency.")
    parser.add_argument("--rounds", type=int, default=1, help="Repeat the load; RSS is printed after each round.")
    parser.add_argument("--tolerance", type=float, default=0.15, help="Allowed memory growth after the load.")
    parser.add_argument("--cancel-cycles", type=int, default=0,
                        help="Instead of the load: cancel this many requests while sampling and print the RSS series.")
    parser.add_argument("--cancel-tolerance-mb", type=float, default=50.0,
                        help="Allowed RSS growth after the cancel cycles, in MB.")
    args = parser.parse_args()
    args.candidates = args.candidates or (16 if args.cancel_cycles else 8)
    if args.cancel_cycles:
        return cancel_cycles(args)

    from gradio_client import Client, handle_file

    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint and (Path(args.checkpoint) / "model_index.json").is_file():
            checkpoint, what = Path(args.checkpoint), f"checkpoint {args.checkpoint}"
        else:
            checkpoint, what = (
                save_random_pipeline(Path(tmp) / "random", args.size),
                f"random weights, {args.size} size",
            )
        port = free_port()
        queue_size = args.clients * 2
        log = open(Path(tmp) / "app.log", "w")
        proc = start_app(checkpoint, port, "--concurrency", str(args.concurrency), "--max-queue", str(queue_size),
                         log=log)
        url = f"http://127.0.0.1:{port}/"
        try:
            warm = Client(url, verbose=False)
            first = warm.predict(None, "a red circle", args.candidates, args.keep, 1.0, 0, 1.0, 1.0, 0, False,
                                 api_name="/generate")
            reference = shutil.copy(first[0][0]["image"], Path(tmp) / "reference.png")  # the client rewrites its
            # downloads in place when a later result has the same content
            # Warm-up: both tasks, as many at once as the app runs, so the starting level is a warmed server's.
            warm_jobs = [warm.submit(None, handle_file(reference), "", 1, args.candidates, args.keep, 1.0, 0, 1.0, 1.0,
                                     0, False, api_name="/variations") for _ in range(args.concurrency)]
            warm_jobs += [warm.submit(None, "a red circle", args.candidates, args.keep, 1.0, 0, 1.0, 1.0, 0, False,
                                      api_name="/generate") for _ in range(args.concurrency)]
            [job.result() for job in warm_jobs]
            time.sleep(1)
            start_rss = rss_mb(proc.pid)
            peak_rss, stop_sampling = [start_rss], threading.Event()

            def sample_memory():
                while not stop_sampling.is_set():
                    peak_rss[0] = max(peak_rss[0], rss_mb(proc.pid))
                    time.sleep(0.1)

            latencies, failures = [], []
            lock = threading.Lock()

            def client_loop(index: int):
                client = Client(url, verbose=False)
                for r in range(args.requests):
                    begin = time.perf_counter()
                    try:
                        if r % 2:
                            out = client.predict(None, handle_file(reference), "", 1, args.candidates, args.keep,
                                                 1.0, 0, 1.0, 1.0, index * 100 + r, False, api_name="/variations")
                        else:
                            out = client.predict(None, "a blue square and a yellow triangle", args.candidates,
                                                 args.keep, 1.0, 0, 1.0, 1.0, index * 100 + r, False,
                                                 api_name="/generate")
                        assert len(out[0]) == args.keep, out
                        with lock:
                            latencies.append(time.perf_counter() - begin)
                    except Exception as e:  # counted and reported, never hidden
                        with lock:
                            failures.append(f"client {index} request {r}: {type(e).__name__}: {e}")

            monitor = threading.Thread(target=sample_memory, daemon=True)
            monitor.start()
            begin, after_rounds = time.perf_counter(), []
            for _ in range(args.rounds):
                threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                time.sleep(3)  # idle: let the server finish its bookkeeping
                after_rounds.append(rss_mb(proc.pid))
            wall = time.perf_counter() - begin
            stop_sampling.set()
            monitor.join()
            end_rss = after_rounds[-1]
        finally:
            stop_app(proc)
            log.close()
            server_log = (Path(tmp) / "app.log").read_text()

    total = args.clients * args.requests * args.rounds
    print(f"load test: {args.rounds} x {args.clients} clients x {args.requests} requests "
          f"({args.candidates} candidates -> {args.keep}, "
          f"text and variations), {what}, app --concurrency {args.concurrency} --max-queue {queue_size}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"  succeeded {len(latencies)}/{total} in {wall:.1f} s; "
          f"latency median {statistics.median(latencies or [0]):.2f} s, "
          f"max {max(latencies or [0]):.2f} s")
    growth = (end_rss - start_rss) / start_rss
    rounds = ", ".join(f"{r:.0f}" for r in after_rounds)
    print(f"  server RSS: start {start_rss:.0f} MB, peak {peak_rss[0]:.0f} MB, after each round {rounds} MB "
          f"({growth:+.1%} at the end)")
    for failure in failures:
        print("  FAILED", failure)
    if failures or "Traceback" in server_log:
        print("  server log (tail):\n" + server_log[-4000:])
    ok = not failures and len(latencies) == total and growth <= args.tolerance
    print("OK" if ok else "NOT OK")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
