"""Helper of test_train.py: peak RSS of a streamed training run over N shards.

    python -m tests.helpers.train_rss FOLDER SHARDS      -> last line: {"peak_mib": ..., ...}

The shards (2048 vectors of 2048 floats: 16 MiB each) are written by a separate
process first, so that only training counts in the peak.
"""
import json
import resource
import subprocess
import sys
from pathlib import Path

ROWS, DIM = 2048, 2048


def write(folder: Path, shards: int) -> None:
    import numpy as np

    from pipeline.formats.features import FeatureTable, write_feature_shard
    from tests.helpers.features import COLOURS, FEATURE_ATTRS, SHAPES
    from tests.helpers.models import save_tiny_gpt

    save_tiny_gpt(folder / "gpt")
    (folder / "f").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        n = np.arange(ROWS)
        caps = [[f"a {COLOURS[i % 4]} {SHAPES[i % 3]}"] for i in n]
        write_feature_shard(folder / "f" / f"{s:05d}.h5", FeatureTable(
            keys=[f"{s}_{i}" for i in n], embeddings=rng.normal(size=(ROWS, DIM)).astype(np.float32),
            splits=["val" if i % 64 == 0 else "train" for i in n], captions=caps, attrs=dict(FEATURE_ATTRS)))


def main() -> None:
    folder, shards = Path(sys.argv[1]), int(sys.argv[2])
    if len(sys.argv) > 3:
        write(folder, shards)
        return
    subprocess.run([sys.executable, "-m", "tests.helpers.train_rss", str(folder), str(shards), "write"], check=True)
    import torch

    from pipeline.core.params import MapperParams, TrainParams
    from pipeline.train.run import train

    torch.set_num_threads(1)
    params = TrainParams(epochs=1, batch_size=512, lr=1e-3, warmup_steps=0, precision="fp32",
                         max_memory_gb=0.05, checkpoint_every=None)
    metrics = train(folder / "f", folder / "gpt", folder / "m", folder / "c.csv", folder / "t.json",
                    MapperParams(type="mlp", prefix_length=2), params, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_mib": round(peak, 1), "streamed": metrics["streamed"],
                      "feature_mib": shards * ROWS * DIM * 4 / 2**20, "steps": metrics["steps"]}))


if __name__ == "__main__":
    main()
