"""Run img2dataset on a URL list and print {"seconds", "ok"} (run by bench/download.py
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

url_list, out, processes, threads, size, per_shard = sys.argv[1:7]
start = time.monotonic()
download(
    url_list=url_list, output_folder=out, input_format="tsv", url_col="url", caption_col="caption",
    output_format="webdataset", processes_count=int(processes), thread_count=int(threads),
    image_size=int(size), resize_mode="keep_ratio", encode_quality=95, number_sample_per_shard=int(per_shard),
    timeout=20, retries=0, enable_wandb=False, compute_hash=None, extract_exif=False,
)
seconds = time.monotonic() - start
ok = 0
for stats in glob.glob(os.path.join(out, "*_stats.json")):
    with open(stats) as f:
        ok += json.load(f).get("successes", 0)
print(json.dumps({"seconds": seconds, "ok": ok}))
