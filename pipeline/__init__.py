"""capline: train and evaluate CLIP-prefix (ClipCap) image captioners as a DVC pipeline."""

__version__ = "0.1.0"
