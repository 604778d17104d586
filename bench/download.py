"""Benchmark: capline's download stage against img2dataset, same URLs, same run.

One loopback server (a subprocess) serves photo-like 640x480 JPEGs with about
20 ms of latency per request. Both tools fetch the same URL list with the same
number of concurrent fetches, resize the shorter side to the same size and
write webdataset tar shards. img2dataset lives in its own virtual environment
(``bench/.venv-img2dataset``, created on first use: ``python -m venv`` +
``pip install img2dataset``). The last line printed is a JSON object.

    python bench/download.py [--images 2000] [--workers 32] [--latency 0.02]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
I2D_VENV = BENCH / ".venv-img2dataset"
sys.path.insert(0, str(ROOT))


def photo_like(rng: np.random.Generator, w: int = 640, h: int = 480) -> bytes:
    """A smooth colour field with shapes and mild noise: compresses like a photo."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(30, 90) + rng.uniform(0, 6)),
                     np.cos(y / rng.uniform(30, 90) + rng.uniform(0, 6)),
                     np.sin((x + y) / rng.uniform(40, 120))], -1) * 80 + 128
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(20, 120)
        base[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 6, base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def ensure_img2dataset() -> Path:
    py = I2D_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(I2D_VENV)], check=True)
        (I2D_VENV / ".gitignore").write_text("*\n")
    if subprocess.run([str(py), "-c", "import img2dataset"], capture_output=True).returncode:
        subprocess.run([str(py), "-m", "pip", "install", "-q", "img2dataset"], check=True)
    return py


def start_server(folder: Path, latency: float) -> tuple[subprocess.Popen, int]:
    # The tests' loopback server, run as the module tests.helpers.loopback from the project root.
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.loopback", str(folder), str(latency)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    return proc, port


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"{cmd[1]} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_breakdown(images: list[bytes], size: int) -> dict:
    """Single-thread cost per image of each CPU step of ours (ms)."""
    from pipeline.download.image import process_image
    from pipeline.download.shards import _member  # noqa: F401  (tar cost measured below)
    import tarfile

    t = time.perf_counter()
    for data in images:
        Image.open(io.BytesIO(data)).load()
    full_decode = (time.perf_counter() - t) / len(images) * 1e3
    t = time.perf_counter()
    outs = [process_image(d, 89_478_485, size, 95)[0] for d in images]
    process = (time.perf_counter() - t) / len(images) * 1e3
    t = time.perf_counter()
    with tempfile.TemporaryFile() as f, tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i, o in enumerate(outs):
            tar.addfile(*_member(f"{i:09d}.jpg", o))
    write = (time.perf_counter() - t) / len(images) * 1e3
    return {"full_decode_640x480_ms": round(full_decode, 3),
            "draft_decode_resize_encode_ms": round(process, 3), "tar_write_ms": round(write, 3)}


def fetch_only(port: int, args: argparse.Namespace) -> dict:
    """Our HTTP path alone (no decode): its rate and client CPU per request."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.download.fetch import Fetcher
    from pipeline.core.params import DownloadParams

    fetcher = Fetcher(DownloadParams(workers=args.workers, per_host=args.workers))
    urls = [f"http://127.0.0.1:{port}/{i % args.distinct}.jpg?f={i}" for i in range(args.images)]
    cpu, wall = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(fetcher.fetch, urls))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"fetch_only_per_s": round(len(urls) / wall, 1), "fetch_cpu_ms": round(cpu / len(urls) * 1e3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="URLs fetched by each tool")
    ap.add_argument("--distinct", type=int, default=100, help="distinct JPEGs behind those URLs")
    ap.add_argument("--workers", type=int, default=32, help="concurrent fetches (img2dataset: 2 processes x workers/2 threads)")
    ap.add_argument("--latency", type=float, default=0.02, help="server latency per request, seconds")
    ap.add_argument("--resize", type=int, default=256, help="shorter side after resize")
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=2, help="alternate runs of each tool; the best of each counts")
    args = ap.parse_args()

    i2d_python = ensure_img2dataset()
    from pipeline.prepare.run import prepare
    from pipeline.core.params import DataParams

    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        served = tmp / "served"
        served.mkdir()
        images = [photo_like(rng) for _ in range(args.distinct)]
        for i, data in enumerate(images):
            (served / f"{i}.jpg").write_bytes(data)
        server, port = start_server(served, args.latency)
        try:
            # Each URL is distinct (query string), so nothing can be cached between requests.
            lines = ["caption\turl"] + [f"photo {i}\thttp://127.0.0.1:{port}/{i % args.distinct}.jpg?n={i}"
                                        for i in range(args.images)]
            (tmp / "urls.tsv").write_text("\n".join(lines) + "\n")
            prepare(tmp / "source", DataParams(source="tsv", annotations=str(tmp / "urls.tsv")))
            i2d_runs, our_runs = [], []
            for r in range(args.repeat):  # alternating, so both see the same machine load
                i2d_runs.append(run_json([str(i2d_python), str(BENCH / "_download_img2dataset.py"), str(tmp / "urls.tsv"),
                                          str(tmp / f"i2d{r}"), "2", str(args.workers // 2), str(args.resize),
                                          str(args.per_shard)]))
                our_runs.append(run_json([sys.executable, str(BENCH / "_download_ours.py"), str(tmp / "source"),
                                          str(tmp / f"ours{r}"), str(args.workers), str(args.resize), str(args.per_shard)]))
            fetch = fetch_only(port, args)
            i2d = max(i2d_runs, key=lambda r: r["ok"] / r["seconds"])
            ours = max(our_runs, key=lambda r: r["ok"] / r["seconds"])
        finally:
            server.terminate()
            server.wait()
        breakdown = cpu_breakdown(images, args.resize)
    ours_rate = ours["ok"] / ours["seconds"]
    i2d_rate = i2d["ok"] / i2d["seconds"]
    print(f"ours:       {ours['ok']}/{args.images} ok in {ours['seconds']:.2f} s = {ours_rate:.1f} images/s")
    print(f"img2dataset: {i2d['ok']}/{args.images} ok in {i2d['seconds']:.2f} s = {i2d_rate:.1f} images/s "
          f"(shard window; {i2d['wall_seconds']:.2f} s with its start-up)")
    print(f"network floor: {args.workers} concurrent / {args.latency * 1e3:.0f} ms = {args.workers / args.latency:.0f} images/s")
    print("cpu per image, one thread:", json.dumps(breakdown))
    print("our HTTP path alone:", json.dumps(fetch))
    print(json.dumps({"bench": "download", "unit": "images/s", "ours": round(ours_rate, 1),
                      "img2dataset": round(i2d_rate, 1), "ratio_vs_img2dataset": round(ours_rate / i2d_rate, 3),
                      "images": args.images, "workers": args.workers, "latency_s": args.latency,
                      "resize": args.resize, "ok_ours": ours["ok"], "ok_img2dataset": i2d["ok"], **breakdown, **fetch}))


if __name__ == "__main__":
    main()
