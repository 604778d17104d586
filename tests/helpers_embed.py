"""Shared fixtures for the embed, feature and image-shard tests: real JPEGs, real tar
shards in both layouts, real tiny CLIP folders saved with save_pretrained."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image


def photo_jpeg(seed: int, width: int = 96, height: int = 72, quality: int = 90) -> bytes:
    """A smooth, noisy, photo-like JPEG (gradients + texture), different per seed."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = (np.sin(rng.uniform(2, 9) * x + rng.uniform(0, 6)) * 0.5 + 0.5) * \
           (np.cos(rng.uniform(2, 9) * y + rng.uniform(0, 6)) * 0.5 + 0.5)
    img = base * rng.uniform(60, 255, 3)[None, None, :] + rng.normal(0, 12, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_our_shard(path: Path, samples: Iterable[tuple[str, bytes, str, list[str]]]) -> list[str]:
    """Our layout: KEY.jpg + KEY.json {key, url, split, captions, width, height}; sorted by key."""
    keys = []
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, image, split, captions in sorted(samples):
            meta = {"key": key, "url": f"file:///{key}.jpg", "split": split, "captions": captions,
                    "width": 0, "height": 0}
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            keys.append(key)
    return keys


def write_img2dataset_shard(path: Path, samples: Iterable[tuple[str, bytes, Optional[str]]]) -> list[str]:
    """img2dataset's webdataset output: KEY.jpg, KEY.txt, KEY.json with `caption`, no split."""
    keys = []
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "status": "success",
                    "caption": caption, "width": 96, "height": 72}
            _add(tar, f"{key}.jpg", image)
            if caption is not None:
                _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
            keys.append(key)
    return keys


def make_image_dir(root: Path, shards: int, per_shard: int, seed: int = 0, size: tuple[int, int] = (96, 72),
                   corrupt: Iterable[str] = ()) -> dict[str, list[str]]:
    """``shards`` of our shards in root; keys named in ``corrupt`` get broken JPEG bytes."""
    root.mkdir(parents=True, exist_ok=True)
    corrupt = set(corrupt)
    out = {}
    n = 0
    for s in range(shards):
        samples = []
        for _ in range(per_shard):
            key = f"img{n:04d}"
            image = photo_jpeg(seed * 10_000 + n, *size)
            if key in corrupt:
                image = image[: len(image) // 3]  # truncated JPEG
            split = ("train", "val", "test")[n % 3]
            samples.append((key, image, split, [f"a <b>photo</b> number {n}", f"picture {n}"]))
            n += 1
        out[f"{s:05d}"] = write_our_shard(root / f"{s:05d}.tar", samples)
    return out


def make_tiny_clip(folder: Path, image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 2,
                   projection_dim: int = 16, seed: int = 0, pin: Optional[dict] = None,
                   crop: Optional[int] = None) -> Path:
    """A random-weight CLIP vision tower + processor saved as the models stage would."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           projection_dim=projection_dim)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.save_pretrained(folder)
    c = crop or image_size
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": c, "width": c}).save_pretrained(folder)
    if pin is not None:
        (Path(folder) / "pin.json").write_text(json.dumps(pin))
    return Path(folder)


def reference_embeddings(model_dir: Path, images: list[bytes], output: str = "image_embeds",
                         normalize: bool = True) -> np.ndarray:
    """The plain reference path: open -> CLIPImageProcessor -> model in fp32, one image at a time."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(model_dir).eval()
    proc = CLIPImageProcessor.from_pretrained(model_dir)
    rows = []
    with torch.no_grad():
        for data in images:
            px = proc(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"]
            out = model(pixel_values=px)
            vec = out.image_embeds if output == "image_embeds" else model.vision_model(pixel_values=px).pooler_output
            if normalize:
                vec = torch.nn.functional.normalize(vec, dim=-1)
            rows.append(vec[0].numpy())
    return np.stack(rows)
