"""`capline export --format hf`: a Hugging Face model folder that loads offline in a fresh
process with transformers alone and captions as `capline caption` does."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.caption.run import caption_inputs
from pipeline.core import torchvision_compat
from pipeline.core.params import Decoding
from stages.cli import capline
from tests.helpers.export import make_images, trained_captioner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Run in a fresh interpreter: capline's packages are made unimportable, the hub unreachable.
LOAD_AND_CAPTION = r"""
import json, sys
sys.modules["pipeline"] = None  # the folder's code must not need capline
sys.modules["stages"] = None
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer
folder, images = sys.argv[1], sys.argv[2:]
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt").pixel_values
out = {}
for name, options in (("defaults", {}), ("greedy", {"num_beams": 1, "max_new_tokens": 8})):
    ids = model.generate(pixel_values=pixels, **options)
    out[name] = [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def hf_export(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    root = tmp_path_factory.mktemp("hf")
    images = make_images(root / "images", 12)
    model = trained_captioner(root / "model", hub_clip_dir, tiny_gpt_dir, images)
    metrics = {"cider": 1.234, "bleu_4": 0.42, "baseline_cider": 0.1, "control_cider": 0.05, "clip_s": 0.7}
    (root / "eval.json").write_text(json.dumps(metrics))
    (root / "params.yaml").write_text("data:\n  source: coco\n  annotations: captions_train2014.json\n"
                                      "train:\n  epochs: 10\n")
    result = CliRunner().invoke(capline, ["export", "--model", str(model), "--format", "hf", "--out",
                                          str(root / "hf"), "--metrics", str(root / "eval.json"),
                                          "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return model, root / "hf", [str(p) for p in images]


def torchvision_guard(folder) -> str:
    """A folder whose sitecustomize installs capline's torchvision guard (a copy of the one
    module, which needs only torch): this environment's torchvision is PyPI's CUDA build
    beside the CPU torch, where transformers' own import of it fails without the guard
    (pipeline/core/torchvision_compat.py). A user of the folder has a matching pair."""
    folder.mkdir()
    (folder / "torchvision_compat.py").write_text(open(torchvision_compat.__file__).read())
    (folder / "sitecustomize.py").write_text("import torchvision_compat\ntorchvision_compat.install()\n")
    return str(folder)


def test_the_folder_loads_offline_alone_and_captions_as_capline(hf_export, tmp_path):
    model_dir, hf_dir, images = hf_export
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "PYTHONPATH": torchvision_guard(tmp_path / "site"), "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_CAPTION, str(hf_dir), *images], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    defaults = [r.texts[0] for r in caption_inputs(model_dir, images, precision="fp32", progress=False)]
    greedy = [r.texts[0] for r in caption_inputs(model_dir, images, Decoding(num_beams=1, max_new_tokens=8),
                                                 precision="fp32", progress=False)]
    assert len(set(defaults)) >= 4  # the captions depend on the image
    assert got == {"defaults": defaults, "greedy": greedy}


def test_the_model_card_says_what_the_model_is_and_how_it_scores(hf_export):
    _, hf_dir, _ = hf_export
    card = (hf_dir / "README.md").read_text()
    assert card.startswith("---\npipeline_tag: image-to-text\n")
    assert "captions_train2014.json" in card and '"epochs": 10' in card  # training data, params
    assert '"type": "transformer"' in card  # the mapper
    assert "| model | 0.4200 | 1.2340 | 0.7000 |" in card
    assert "| baseline (best constant caption) |  | 0.1000 |  |" in card
    assert "| control (shuffled images) |  | 0.0500 |  |" in card
    assert "huggingface-cli upload" in card
    for name in ("config.json", "model.safetensors", "configuration_capline.py", "modeling_capline.py",
                 "preprocessor_config.json", "tokenizer.json", "generation_config.json", "eval.json"):
        assert (hf_dir / name).is_file(), name
