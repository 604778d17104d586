"""Dataset specs: readers that stream ``Record``s, and the prepare stage.

``prepare`` fetches the annotation files (or generates the demo) into
``data/source/`` with a ``manifest.json``; ``iter_records`` reads that folder back
as a stream of records for the download stage.
"""
from pipeline.datasets.manifest import Manifest, read_manifest
from pipeline.datasets.source import iter_records

__all__ = ["Manifest", "read_manifest", "iter_records", "prepare"]


def prepare(*args, **kwargs):  # imported lazily: prepare pulls in the demo generator
    from pipeline.datasets.prepare import prepare as _prepare

    return _prepare(*args, **kwargs)
