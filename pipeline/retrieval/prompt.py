"""SmallCap's prompt: the retrieved captions, then the start of the image's own."""
from __future__ import annotations

from typing import Sequence

HEAD = "Similar images show\n\n"
TAIL = ".\n\nThis image shows "


def prompt(captions: Sequence[str]) -> str:
    """``Similar images show\\n\\n{cap1}\\n\\n...{capk}.\\n\\nThis image shows ``."""
    return HEAD + "\n\n".join(captions) + TAIL
