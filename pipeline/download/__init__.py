"""The download stage: fetching images into webdataset tar shards with a status per record."""
from pipeline.download.errors import FAILURES, RecordFailure
from pipeline.download.run import Summary, download, download_records, fetch_record

__all__ = ["FAILURES", "RecordFailure", "Summary", "download", "download_records", "fetch_record"]
