"""Models: pinning/loading CLIP and GPT-2 (``pretrained``), the demo's small models
(``demo``), the mapper networks and the captioner.

Submodules are imported where used, so ``import pipeline.models`` stays light.
"""
