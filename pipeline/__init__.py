"""capline: train and evaluate CLIP-prefix (ClipCap) image captioners as a DVC pipeline."""

from pipeline.core import torchvision_compat as _torchvision_compat

__version__ = "0.1.0"

_torchvision_compat.install()
