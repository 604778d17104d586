"""Retrieval augmentation (SmallCap): stages ``datastore`` and ``retrieve``.

Submodules are imported where used, so a stage pulls in only what it runs.
"""
