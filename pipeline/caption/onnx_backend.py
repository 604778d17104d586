"""Captioning with an exported ONNX folder (``capline export --format onnx``) on ONNX Runtime.

The folder holds three graphs (``onnx.json`` names them): ``clip.onnx`` (pixels ->
the vector the captioner was trained on), ``mapper.onnx`` (vector -> prefix) and
``decoder.onnx`` (GPT-2, one step with past keys/values; pipeline/export/decoder.py).
Decoding is not re-implemented: ``OrtGpt`` is a transformers model whose forward
runs the decoder graph, so transformers' ``generate`` (greedy, beam search, the
seeded sampler of pipeline/text/decoding.py) drives it exactly as it drives GPT-2
in PyTorch, and ``OnnxCaptioner`` offers what ``decode_batch`` reads of a
``ClipCaptioner``. Images are preprocessed by the same ``Preprocessor`` as the
embed stage, from the folder's ``preprocessor_config.json``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import GenerationMixin, GPT2Config, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from pipeline.models.captioner import TokenLimits
from pipeline.models.pretrained import ModelError

MANIFEST = "onnx.json"
FORMAT = "capline-onnx"
FORMAT_VERSION = 1


def is_onnx_folder(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ModelError(f"{folder}: not an exported ONNX folder (no {MANIFEST}); run `capline export --format onnx`")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}, "
                         f"expected {FORMAT!r} version {FORMAT_VERSION}; export it again")
    return manifest


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; ``threads`` 0 lets ONNX Runtime pick (one per physical core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle worker threads sleep instead of spinning: three sessions (and torch) share a small CPU.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class _Body:
    """``gpt.transformer(inputs_embeds=..., use_cache=True).cache``: what decode_batch's prefix cache calls."""

    def __init__(self, gpt: "OrtGpt") -> None:
        self.gpt = gpt

    def __call__(self, inputs_embeds: torch.Tensor, use_cache: bool = True, **_: Any) -> BaseModelOutputWithPast:
        cache = DynamicCache()
        self.gpt.step(inputs_embeds, None, cache)
        return BaseModelOutputWithPast(cache=cache)


class OrtGpt(PreTrainedModel, GenerationMixin):
    """GPT-2 for transformers' ``generate``, computed by the exported decoder graph."""

    config_class = GPT2Config
    main_input_name = "input_ids"

    def __init__(self, config: GPT2Config, decoder) -> None:
        super().__init__(config)
        self.decoder = decoder
        self.n_layer = int(config.n_layer)
        self.head_dim = int(config.n_embd) // int(config.n_head)
        self._anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the model a device and dtype
        self.transformer = _Body(self)

    def step(self, inputs_embeds: Optional[torch.Tensor], input_ids: Optional[torch.Tensor],
             cache: DynamicCache) -> torch.Tensor:
        """Run the graph on the new positions; append their keys/values to ``cache``; last position's logits."""
        rows = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        embeds = (inputs_embeds.float().numpy() if inputs_embeds is not None
                  else np.zeros((rows, 0, self.config.n_embd), np.float32))
        ids = input_ids.numpy().astype(np.int64) if input_ids is not None else np.zeros((rows, 0), np.int64)
        feed = {"inputs_embeds": embeds, "input_ids": ids}
        empty = np.zeros((rows, self.config.n_head, 0, self.head_dim), np.float32)
        for i in range(self.n_layer):
            layer = cache.layers[i] if i < len(cache.layers) and cache.get_seq_length(i) > 0 else None
            feed[f"past_key_{i}"] = layer.keys.numpy() if layer is not None else empty
            feed[f"past_value_{i}"] = layer.values.numpy() if layer is not None else empty
        out = self.decoder.run(None, feed)
        for i in range(self.n_layer):
            cache.update(torch.from_numpy(out[1 + 2 * i]), torch.from_numpy(out[2 + 2 * i]), i)
        return torch.from_numpy(out[0])

    def forward(self, input_ids: Optional[torch.Tensor] = None, cache: Optional[DynamicCache] = None,
                attention_mask: Optional[torch.Tensor] = None, inputs_embeds: Optional[torch.Tensor] = None,
                **_: Any) -> CausalLMOutputWithPast:
        # Every row has the same length and no padding; a mask with a zero would need masking we do not do.
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ModelError("the ONNX decoder supports unpadded rows only (an attention mask with zeros)")
        cache = cache if cache is not None else DynamicCache()
        logits = self.step(inputs_embeds, input_ids, cache)
        return CausalLMOutputWithPast(logits=logits, cache=cache)


class OnnxCaptioner(TokenLimits):
    """What ``decode_batch`` and ``check_room`` read of a ``ClipCaptioner``, on ONNX Runtime."""

    device = torch.device("cpu")

    def __init__(self, folder: str | Path, threads: int = 0) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        folder = Path(folder)
        self.manifest = read_manifest(folder)
        self.folder = folder
        self.features = dict(self.manifest.get("features") or {})
        self.clip_dim = int(self.manifest["clip_dim"])
        self.prefix_length = int(self.manifest["prefix_length"])
        self.tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.mapper = session(folder / self.manifest["mapper"], threads)
        gpt_config = GPT2Config(**self.manifest["gpt_config"])
        self.gpt = OrtGpt(gpt_config, session(folder / self.manifest["decoder"], threads)).eval()
        self.gpt.generation_config = GenerationConfig.from_pretrained(folder)

    def prefix(self, clip_vectors: torch.Tensor) -> torch.Tensor:
        (prefix,) = self.mapper.run(None, {"features": clip_vectors.float().cpu().numpy()})
        return torch.from_numpy(prefix)

    def attending(self, clip_vectors: torch.Tensor):
        """Nothing to attach: exported models are prefix models (export refuses cross-attention)."""
        import contextlib

        return contextlib.nullcontext()

    def decode(self, ids: torch.Tensor) -> list[str]:
        from pipeline.models.captioner import ClipCaptioner

        return ClipCaptioner.decode(self, ids)  # the same cut at EOS and stripping


class OnnxEmbedder:
    """Images as the training features were made: the folder's preprocessing, then ``clip.onnx``."""

    def __init__(self, folder: str | Path, threads: int = 0, max_pixels: Optional[int] = None) -> None:
        from pipeline.embed.preprocess import Preprocessor
        from pipeline.models.pretrained import image_processor_class

        folder = Path(folder)
        manifest = read_manifest(folder)
        processor = image_processor_class().from_pretrained(folder, trust_remote_code=False)
        recorded = (manifest.get("features") or {}).get("preprocess")
        mode = json.loads(recorded).get("mode", "processor") if recorded else "processor"
        self.pre = Preprocessor.from_processor(processor, mode, max_pixels=max_pixels)
        self.clip = session(folder / manifest["clip"], threads)
        self.dim = int(manifest["clip_dim"])

    def __call__(self, pixels_uint8: list[torch.Tensor]) -> torch.Tensor:
        pixels = self.pre.normalize(torch.stack(pixels_uint8))
        (vectors,) = self.clip.run(None, {"pixel_values": pixels.numpy()})
        return torch.from_numpy(vectors)
