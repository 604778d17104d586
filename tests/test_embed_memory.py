"""The embed stage streams: peak memory does not grow with the number of shards.

Each run is a fresh process (so earlier tests' allocations do not count) that embeds
a folder of shards and reports its own peak RSS. Six times the shards must not cost
more than a small margin: holding the decoded images of every shard (600 × 320×240
RGB ≈ 140 MB here) would exceed it.
"""
import json
import subprocess
import sys
import textwrap

from tests.helpers.images import make_image_dir
from tests.helpers.models import make_tiny_clip

SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from pathlib import Path
    from pipeline.core.runtime import Rank
    from pipeline.embed.shards import embed_shards
    from pipeline.core.params import ClipParams, DataParams

    images, clip, out = map(Path, sys.argv[1:4])
    summary = embed_shards(images, clip, out, ClipParams(precision="fp32", batch_size=16, workers=0),
                           Rank(), DataParams(), progress=False)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": summary["images"], "peak_mib": peak_mib}))
    """
)


def _peak(images, clip, out) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(images), str(clip), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_peak_rss_does_not_grow_with_shards(tmp_path):
    clip = make_tiny_clip(tmp_path / "clip", projection_dim=512)
    make_image_dir(tmp_path / "few", shards=2, per_shard=50, size=(320, 240))
    make_image_dir(tmp_path / "many", shards=12, per_shard=50, size=(320, 240))
    few = _peak(tmp_path / "few", clip, tmp_path / "f1")
    many = _peak(tmp_path / "many", clip, tmp_path / "f2")
    assert (few["images"], many["images"]) == (100, 600)
    assert many["peak_mib"] <= few["peak_mib"] * 1.1 + 30, (few, many)
