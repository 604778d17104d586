"""`capline serve` under load: micro-batching against one-at-a-time serving, in the same run.

The server runs as its own process (`capline serve`, on 127.0.0.1 at a free port),
once with micro-batching (--max-batch, --max-wait-ms) and once with --max-batch 1
(one image per forward pass: one-at-a-time serving), on the same model folder. Each
time, N client threads in this process send a fixed number of POST /caption
requests (image bytes, keep-alive connections) over a few distinct photo-like
JPEGs, after a short warm-up. A request that does not get 200 counts in
``good_request_errors``. Prints p50/p95 latency and throughput of both modes, the
batch sizes the server formed (from /metrics), the CPU, and last a JSON line with
``ratio_vs_one_at_a_time`` (throughput ratio) and ``good_request_errors``.

    python bench/serve.py                                   # demo-size model, 16 clients, 256 requests
    python bench/serve.py --size realsize --requests 64     # ViT-B/32 + GPT-2 small (random weights)
    python bench/serve.py --model data/model                # a trained model folder
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as `python bench/serve.py` from anywhere

from pipeline.serve.metrics import parse_metrics  # noqa: E402
from tests.helpers.images import photo_jpeg  # noqa: E402
from tests.helpers.serve import batch_counts, make_served_model, request  # noqa: E402

SIMD = re.compile(r"^(sse4_2|avx|avx2|fma|f16c|avx512\w*|avx_vnni|amx\w*)$")


def cpu() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.*)$", text, re.MULTILINE)
    flags = re.search(r"^flags\s*:\s*(.*)$", text, re.MULTILINE)
    flags = flags.group(1).split() if flags else []
    return {"model": model.group(1) if model else platform.processor(), "cores": os.cpu_count(),
            "simd_flags": [f for f in flags if SIMD.match(f)], "flags": flags}


def build_model(size: str, root: Path) -> tuple[Path, str]:
    """A model folder to serve (random weights: the compute of the real thing) and a description."""
    captions = ["a red circle on the left", "two blue squares and a green triangle", "a big yellow disc"] * 20
    clip, gpt = root / "clip", root / "gpt"
    if size == "demo":
        from pipeline.core.params import parse_params
        from pipeline.pin.demo import build_demo_clip, build_demo_gpt

        p = parse_params({})
        # No pre-training: the same network and compute as `capline models` builds for the demo.
        build_demo_clip(clip, p.clip.demo.model_copy(update={"pretrain_steps": 0, "pretrain_text_steps": 0}),
                        p.data.demo.image_size)
        build_demo_gpt(gpt, p.gpt.demo, captions)
        c, g = p.clip.demo, p.gpt.demo
        what = (f"demo: CLIP ViT hidden {c.hidden_size}, {c.layers} layers, patch {c.patch_size}, "
                f"{p.data.demo.image_size} px; GPT-2 n_embd {g.n_embd}, {g.n_layer} layers; prefix 10")
    else:
        from pipeline.pin.realsize import build_realsize_clip, build_realsize_gpt

        build_realsize_clip(clip, captions)
        build_realsize_gpt(gpt, captions)
        what = "realsize: CLIP ViT-B/32 (224 px) + GPT-2 small (124M), random weights; prefix 10"
    return make_served_model(root / "model", clip, gpt, prefix_length=10), what


def start_server(model: Path, args, max_batch: int, max_wait_ms: float, log: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "stages.cli", "serve", "--model", str(model), "--port", "0", "--device",
           args.device, "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms),
           "--max-queue", str(max(256, 2 * args.clients))]
    for key in ("num_beams", "max_new_tokens"):
        if getattr(args, key) is not None:
            cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=log.parent, stderr=err, stdout=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    for _ in range(6000):  # up to 5 min for a real-size model to load
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start:\n" + log.read_text())


def load(port: int, images: list[bytes], clients: int, total: int, timeout: float) -> dict:
    """``total`` requests from ``clients`` threads (keep-alive); latencies and failures."""
    lock = threading.Lock()
    sent = [0]
    latencies: list[float] = []
    failures: list[str] = []

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while True:
            with lock:
                if sent[0] >= total:
                    break
                i = sent[0]
                sent[0] += 1
            start = time.perf_counter()
            try:
                reply = request(port, "POST", "/caption", images[i % len(images)], "image/jpeg", conn=conn)
                ok = reply.status == 200
                why = f"HTTP {reply.status}: {reply.body[:200]!r}"
            except (OSError, http.client.HTTPException) as err:
                ok, why = False, f"{type(err).__name__}: {err}"
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            with lock:
                (latencies.append(time.perf_counter() - start) if ok else failures.append(why))
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    return {"requests": total, "ok": len(latencies), "errors": len(failures), "first_errors": failures[:3],
            "p50_ms": pct(0.50), "p95_ms": pct(0.95), "throughput_rps": round(len(latencies) / wall, 2),
            "wall_s": round(wall, 2)}


def run_mode(name: str, model: Path, args, images: list[bytes], max_batch: int, max_wait_ms: float,
             work: Path) -> dict:
    proc, port = start_server(model, args, max_batch, max_wait_ms, work / f"{name}.log")
    try:
        load(port, images, min(args.clients, 4), args.warmup, args.timeout)  # first passes are slow
        before = batch_counts(parse_metrics(request(port, "GET", "/metrics").body.decode()))
        result = load(port, images, args.clients, args.requests, args.timeout)
        after = batch_counts(parse_metrics(request(port, "GET", "/metrics").body.decode()))
        result["batch_sizes"] = {s: after[s] - before.get(s, 0) for s in sorted(after) if after[s] - before.get(s, 0)}
        result["max_batch"], result["max_wait_ms"] = max_batch, max_wait_ms
    finally:
        proc.terminate()
        proc.wait(60)
    print(f"{name:>15}: {result['ok']}/{result['requests']} ok, p50 {result['p50_ms']} ms, "
          f"p95 {result['p95_ms']} ms, {result['throughput_rps']} req/s, batches {result['batch_sizes']}",
          flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a model folder to serve [default: build one of --size]")
    ap.add_argument("--size", choices=["demo", "realsize"], default="demo")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=256, help="timed requests per mode")
    ap.add_argument("--warmup", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--num-beams", type=int, default=None, help="[default: the model folder's]")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="[default: the model folder's]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    args = ap.parse_args()

    images = [photo_jpeg(seed, 640, 480) for seed in range(8)]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        if args.model is not None:
            model, what = args.model, f"model folder {args.model}"
        else:
            t = time.perf_counter()
            model, what = build_model(args.size, work)
            print(f"built the {args.size} model in {time.perf_counter() - t:.1f} s: {what}", flush=True)
        batched = run_mode("micro-batched", model, args, images, args.max_batch, args.max_wait_ms, work)
        single = run_mode("one-at-a-time", model, args, images, 1, 0.0, work)
    info = cpu()
    print(f"cpu: {info['model']}, {info['cores']} cores, SIMD flags {' '.join(info['simd_flags'])}")
    ratio = batched["throughput_rps"] / single["throughput_rps"] if single["throughput_rps"] else None
    print(json.dumps({
        "ratio_vs_one_at_a_time": round(ratio, 2) if ratio else None,
        "good_request_errors": batched["errors"] + single["errors"],
        "clients": args.clients, "requests_per_mode": args.requests, "model": what, "device": args.device,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "micro_batched": batched, "one_at_a_time": single,
        "cpu_model": info["model"], "cpu_cores": info["cores"], "cpu_simd_flags": info["simd_flags"],
        "cpu_flags": info["flags"],
    }))


if __name__ == "__main__":
    main()
