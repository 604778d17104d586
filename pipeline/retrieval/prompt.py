"""SmallCap's prompt as text: the retrieved captions, then the start of the image's own.
(The captioner reads it as token ids: pipeline/models/prompt.py, with ``retrieval.template``.)"""
from __future__ import annotations

from typing import Sequence

from pipeline.core.params import PROMPT_TEMPLATE
from pipeline.models.prompt import SEPARATOR, SLOT

HEAD, TAIL = PROMPT_TEMPLATE.split(SLOT)


def prompt(captions: Sequence[str], template: str = PROMPT_TEMPLATE) -> str:
    """``Similar images show\\n\\n{cap1}\\n\\n...{capk}.\\n\\nThis image shows ``."""
    return template.replace(SLOT, SEPARATOR.join(captions))
