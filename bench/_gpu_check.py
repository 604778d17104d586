"""The GPU check's Python part (run it through bench/gpu_check.sh): embed, train and
generate at real size through the stage code, each beside its model-only bound.

* embed: ViT-B/32 and ViT-L/14 (random weights) on generated 640x480 JPEGs in image
  tar shards: ``embed_shards`` with decode workers against the model alone on
  tensors already on the GPU.
* train: transformer mapper (8 layers, prefix 10) + frozen GPT-2 small with a BPE
  tokenizer, bf16: ``pipeline.train.run.train`` end to end (load, train, validate,
  save), and the steady-state training step alone: samples/s, tokens/s, and MFU from
  the step's FLOPs counted by torch (FlopCounterMode) against the peak.
* generate: beam 5 in large batches through ``pipeline.generate.run.run``.
* torchrun: with two or more GPUs, ``capline train`` (DDP, NCCL) and ``capline
  generate`` under a 2-process torchrun; generate's captions must equal the
  single-process ones.

The stage code needs pydantic (the params schema); without it those parts are
skipped, saying so, and the model-only bounds still run. ``--tiny --device cpu``
runs every code path with small models on a CPU (what the test suite does).
The last line printed is a JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline.core.files import read_metrics  # noqa: E402  (the checkout, on the path above)

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
THINGS = ["dog", "cat", "bus", "pizza", "man", "woman", "bicycle", "table", "kite", "train", "horse", "clock"]
PLACES = ["on a street", "in a kitchen", "next to a window", "in a field", "on a beach", "under a tree"]

REAL = {
    "images": 8192, "unique": 512, "per_shard": 1024, "size": (640, 480), "embed_batch": 256,
    "vits": {"ViT-B/32": {}, "ViT-L/14": "VIT_L14"}, "gpt": {}, "clip_dim": 512,
    "mapper": {"type": "transformer", "prefix_length": 10, "clip_length": 10, "layers": 8, "heads": 8,
               "mlp_ratio": 2.0, "dropout": 0.0},
    "train_images": 4096, "train_batch": 256, "epochs": 2, "warmup": 10, "steady_steps": 20,
    "test_images": 1024, "gen_batch": 256, "beams": 5, "new_tokens": 20, "model_only_s": 5.0,
}
# The tiny CLIPs' text tower (built with the whole CLIP; the check embeds images only).
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TINY = {
    "images": 48, "unique": 8, "per_shard": 16, "size": (160, 120), "embed_batch": 16,
    "vits": {"ViT-B/32": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              patch_size=16, image_size=64, projection_dim=32, text=TINY_TEXT),
             "ViT-L/14": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=2,
                              patch_size=8, image_size=64, projection_dim=32, text=TINY_TEXT)},
    "gpt": dict(n_embd=64, n_layer=2, n_head=2, n_positions=64), "clip_dim": 32,
    "mapper": {"type": "transformer", "prefix_length": 4, "clip_length": 4, "layers": 2, "heads": 2,
               "mlp_ratio": 2.0, "dropout": 0.0},
    "train_images": 32, "train_batch": 16, "epochs": 1, "warmup": 2, "steady_steps": 3,
    "test_images": 8, "gen_batch": 8, "beams": 2, "new_tokens": 5, "model_only_s": 0.5,
}


class Report:
    """What ran (rows), what was skipped and why, what failed; printed as a table and JSON."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.skipped: list[dict] = []
        self.failed: list[dict] = []

    def row(self, part: str, what: str, **figures) -> None:
        self.rows.append({"part": part, "what": what, **figures})
        shown = ", ".join(f"{k} {v}" for k, v in figures.items())
        print(f"  {part} | {what}: {shown}", flush=True)

    def skip(self, part: str, reason: str) -> None:
        self.skipped.append({"part": part, "reason": reason})
        print(f"  {part}: SKIPPED: {reason}", flush=True)

    @contextlib.contextmanager
    def part(self, name: str, deadline: float, needs_s: float):
        left = deadline - time.perf_counter()
        if left < needs_s:
            self.skip(name, f"time budget: {left:.0f} s left, needs about {needs_s:.0f} s")
            yield False
            return
        try:
            yield True
        except Exception as err:  # one part failing must not hide the others' figures
            self.failed.append({"part": name, "error": f"{type(err).__name__}: {err}"})
            print(f"  {name}: FAILED: {type(err).__name__}: {err}", flush=True)
            traceback.print_exc()


def has_pydantic() -> bool:
    try:
        import pydantic  # noqa: F401
    except ImportError:
        return False
    return True


def photo_jpeg(args) -> bytes:
    """Smooth colour fields, a few flat objects and sensor-like noise: decodes like a photo."""
    from PIL import Image

    seed, (width, height) = args
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (np.sin(rng.uniform(2, 12) * x + rng.uniform(0, 6)) * 0.5 + 0.5) * \
          (np.cos(rng.uniform(2, 12) * y + rng.uniform(0, 6)) * 0.5 + 0.5) * rng.uniform(80, 255, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, width * 9 // 10), rng.integers(0, height * 9 // 10)
        img[y0:y0 + rng.integers(width // 20, width // 3), x0:x0 + rng.integers(width // 20, width // 3)] = \
            rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def caption(rng: np.random.Generator) -> str:
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    return f"a {pick(COLOURS)} {pick(THINGS)} and a {pick(COLOURS)} {pick(THINGS)} {pick(PLACES)}"


def write_image_shards(root: Path, unique: list[bytes], images: int, per_shard: int) -> None:
    root.mkdir(parents=True)
    for s in range(0, images, per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(s + per_shard, images)):
                key = f"img{i:07d}"
                meta = json.dumps({"key": key, "split": "train", "captions": []}).encode()
                for name, data in ((f"{key}.jpg", unique[i % len(unique)]), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def timed_loop(fn, min_seconds: float, min_calls: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    n, start = 0, time.perf_counter()
    while n < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        n += 1
    sync(device)
    return (time.perf_counter() - start) / n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------- embed
def part_embed(cfg, args, tmp: Path, report: Report, precision: str) -> None:
    from pipeline.embed.encoder import Encoder
    from pipeline.embed.preprocess import Preprocessor
    from pipeline.models.pretrained import load_clip
    from pipeline.pin.realsize import VIT_L14, build_realsize_clip

    device = torch.device(args.device)
    t = time.perf_counter()
    with Pool(min(16, os.cpu_count() or 2)) as pool:
        unique = pool.map(photo_jpeg, [(i, cfg["size"]) for i in range(cfg["unique"])])
    write_image_shards(tmp / "images", unique, cfg["images"], cfg["per_shard"])
    print(f"embed: {cfg['images']} images ({cfg['unique']} distinct JPEGs {cfg['size'][0]}x{cfg['size'][1]}) in "
          f"{-(-cfg['images'] // cfg['per_shard'])} shards, {time.perf_counter() - t:.1f} s; {args.workers} decode "
          f"workers, batch {cfg['embed_batch']}, {precision}", flush=True)
    for name, overrides in cfg["vits"].items():
        overrides = VIT_L14 if overrides == "VIT_L14" else overrides
        folder = tmp / name.replace("/", "-")
        build_realsize_clip(folder, **overrides)
        (folder / "pin.json").write_text(json.dumps({"model_id": f"gpu-check/{name}", "revision": "random",
                                                     "sha256": "0" * 64}))
        model, processor = load_clip(folder)
        pre = Preprocessor.from_processor(processor)
        batch = cfg["embed_batch"]
        pixels = torch.stack([pre.to_uint8(j) for j in unique[:batch]] * -(-batch // len(unique)))[:batch]
        encoder = Encoder.build(model, device, precision, "image_embeds", True)
        x = pixels.to(device)
        per_batch = timed_loop(lambda: encoder(pre.normalize(x)), cfg["model_only_s"], 4, device)
        model_only = batch / per_batch
        if not has_pydantic():
            report.row("embed", name, model_only_images_per_s=round(model_only, 1))
            report.skip("embed", f"{name}: the stage code (embed_shards) needs pydantic")
            continue
        from pipeline.embed.shards import embed_shards
        from pipeline.core.params import ClipParams, DataParams
        from pipeline.core.runtime import Rank

        clip = ClipParams(precision=precision, batch_size=batch, workers=args.workers)
        s = embed_shards(tmp / "images", folder, tmp / f"features-{folder.name}", clip, Rank(), DataParams(),
                         progress=False, device=args.device)
        report.row("embed", name, images_per_s=round(s["images_per_s"], 1),
                   model_only_images_per_s=round(model_only, 1),
                   fraction=round(s["images_per_s"] / model_only, 3),
                   wait_for_data_s=round(s["seconds"]["wait_for_data"], 1), model_s=round(s["seconds"]["model"], 1),
                   images=s["images"], device=s["device"])
        del model, encoder, x
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------- train
def make_training_data(cfg, tmp: Path) -> tuple[Path, Path, list[str]]:
    """A BPE GPT-2 (real size unless tiny) and feature shards: train + test images, 5 captions each."""
    from pipeline.formats.features import FORMAT_VERSION, FeatureTable, write_feature_shard
    from pipeline.pin.realsize import build_realsize_gpt

    rng = np.random.default_rng(0)
    n_train, n_test = cfg["train_images"], cfg["test_images"]
    captions = [[caption(rng) for _ in range(5)] for _ in range(n_train + n_test)]
    gpt_dir = tmp / "gpt"
    build_realsize_gpt(gpt_dir, [c for caps in captions for c in caps], **cfg["gpt"])
    vectors = rng.normal(size=(n_train + n_test, cfg["clip_dim"])).astype(np.float32)
    attrs = {"model_id": "gpu-check/features", "model_revision": "random", "output": "image_embeds",
             "dtype": "float32", "normalized": False, "preprocess": "{}", "format_version": FORMAT_VERSION}
    features = tmp / "train-features"
    features.mkdir()
    splits = ["train"] * n_train + ["test"] * n_test
    for s, lo in enumerate(range(0, n_train + n_test, 1024)):
        hi = min(lo + 1024, n_train + n_test)
        write_feature_shard(features / f"{s:05d}.h5", FeatureTable(
            keys=[f"img{i:07d}" for i in range(lo, hi)], embeddings=vectors[lo:hi], splits=splits[lo:hi],
            captions=captions[lo:hi], attrs=attrs))
    return gpt_dir, features, [c for caps in captions[:n_train] for c in caps]


def part_train_steady(cfg, args, gpt_dir: Path, train_captions: list[str], report: Report, precision: str,
                      peak_tflops) -> None:
    """The training step alone (no loading, no saving): samples/s, tokens/s, MFU."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.captioner import ClipCaptioner
    from pipeline.models.pretrained import load_gpt
    from pipeline.core.runtime import autocast

    device = torch.device(args.device)
    gpt, tokenizer = load_gpt(gpt_dir)
    model = ClipCaptioner.from_settings(cfg["mapper"], cfg["clip_dim"], gpt, tokenizer, finetune_gpt=False)
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-5)
    b = cfg["train_batch"]
    rows = [model.encode_caption(c, 40) for c in train_captions[:b]]
    longest = max(map(len, rows))
    ids = torch.full((b, longest), model.pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, longest), dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, :len(r)] = torch.tensor(r)
        mask[j, :len(r)] = 1
    ids, mask = ids.to(device), mask.to(device)
    vectors = torch.randn(b, cfg["clip_dim"], device=device)

    def step():
        with autocast(device, precision):
            loss = model(vectors, ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    per_step = timed_loop(step, cfg["model_only_s"], cfg["steady_steps"], device)
    samples = b / per_step
    tokens = (model.prefix_length * b + int(mask.sum())) / per_step  # positions GPT-2 reads, padding excluded
    mfu = round(flops / per_step / (peak_tflops * 1e12), 4) if peak_tflops else None
    report.row("train", "steady-state step (model only)", samples_per_s=round(samples, 1),
               tokens_per_s=round(tokens), tflop_per_s=round(flops / per_step / 1e12, 2), mfu=mfu,
               peak_tflops=peak_tflops, batch=b, gflop_per_sample=round(flops / b / 1e9, 2))
    del model, gpt, optimizer


def part_train_stage(cfg, args, tmp: Path, gpt_dir: Path, features: Path, report: Report, precision: str) -> Path:
    from pipeline.core.params import MapperParams, TrainParams
    from pipeline.train.run import train

    out = tmp / "model"
    m = train(features, gpt_dir, out, tmp / "loss.csv", tmp / "train.json", MapperParams(**cfg["mapper"]),
              TrainParams(epochs=cfg["epochs"], batch_size=cfg["train_batch"], lr=2e-5, warmup_steps=cfg["warmup"],
                          precision=precision, finetune_gpt=False, log_every=50),
              progress=False, device=args.device)
    report.row("train", "pipeline.train.run.train (end to end: load, train, validate, save)",
               samples_per_s=m["samples_per_s"], steps=m["steps"], seconds=m["seconds"], device=m["device"],
               precision=m["precision"])
    return out


# ---------------------------------------------------------------------- generate
def part_generate(cfg, args, tmp: Path, model_dir: Path, features: Path, report: Report, precision: str) -> dict:
    from pipeline.generate.run import run as generate
    from pipeline.core.params import GenerateParams

    params = GenerateParams(split="test", batch_size=cfg["gen_batch"], num_beams=cfg["beams"],
                            max_new_tokens=cfg["new_tokens"], precision=precision)
    m = generate(model_dir, features, tmp / "captions", params, metrics_path=tmp / "generate.json",
                 progress=False, device=args.device)
    report.row("generate", f"pipeline.generate.run.run, beam {cfg['beams']}, batch {cfg['gen_batch']}, "
               f"{cfg['new_tokens']} new tokens", captions_per_s=m["captions_per_s"], captions=m["captions"],
               mean_words=m["mean_words"], device=m["device"])
    return m


def torchrun(stage: str, args: list[str], workdir: Path, timeout: float) -> float:
    """`capline STAGE ARGS` under a 2-process torchrun, as a user runs it; returns the wall time.

    It runs in ``workdir`` (the check's own temporary folder), never in the project root:
    a path the check forgot to pass then resolves to a default under ``workdir`` instead
    of reading or writing the user's ``data/``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "stages.cli", stage, *args, "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    workdir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun {stage} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def part_torchrun(cfg, args, tmp: Path, gpt_dir: Path, model_dir: Path, features: Path, report: Report,
                  precision: str) -> None:
    """train (DDP) and generate under a 2-process torchrun; generate must give one process's captions."""
    import yaml

    params = tmp / "params-torchrun.yaml"
    params.write_text(yaml.safe_dump({
        "device": "cuda" if args.device.startswith("cuda") else "cpu",
        "mapper": cfg["mapper"],
        "train": {"epochs": 1, "batch_size": cfg["train_batch"], "lr": 2e-5, "warmup_steps": cfg["warmup"],
                  "precision": precision, "finetune_gpt": False, "log_every": 50},
        "generate": {"split": "test", "batch_size": cfg["gen_batch"], "num_beams": cfg["beams"],
                     "max_new_tokens": cfg["new_tokens"], "precision": precision},
    }))
    # Every output path explicit. The features' CLIP has no folder here: --clip is left at its
    # default, which resolves inside the empty workdir, so train copies no CLIP in (it warns).
    workdir = tmp / "torchrun-cwd"
    wall = torchrun("train", ["--params", str(params), "--features", str(features), "--gpt", str(gpt_dir),
                              "--out", str(tmp / "model-ddp"),
                              "--curve", str(tmp / "loss-ddp.csv"), "--val-curve", str(tmp / "val-ddp.csv"),
                              "--checkpoints", str(tmp / "checkpoints-ddp"),
                              "--metrics", str(tmp / "train-ddp.json")], workdir, timeout=300)
    m = read_metrics(tmp / "train-ddp.json")
    report.row("torchrun", "capline train, 2 processes (DDP)", samples_per_s=m["samples_per_s"],
               world_size=m["world_size"], steps=m["steps"], wall_s=round(wall, 1))
    out = tmp / "captions-torchrun"
    wall = torchrun("generate", ["--params", str(params), "--model", str(model_dir), "--features", str(features),
                                 "--out", str(out), "--metrics", str(tmp / "generate-torchrun.json")], workdir,
                     timeout=300)
    one = json.loads((tmp / "captions" / "results.json").read_text())
    two = json.loads((out / "results.json").read_text())
    same = sum(a == b for a, b in zip(one, two))
    m = read_metrics(tmp / "generate-torchrun.json")
    report.row("torchrun", "capline generate, 2 processes", captions_per_s=m["captions_per_s"],
               world_size=m["world_size"], identical_to_one_process=f"{same}/{len(one)}", wall_s=round(wall, 1))
    # Rows are split by index and gathered back: a misplaced row would make most captions
    # differ. On a GPU a random model's near-tied beams may flip with the batch's make-up.
    if len(one) != len(two) or same < 0.9 * len(one):
        raise RuntimeError(f"2-process captions differ from one process's: {same}/{len(one)} identical")


# -------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (the check) or cpu (with --tiny: the code paths)")
    ap.add_argument("--tiny", action="store_true", help="small models and data: every code path in about a minute")
    ap.add_argument("--budget", type=float, default=450, help="seconds for all parts; a part that no longer fits "
                                                                "is skipped, saying so")
    ap.add_argument("--workers", type=int, default=0, help="embed decode workers (0: one per core, up to 16)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's bf16 matmul peak for MFU (default: 790 on an H200, else none)")
    ap.add_argument("--torchrun", action="store_true", help="run the 2-process check even with fewer than 2 GPUs")
    args = ap.parse_args()

    started = time.perf_counter()
    deadline = started + args.budget
    cfg = TINY if args.tiny else REAL
    args.workers = args.workers or max(1, min(16, (os.cpu_count() or 2) - 2))
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: no CUDA device visible to torch (use --device cpu --tiny for the code paths)")
        name = torch.cuda.get_device_name(device)
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        gpus = torch.cuda.device_count()
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        name, precision, gpus = "cpu", "fp32", 0
    peak = args.peak_tflops or (790.0 if "H200" in name else None)
    stage_code = has_pydantic()
    print(f"gpu_check: {name}, {gpus} GPU(s), {os.cpu_count()} CPUs, torch {torch.__version__}, precision "
          f"{precision}, {'tiny' if args.tiny else 'real'} sizes, budget {args.budget:.0f} s; stage code "
          f"{'on' if stage_code else 'OFF (no pydantic: model-only bounds only)'}", flush=True)
    report = Report()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)
        with report.part("embed", deadline, 30) as ok:
            if ok:
                part_embed(cfg, args, tmp, report, precision)
        model_dir = None
        with report.part("train", deadline, 40) as ok:
            if ok:
                gpt_dir, features, train_captions = make_training_data(cfg, tmp)
                part_train_steady(cfg, args, gpt_dir, train_captions, report, precision, peak)
                if stage_code:
                    model_dir = part_train_stage(cfg, args, tmp, gpt_dir, features, report, precision)
                else:
                    report.skip("train", "the stage code (pipeline.train.run.train) needs pydantic")
        with report.part("generate", deadline, 20) as ok:
            if ok:
                if model_dir is None:
                    report.skip("generate", "needs the model trained by the stage code (pydantic)")
                else:
                    part_generate(cfg, args, tmp, model_dir, features, report, precision)
        if gpus > 1 or args.torchrun:
            with report.part("torchrun", deadline, 90) as ok:
                if ok:
                    if model_dir is None:
                        report.skip("torchrun", "needs the model trained by the stage code (pydantic)")
                    else:
                        part_torchrun(cfg, args, tmp, gpt_dir, model_dir, features, report, precision)
        else:
            report.skip("torchrun", f"{gpus} GPU(s) visible; the 2-process check needs 2")

    seconds = time.perf_counter() - started
    print()
    print("| part | what | figures |")
    print("| --- | --- | --- |")
    for r in report.rows:
        figures = ", ".join(f"{k} {v}" for k, v in r.items() if k not in ("part", "what"))
        print(f"| {r['part']} | {r['what']} | {figures} |")
    for s in report.skipped:
        print(f"| {s['part']} | skipped | {s['reason']} |")
    for f in report.failed:
        print(f"| {f['part']} | FAILED | {f['error']} |")
    print(f"\ntotal {seconds:.0f} s")
    print(json.dumps({"bench": "gpu_check", "device": name, "gpus": gpus, "precision": precision,
                      "tiny": args.tiny, "seconds": round(seconds, 1), "rows": report.rows,
                      "skipped": report.skipped, "failed": report.failed}))
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
