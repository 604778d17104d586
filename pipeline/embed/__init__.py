"""The embed stage: CLIP vectors of image shards into HDF5 feature shards."""
from pipeline.embed.run import embed_shards

__all__ = ["embed_shards"]
