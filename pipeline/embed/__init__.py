"""The embed stage: CLIP vectors of image shards into HDF5 feature shards.

Submodules are imported where used, so a stage pulls in only what it runs.
"""
