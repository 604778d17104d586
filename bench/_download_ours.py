"""Run capline's download on a prepared source and print {"seconds", "ok"} (run by bench/download.py)."""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.download.run import download  # noqa: E402
from pipeline.core.params import DownloadParams  # noqa: E402


def main() -> None:
    source, out, workers, size, per_shard = sys.argv[1:6]
    params = DownloadParams(workers=int(workers), per_host=int(workers), resize=int(size),
                            records_per_shard=int(per_shard), jpeg_quality=95, retries=0)
    start = time.monotonic()
    summary = download(source, out, params, progress=False)
    print(json.dumps({"seconds": time.monotonic() - start, "ok": summary.by_status.get("ok", 0)}))


if __name__ == "__main__":  # the image processes re-import the main module
    main()
