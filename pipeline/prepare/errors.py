"""The one error type of dataset readers: it names the file and, where known, the line."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline.core.errors import CaplineError


class DatasetError(CaplineError):
    def __init__(self, path: str | Path, message: str, line: Optional[int] = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.message = message
        self.line = line

    def naming(self, origin: str) -> "DatasetError":
        """The same error about ``origin`` (the path or URL the user gave) instead of the
        copy that was read: the user can open and fix only their own file."""
        return DatasetError(origin, self.message, self.line)
