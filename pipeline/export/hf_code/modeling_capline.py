"""A capline ClipCap captioner as a transformers model (written by `capline export --format hf`).

CLIP's vision tower turns pixels into the vector the captioner was trained on, the
mapper turns it into ``prefix_length`` GPT-2 input embeddings, and GPT-2 continues
them with a caption. Self-contained: needs torch and transformers only, never
capline; the two mapper types repeat capline's pipeline/models/mapper.py.

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)
    processor = AutoImageProcessor.from_pretrained(DIR)
    tokenizer = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # it reads config.json
    ids = model.generate(pixel_values=processor(images=image, return_tensors="pt").pixel_values)
    tokenizer.batch_decode(ids, skip_special_tokens=True)
"""
import torch
from torch import nn
from transformers import CLIPVisionModelWithProjection, GenerationConfig, GPT2LMHeadModel, PreTrainedModel

from .configuration_capline import CaplineConfig


class MLPMapper(nn.Module):
    def __init__(self, clip_dim, width, prefix_length, dropout=0.0, **_):
        super().__init__()
        self.prefix_length, self.width = prefix_length, width
        self.net = nn.Sequential(nn.Linear(clip_dim, width * prefix_length // 2), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(width * prefix_length // 2, width * prefix_length))

    def forward(self, clip_vectors):
        return self.net(clip_vectors).view(-1, self.prefix_length, self.width)


class TransformerMapper(nn.Module):
    def __init__(self, clip_dim, width, prefix_length, clip_length=10, layers=8, heads=8, mlp_ratio=2.0,
                 dropout=0.0, **_):
        super().__init__()
        self.clip_length, self.width = clip_length, width
        self.project = nn.Linear(clip_dim, clip_length * width)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, width))
        block = nn.TransformerEncoderLayer(d_model=width, nhead=heads, dim_feedforward=int(width * mlp_ratio),
                                           dropout=dropout, activation="relu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, num_layers=layers, enable_nested_tensor=False)

    def forward(self, clip_vectors):
        b = clip_vectors.shape[0]
        x = self.project(clip_vectors).view(b, self.clip_length, self.width)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1).to(x.dtype)
        return self.blocks(torch.cat([x, const], dim=1))[:, self.clip_length:]


MAPPERS = {"mlp": MLPMapper, "transformer": TransformerMapper}


class CaplineCaptioner(PreTrainedModel):
    config_class = CaplineConfig
    main_input_name = "pixel_values"
    _tied_weights_keys = {"gpt.lm_head.weight": "gpt.transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        settings = dict(config.mapper)
        self.vision = CLIPVisionModelWithProjection(config.vision_config)
        self.mapper = MAPPERS[settings.pop("type")](**settings)
        self.gpt = GPT2LMHeadModel(config.text_config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # The captioner's decoding defaults (beam width, lengths) live in the folder's generation_config.json.
        keys = ("cache_dir", "revision", "local_files_only", "token", "subfolder")
        try:
            model.gpt.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in keys if k in kwargs})
        except OSError:
            pass
        return model

    def image_features(self, pixel_values):
        """[B, 3, H, W] -> [B, clip_dim]: the vectors the captioner was trained on."""
        x = pixel_values.to(self.vision.dtype)
        pooled = self.vision.vision_model(pixel_values=x).pooler_output
        out = self.vision.visual_projection(pooled) if self.config.output == "image_embeds" else pooled
        out = out.float()
        return nn.functional.normalize(out, dim=-1) if self.config.normalized else out

    def prefix(self, pixel_values):
        """[B, 3, H, W] -> [B, prefix_length, n_embd]: GPT-2's input embeddings."""
        vectors = self.image_features(pixel_values)
        dtype = self.gpt.get_input_embeddings().weight.dtype
        return self.mapper(vectors.to(next(self.mapper.parameters()).dtype)).to(dtype)

    def forward(self, pixel_values, input_ids=None, attention_mask=None, labels=None):
        """GPT-2 over cat(prefix, input_ids); ``labels`` (-100 ignored) give the loss on the caption tokens."""
        prefix = self.prefix(pixel_values)
        embeds = prefix if input_ids is None else torch.cat([prefix, self.gpt.get_input_embeddings()(input_ids)], 1)
        mask = None
        if attention_mask is not None:
            mask = torch.cat([attention_mask.new_ones(prefix.shape[:2]), attention_mask], dim=1)
        if labels is not None:
            labels = torch.cat([labels.new_full(prefix.shape[:2], -100), labels], dim=1)
        return self.gpt(inputs_embeds=embeds, attention_mask=mask, labels=labels)

    @torch.no_grad()
    def generate(self, pixel_values, **kwargs):
        """Caption token ids (the new tokens only) for each image; generate's options override the folder's."""
        prefix = self.prefix(pixel_values)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        return self.gpt.generate(inputs_embeds=prefix, attention_mask=mask, **kwargs)
