"""Annotation files for the dataset tests: a COCO captions file with its Karpathy split."""
from __future__ import annotations


def coco_fixture(base_url: str) -> tuple[dict, dict]:
    """Three COCO images (ids 42, 7, 1000; their URLs under ``base_url``), four captions
    (two of image 42, with untidy whitespace) and a Karpathy split putting them in test,
    restval and val."""
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg", "coco_url": f"{base_url}/{i}.jpg",
               "width": 48, "height": 32} for i in (42, 7, 1000)]
    anns = [{"image_id": img, "id": n, "caption": f"  caption {n} of   {img} "} for n, img in enumerate([42, 7, 42, 1000])]
    karpathy = {"dataset": "coco", "images": [
        {"cocoid": 42, "filename": "COCO_val2014_000000000042.jpg", "filepath": "val2014", "split": "test",
         "sentences": [{"raw": "x"}]},
        {"cocoid": 7, "filename": "COCO_val2014_000000000007.jpg", "filepath": "val2014", "split": "restval",
         "sentences": [{"raw": "y"}]},
        {"cocoid": 1000, "filename": "COCO_val2014_000000001000.jpg", "filepath": "val2014", "split": "val",
         "sentences": [{"raw": "z"}]},
    ]}
    return {"images": images, "annotations": anns}, karpathy
