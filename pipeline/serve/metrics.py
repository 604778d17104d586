"""The server's counters, as Prometheus' text format (``GET /metrics``).

Updated from the event loop and from the model's worker thread, hence the lock.
"""
from __future__ import annotations

import threading
from collections import Counter

# Upper bounds (seconds) of the request latency histogram's buckets.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.responses: Counter = Counter()  # (path, status) -> count
        self.errors: Counter = Counter()  # error code -> count
        self.batches: Counter = Counter()  # batch size -> number of forward passes of that size
        self.batch_seconds = 0.0
        self.latency: Counter = Counter()  # bucket bound -> requests at or under it (cumulative when shown)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.in_flight = 0  # /caption requests being handled
        self.client_disconnects = 0

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def finished(self, path: str, status: int, seconds: float, error: str | None = None) -> None:
        with self._lock:
            self.in_flight -= 1
            self.responses[(path, status)] += 1
            if error is not None:
                self.errors[error] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            for bound in LATENCY_BUCKETS:
                if seconds <= bound:
                    self.latency[bound] += 1
                    break

    def disconnected(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self.client_disconnects += 1

    def batch(self, size: int, seconds: float) -> None:
        with self._lock:
            self.batches[size] += 1
            self.batch_seconds += seconds

    def render(self, queue_depth: int, max_batch: int) -> str:
        with self._lock:
            lines = [
                "# HELP capline_requests_total Finished /caption requests by HTTP status.",
                "# TYPE capline_requests_total counter",
                *(f'capline_requests_total{{path="{p}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.responses.items())),
                "# HELP capline_errors_total Error replies by error code.",
                "# TYPE capline_errors_total counter",
                *(f'capline_errors_total{{code="{c}"}} {n}' for c, n in sorted(self.errors.items())),
                "# HELP capline_batches_total Forward passes of the model by batch size (images).",
                "# TYPE capline_batches_total counter",
                *(f'capline_batches_total{{size="{s}"}} {n}' for s, n in sorted(self.batches.items())),
                "# HELP capline_images_captioned_total Images that went through the model.",
                "# TYPE capline_images_captioned_total counter",
                f"capline_images_captioned_total {sum(s * n for s, n in self.batches.items())}",
                "# HELP capline_batch_seconds_total Time the model spent on batches.",
                "# TYPE capline_batch_seconds_total counter",
                f"capline_batch_seconds_total {self.batch_seconds:.6f}",
                "# HELP capline_max_batch The largest batch the server forms (--max-batch).",
                "# TYPE capline_max_batch gauge",
                f"capline_max_batch {max_batch}",
                "# HELP capline_queue_depth Images waiting for the model.",
                "# TYPE capline_queue_depth gauge",
                f"capline_queue_depth {queue_depth}",
                "# HELP capline_in_flight_requests /caption requests being handled now.",
                "# TYPE capline_in_flight_requests gauge",
                f"capline_in_flight_requests {self.in_flight}",
                "# HELP capline_client_disconnects_total Clients that hung up before their request was read.",
                "# TYPE capline_client_disconnects_total counter",
                f"capline_client_disconnects_total {self.client_disconnects}",
                "# HELP capline_request_seconds Latency of /caption requests.",
                "# TYPE capline_request_seconds histogram",
            ]
            total = 0
            for bound in LATENCY_BUCKETS:
                total += self.latency[bound]
                lines.append(f'capline_request_seconds_bucket{{le="{bound}"}} {total}')
            lines += [f'capline_request_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                      f"capline_request_seconds_sum {self.latency_sum:.6f}",
                      f"capline_request_seconds_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of each sample line (for tests, the bench and curious clients)."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
