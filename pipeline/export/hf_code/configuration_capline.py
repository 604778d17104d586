"""Configuration of a capline ClipCap captioner (written by `capline export --format hf`).

Self-contained: needs transformers only, never capline.
"""
from transformers import CLIPVisionConfig, GPT2Config, PretrainedConfig


class CaplineConfig(PretrainedConfig):
    model_type = "capline_clipcap"

    def __init__(self, vision_config=None, text_config=None, mapper=None, output="image_embeds", normalized=True,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(vision_config, dict) or vision_config is None:
            vision_config = CLIPVisionConfig(**(vision_config or {}))
        if isinstance(text_config, dict) or text_config is None:
            text_config = GPT2Config(**(text_config or {}))
        self.vision_config = vision_config
        self.text_config = text_config
        # {"type": "mlp" | "transformer", **the mapper's config}: as capline's captioner.json.
        self.mapper = dict(mapper or {})
        self.output = output  # "image_embeds" (projected) or "pooler_output"
        self.normalized = bool(normalized)

    def to_dict(self):
        out = super().to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        out["text_config"] = self.text_config.to_dict()
        return out
