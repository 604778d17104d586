"""``capline import``: released checkpoints of other projects -> capline model folders.

ClipCap's (``clipcap.py``) and clip-gpt-captioning's (``clipgpt.py``) state dicts are
read without running pickle code (``weights.py``), every key is mapped or the import
fails naming the leftovers (``keymap.py``), and ``run.py`` writes the folder through
``ClipCaptioner.save``, so generate, caption and evaluate use it unchanged.
"""
