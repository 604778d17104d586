#!/usr/bin/env bash
# Embed throughput on a CUDA machine with no network: ViT-B/32 and ViT-L/14 (random
# init, the compute of the real models), our embed stage with decode workers versus
# the model-only bound, fp16 and bf16, on generated 640x480 JPEGs; one table.
#
#   bash bench/gpu_check.sh            # from the repository root; about 3-6 minutes
#   IMAGES=4096 WORKERS=12 bash bench/gpu_check.sh
#
# Needs torch with CUDA, transformers, h5py, pillow, numpy, tqdm, pydantic, pyyaml.
# The package is used from the source tree (PYTHONPATH), nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export IMAGES="${IMAGES:-8192}" UNIQUE="${UNIQUE:-512}" PER_SHARD="${PER_SHARD:-512}"
export BATCH="${BATCH:-256}" WORKERS="${WORKERS:-0}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

python - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "transformers", "h5py", "PIL", "numpy", "tqdm", "pydantic", "yaml")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu_check: missing Python packages: {', '.join(missing)}")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device visible to torch")
EOF

timeout 470 python - <<'EOF'
import io, json, os, sys, tarfile, tempfile, time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection
from transformers.utils import logging as hf_logging

from pipeline.runtime import Rank
from pipeline.embed.run import embed_shards
from pipeline.embed.encoder import Encoder
from pipeline.models.pretrained import load_clip
from pipeline.embed.preprocess import Preprocessor
from pipeline.params import ClipParams, DataParams

hf_logging.set_verbosity_error()
IMAGES, UNIQUE, PER_SHARD = int(os.environ["IMAGES"]), int(os.environ["UNIQUE"]), int(os.environ["PER_SHARD"])
BATCH = int(os.environ["BATCH"])
WORKERS = int(os.environ["WORKERS"]) or max(1, min(16, (os.cpu_count() or 2) - 2))


def jpeg(seed):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 640, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, 480, dtype=np.float32)[:, None, None]
    img = (np.sin(rng.uniform(2, 12) * x + rng.uniform(0, 6)) * 0.5 + 0.5) * \
          (np.cos(rng.uniform(2, 12) * y + rng.uniform(0, 6)) * 0.5 + 0.5) * rng.uniform(80, 255, 3)
    for _ in range(4):
        x0, y0 = rng.integers(0, 580), rng.integers(0, 420)
        img[y0:y0 + rng.integers(30, 200), x0:x0 + rng.integers(30, 200)] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


MODELS = {
    "ViT-B/32": CLIPVisionConfig(projection_dim=512),
    "ViT-L/14": CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                 num_attention_heads=16, patch_size=14, projection_dim=768),
}

with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    t = time.perf_counter()
    with Pool(min(16, os.cpu_count() or 2)) as pool:
        unique = pool.map(jpeg, range(UNIQUE))
    (tmp / "images").mkdir()
    for s in range(0, IMAGES, PER_SHARD):
        with tarfile.open(tmp / "images" / f"{s // PER_SHARD:05d}.tar", "w") as tar:
            for i in range(s, min(s + PER_SHARD, IMAGES)):
                key = f"img{i:07d}"
                meta = json.dumps({"key": key, "split": "train", "captions": []}).encode()
                for name, data in ((f"{key}.jpg", unique[i % UNIQUE]), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    print(f"{IMAGES} images ({UNIQUE} distinct JPEGs 640x480) in {-(-IMAGES // PER_SHARD)} shards, "
          f"{time.perf_counter() - t:.1f}s; {torch.cuda.get_device_name(0)}; {os.cpu_count()} CPUs; "
          f"{WORKERS} decode workers; batch {BATCH}", flush=True)

    rows = []
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        folder = tmp / name.replace("/", "-")
        CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                           crop_size={"height": cfg.image_size, "width": cfg.image_size}).save_pretrained(folder)
        model, proc = load_clip(folder)
        pre = Preprocessor.from_processor(proc)
        base = torch.stack([pre.to_uint8(j) for j in unique[:BATCH]] * max(1, -(-BATCH // UNIQUE)))[:BATCH]
        for precision in ("fp16", "bf16"):
            # model-only: uint8 batch already on the GPU, normalize + model, 2 warm-up batches
            enc = Encoder.build(model, torch.device("cuda"), precision, "image_embeds", True)
            x = base.cuda()
            for _ in range(2):
                enc(pre.normalize(x))
            torch.cuda.synchronize()
            n, t = 0, time.perf_counter()
            while time.perf_counter() - t < 5 or n < 4 * BATCH:
                enc(pre.normalize(x))
                n += BATCH
            torch.cuda.synchronize()
            model_only = n / (time.perf_counter() - t)
            clip = ClipParams(precision=precision, batch_size=BATCH, workers=WORKERS)
            s = embed_shards(tmp / "images", folder, tmp / f"out-{folder.name}-{precision}", clip, Rank(),
                             DataParams(), progress=False)
            sec = s["seconds"]
            rows.append((name, precision, s["images_per_s"], model_only, s["images_per_s"] / model_only,
                         sec["wait_for_data"], sec["model"]))
            print(f"{name} {precision}: ours {s['images_per_s']:.0f}/s, model-only {model_only:.0f}/s", flush=True)
        del model, enc

    print()
    print(f"| model | precision | ours images/s | model-only images/s | fraction | waiting for data s | model s |")
    print(f"| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.1f} |")
    print(json.dumps({"bench": "embed_gpu", "unit": "images/s", "workers": WORKERS, "batch": BATCH,
                      "rows": [dict(zip(("model", "precision", "ours", "model_only", "fraction"), r[:5]))
                               for r in rows]}))
EOF
