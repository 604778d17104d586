"""Captions of an exported model against PyTorch's, and their CIDEr-D, on a split of image shards.

Exports MODEL to ONNX fp32 and int8 (into --workdir, once), captions every image of
the split with PyTorch fp32, PyTorch in the precision ``auto`` picks, ONNX Runtime
fp32 and int8 (the model folder's decoding defaults, or --num-beams), and prints,
per backend, the CIDEr-D against the shards' references (pipeline/text/cider.py,
captions tokenized as the PTB tokenizer does) and how many captions equal PyTorch
fp32's. The last line is a JSON object.

    python bench/export_quality.py --model data/model --images data/images [--split test] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pipeline.caption.run import caption_inputs, resolve_decoding
from pipeline.export.onnx import export_onnx
from pipeline.formats.image_shards import iter_shard, list_shards
from pipeline.text.cider import cider_d
from pipeline.text.tokenizer import fast_ptb_tokenize


def split_images(images: Path, split: str, out: Path, limit: int | None) -> dict[str, list[str]]:
    """Write the split's images to ``out`` (KEY.EXT); their reference captions by path."""
    out.mkdir(parents=True, exist_ok=True)
    refs = {}
    for shard in list_shards(images):
        for sample in iter_shard(shard):
            if sample.meta.get("split") != split or not sample.image or not sample.meta.get("captions"):
                continue
            path = out / f"{sample.key}.{sample.ext}"
            path.write_bytes(sample.image)
            refs[str(path)] = list(sample.meta["captions"])
            if limit and len(refs) >= limit:
                return refs
    return refs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("data/model"))
    parser.add_argument("--images", type=Path, default=Path("data/images"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None, help="[default: the model folder's]")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/capline-export-quality"))
    args = parser.parse_args()
    for name, quantize in (("onnx_fp32", None), ("onnx_int8", "int8")):
        if not (args.workdir / name / "onnx.json").exists():
            export_onnx(args.model, args.workdir / name, quantize=quantize)
    refs = split_images(args.images, args.split, args.workdir / "images", args.limit)
    paths = sorted(refs)
    d = resolve_decoding(args.model, {"num_beams": args.num_beams})
    runs = {"torch_fp32": (args.model, {"precision": "fp32"}), "torch_auto": (args.model, {}),
            "onnx_fp32": (args.workdir / "onnx_fp32", {}), "onnx_int8": (args.workdir / "onnx_int8", {})}
    gts = {p: [fast_ptb_tokenize(c) for c in refs[p]] for p in paths}
    captions, result = {}, {"images": len(paths), "split": args.split, "num_beams": d.num_beams}
    for name, (folder, options) in runs.items():
        t = time.perf_counter()
        out = caption_inputs(folder, paths, d, progress=False, batch_size=32, **options)
        seconds = time.perf_counter() - t
        captions[name] = [r.texts[0] for r in out]
        score, _ = cider_d(gts, {p: fast_ptb_tokenize(c) for p, c in zip(paths, captions[name])})
        same = sum(a == b for a, b in zip(captions[name], captions["torch_fp32"]))
        result[name] = {"cider": round(score, 4), "equal_to_torch_fp32": same, "seconds": round(seconds, 1)}
        print(f"{name:11s} CIDEr-D {score:.4f}  captions equal to torch_fp32's {same}/{len(paths)}  "
              f"{seconds:.1f} s", flush=True)
    base = result["torch_fp32"]["cider"]
    for name in ("torch_auto", "onnx_fp32", "onnx_int8"):
        result[name]["cider_vs_torch_fp32"] = round(result[name]["cider"] / base - 1, 4) if base else None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
