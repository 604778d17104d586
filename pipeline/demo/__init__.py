"""The offline demo: a generated scenes dataset (COCO captions + Karpathy split)."""
from pipeline.demo.scenes import captions_for, generate_demo, render, scene_for

__all__ = ["captions_for", "generate_demo", "render", "scene_for"]
