"""The one error type of dataset readers: it names the file and, where known, the line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.errors import CaplineError


class DatasetError(CaplineError):
    def __init__(self, path: str | Path, message: str, line: Optional[int] = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
