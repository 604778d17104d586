"""Latency of one caption: one JPEG in, one caption out, at real size on this CPU.

CLIP ViT-B/32 and GPT-2 small with random weights (pipeline/pin/realsize.py's
builders), the pipeline's default mapper (transformer, prefix 10), greedy and beam 3,
exactly 20 new tokens (min_new_tokens = max_new_tokens: random weights would stop
anywhere, so every backend does the same work). Each backend captions the same
images one at a time, from the JPEG's bytes to the caption's text, in interleaved
order (a load change on a shared machine slows all alike):

  torch_fp32   our path (``capline caption``'s code: Preprocessor, CLIP, decode_batch) in fp32
  torch_auto   the same in the precision ``auto`` picks here (bf16 weights on avx512_bf16/AMX)
  onnx_fp32    ``capline export --format onnx`` run by ``capline caption`` (ONNX Runtime)
  onnx_int8    the same with ``--quantize int8``
  hf           the reference: CLIP's image processor and model, the mapper, transformers'
               ``generate(inputs_embeds=...)``, fp32, one image at a time

It prints p50/p95 per backend and mode, how many captions equal torch fp32's, the
CPU flags, and one decoding step's time against the bound set by reading the
decoder's weights once per token at the measured memory bandwidth. The last line
is a JSON object.

    python bench/latency.py [--images 50] [--threads 1] [--workdir /tmp/capline-latency] [--skip-hf]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.caption.run import load_onnx_backend, load_torch_backend
from pipeline.core.params import Decoding, MapperParams
from pipeline.text.decoding import decode_batch

TOKENS = 20
MODES = {"greedy": Decoding(num_beams=1, min_new_tokens=TOKENS, max_new_tokens=TOKENS),
         "beam3": Decoding(num_beams=3, min_new_tokens=TOKENS, max_new_tokens=TOKENS)}
CAPTIONS = ["a dog runs on the grass", "two people ride bikes down a street", "a plate of food on a table",
            "a red bus parked by the road", "a cat sleeps on a sofa"]


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return {"cpu": model, **{f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")}}


def build(workdir: Path) -> Path:
    """The real-size model folder (built once per workdir) and its two ONNX exports."""
    from pipeline.embed.preprocess import Preprocessor
    from pipeline.export.onnx import export_onnx
    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.pretrained import image_processor_class, load_gpt, model_identity
    from pipeline.pin.realsize import build_realsize_clip, build_realsize_gpt

    model_dir = workdir / "model"
    if not (model_dir / "captioner.json").exists():
        build_realsize_clip(workdir / "clip", CAPTIONS)
        build_realsize_gpt(workdir / "gpt", CAPTIONS)
        model_id, revision = model_identity(workdir / "clip")
        pre = Preprocessor.from_processor(image_processor_class().from_pretrained(workdir / "clip"))
        features = {"model_id": model_id, "model_revision": revision, "output": "image_embeds",
                    "dtype": "float32", "normalized": True, "preprocess": pre.describe(), "dim": 512}
        gpt, tok = load_gpt(workdir / "gpt")
        torch.manual_seed(0)
        model = ClipCaptioner.from_settings(MapperParams().model_dump(), 512, gpt, tok, features=features)
        model.save(model_dir, clip_dir=workdir / "clip")
    for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
        if not (workdir / name / "onnx.json").exists():
            t = time.perf_counter()
            export_onnx(model_dir, workdir / name, quantize=quantize)
            print(f"exported {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return model_dir


def jpegs(n: int) -> list[bytes]:
    """``n`` 640x480 JPEGs: smooth colour fields plus noise (seeded)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        yy, xx = np.mgrid[0:480, 0:640]
        base = rng.integers(0, 255, size=(2, 3))
        field = base[0] + (base[1] - base[0]) * (xx / 640.0)[..., None]
        arr = np.clip(field + (yy / 480.0)[..., None] * 40 + rng.normal(0, 20, (480, 640, 3)), 0, 255)
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def record_ids(model) -> list:
    """Make ``model.decode`` keep the token ids it decodes: with random weights most ids fall
    outside the small BPE vocabulary and decode to nothing, so captions are compared as ids."""
    seen: list = []
    decode = model.decode

    def keeping(ids):
        seen.append(ids[0].tolist())
        return decode(ids)

    model.decode = keeping
    return seen


class Ours:
    """Our caption path (torch or ONNX Runtime): bytes -> Preprocessor -> CLIP -> decode_batch."""

    def __init__(self, model, embedder) -> None:
        self.model, self.embedder = model, embedder
        self.ids = record_ids(model)

    def __call__(self, data: bytes, d: Decoding) -> str:
        with torch.inference_mode():
            vectors = self.embedder([self.embedder.pre.to_uint8(data)])
            return decode_batch(self.model, vectors, d, ["image"], max_new_tokens=TOKENS)[0][0].text


class Reference:
    """The plain transformers way: image processor, CLIP, mapper, generate; fp32."""

    def __init__(self, model_dir: Path) -> None:
        from pipeline.models.captioner import ClipCaptioner
        from pipeline.models.pretrained import image_processor_class, load_clip

        self.captioner = ClipCaptioner.load(model_dir)
        self.clip, _ = load_clip(model_dir / "clip")
        self.processor = image_processor_class().from_pretrained(model_dir / "clip")
        self.ids = record_ids(self.captioner)

    @torch.inference_mode()
    def __call__(self, data: bytes, d: Decoding) -> str:
        from PIL import Image

        pixels = self.processor(images=Image.open(io.BytesIO(data)).convert("RGB"), return_tensors="pt")
        vector = torch.nn.functional.normalize(self.clip(**pixels).image_embeds, dim=-1)
        c = self.captioner
        ids = c.gpt.generate(inputs_embeds=c.prefix(vector), attention_mask=torch.ones(1, c.prefix_length,
                             dtype=torch.long), num_beams=d.num_beams, min_new_tokens=TOKENS,
                             max_new_tokens=TOKENS, do_sample=False, eos_token_id=c.eos_token_id,
                             pad_token_id=c.pad_token_id)
        return c.decode(ids)[0]


def memory_bandwidth() -> float:
    """GB/s of reading a 512 MiB array (best of 5): what one token's weight read is bound by."""
    a = np.ones(1 << 27, dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9


def step_time(backend, steps: int = 20) -> float:
    """Seconds of one greedy decoding step (1 row, 30 positions of past), without generate: the median."""
    from transformers.cache_utils import DynamicCache

    model = backend.model
    prefix = model.prefix(torch.zeros(1, model.clip_dim))
    token = torch.tensor([[model.eos_token_id]])
    times = []
    with torch.inference_mode():
        for _ in range(steps):
            if hasattr(model.gpt, "step"):
                cache = DynamicCache()
                model.gpt.step(prefix, None, cache)
                for _ in range(20):
                    model.gpt.step(None, token, cache)
                t = time.perf_counter()
                model.gpt.step(None, token, cache)
            else:
                out = model.gpt(inputs_embeds=prefix, use_cache=True)
                cache = out.cache
                for _ in range(20):
                    cache = model.gpt(input_ids=token, cache=cache, use_cache=True).cache
                t = time.perf_counter()
                model.gpt(input_ids=token, cache=cache, use_cache=True)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def decoder_bytes(folder: Path) -> int:
    """Bytes of weights a step reads: the decoder graph's initializers but the lookup table (one row read)."""
    import onnx

    graph = onnx.load(str(folder / "decoder.onnx")).graph
    sizes = {i.name: len(i.raw_data) or 4 * int(np.prod(i.dims)) for i in graph.initializer}
    return sum(sizes.values()) - max(v for k, v in sizes.items() if k.endswith("wte.weight"))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    # One thread by default: on a shared machine a second thread mostly waits for a busy core.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/capline-latency"))
    parser.add_argument("--skip-hf", action="store_true", help="leave out the transformers reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    print("cpu:", json.dumps(flags), flush=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = build(args.workdir)
    max_pixels = 89_478_485
    backends = {
        "torch_fp32": Ours(*load_torch_backend(model_dir, None, "cpu", "fp32", max_pixels)),
        "torch_auto": Ours(*load_torch_backend(model_dir, None, "cpu", "auto", max_pixels)),
        "onnx_fp32": Ours(*load_onnx_backend(args.workdir / "onnx_fp32", None, "cpu", "auto", max_pixels,
                                               args.threads)),
        "onnx_int8": Ours(*load_onnx_backend(args.workdir / "onnx_int8", None, "cpu", "auto", max_pixels,
                                               args.threads)),
    }
    if not args.skip_hf:
        backends["hf_per_image"] = Reference(model_dir)
    images = jpegs(args.images)
    times = {m: {b: [] for b in backends} for m in MODES}
    ids = {m: {b: [] for b in backends} for m in MODES}
    for mode, d in MODES.items():
        for b in backends.values():
            b(images[0], d)  # warm-up: first-call allocations and graph set-up
        for i, data in enumerate(images):
            for name, backend in backends.items():
                t = time.perf_counter()
                backend(data, d)
                times[mode][name].append(time.perf_counter() - t)
                ids[mode][name].append(backend.ids[-1])
        for name in backends:
            same = sum(a == b for a, b in zip(ids[mode][name], ids[mode]["torch_fp32"]))
            print(f"{mode:6s} {name:12s} p50 {pct(times[mode][name], 50):7.0f} ms  p95 "
                  f"{pct(times[mode][name], 95):7.0f} ms  token ids equal to torch_fp32's: {same}/{len(images)}",
                  flush=True)
    bandwidth = memory_bandwidth()
    steps = {name: step_time(backends[name]) * 1000 for name in ("torch_fp32", "onnx_fp32", "onnx_int8")}
    bound = {name: decoder_bytes(args.workdir / name) / bandwidth / 1e6 for name in ("onnx_fp32", "onnx_int8")}
    print(f"memory bandwidth {bandwidth:.1f} GB/s; one greedy step (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
          + "; weight-read bound (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in bound.items()), flush=True)
    g = {name: pct(v, 50) for name, v in times["greedy"].items()}
    result = {
        "images": args.images, "threads": args.threads, "tokens": TOKENS, **flags,
        "p50_ms_torch_fp32": round(g["torch_fp32"], 1), "p50_ms_torch_auto": round(g["torch_auto"], 1),
        "p50_ms_onnx_fp32": round(g["onnx_fp32"], 1), "p50_ms_onnx_int8": round(g["onnx_int8"], 1),
        "p50_ms_hf_per_image": round(g["hf_per_image"], 1) if "hf_per_image" in g else None,
        "ratio_int8_vs_torch_fp32": round(g["torch_fp32"] / g["onnx_int8"], 2),
        "p95_ms_greedy": {k: round(pct(v, 95), 1) for k, v in times["greedy"].items()},
        "p50_ms_beam3": {k: round(pct(v, 50), 1) for k, v in times["beam3"].items()},
        "p95_ms_beam3": {k: round(pct(v, 95), 1) for k, v in times["beam3"].items()},
        "equal_to_torch_fp32": {m: {k: sum(a == b for a, b in zip(v, ids[m]["torch_fp32"])) for k, v in t.items()}
                                for m, t in ids.items()},
        "step_ms": {k: round(v, 2) for k, v in steps.items()},
        "step_bound_ms": {k: round(v, 2) for k, v in bound.items()},
        "memory_gb_s": round(bandwidth, 1),
        "load_average": [round(x, 1) for x in os.getloadavg()],  # other jobs on a shared machine
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
