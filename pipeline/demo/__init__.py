"""The offline demo: a generated scenes dataset (COCO captions + Karpathy split)."""
