"""Run img2dataset on a URL list and print {"seconds", "wall_seconds", "ok"} (run by bench/download.py
with the interpreter of its own virtual environment)."""
import glob
import json
import os
import sys
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import warnings  # noqa: E402

warnings.filterwarnings("ignore")
from img2dataset import download  # noqa: E402


def main() -> None:
    url_list, out, processes, threads, size, per_shard = sys.argv[1:7]
    start = time.monotonic()
    download(
        url_list=url_list, output_folder=out, input_format="tsv", url_col="url", caption_col="caption",
        output_format="webdataset", processes_count=int(processes), thread_count=int(threads),
        image_size=int(size), resize_mode="keep_ratio", encode_quality=95, number_sample_per_shard=int(per_shard),
        timeout=20, retries=0, enable_wandb=False, compute_hash=None, extract_exif=False,
    )
    seconds = time.monotonic() - start
    ok, starts, ends = 0, [], []
    for path in glob.glob(os.path.join(out, "*_stats.json")):
        with open(path) as f:
            stats = json.load(f)
        ok += stats.get("successes", 0)
        starts.append(stats["start_time"])
        ends.append(stats["end_time"])
    # Its shards' working window leaves out process start-up and imports (seconds of
    # fixed cost), which favours img2dataset on short runs: the fair comparison.
    window = max(ends) - min(starts) if starts else seconds
    print(json.dumps({"seconds": window, "wall_seconds": seconds, "ok": ok}))


if __name__ == "__main__":  # img2dataset spawns processes that re-import this file
    main()
