"""`capline export --format onnx` and the ONNX Runtime caption backend: the exported folder
captions as the PyTorch model does (fp32: the same captions; int8: nearly all), alone."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from pipeline.caption.onnx_backend import OnnxEmbedder
from pipeline.caption.run import ImageEmbedder, caption_inputs
from pipeline.core.params import Decoding
from pipeline.models.captioner import ClipCaptioner
from stages.cli import capline
from tests.helpers.export import IMAGES, make_images, trained_captioner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = Decoding(num_beams=1, max_new_tokens=8)
BEAM = Decoding(num_beams=3, num_return_sequences=2, max_new_tokens=8)
SAMPLE = Decoding(do_sample=True, num_beams=1, num_return_sequences=2, top_k=5, seed=7, max_new_tokens=8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, hub_clip_dir, tiny_gpt_dir):
    """(model folder, fp32 export, int8 export, images): both exports made by the command."""
    root = tmp_path_factory.mktemp("export")
    images = make_images(root / "images")
    model = trained_captioner(root / "model", hub_clip_dir, tiny_gpt_dir, images)
    (root / "eval.json").write_text(json.dumps({"cider": 1.5, "baseline_cider": 0.2}))
    runner = CliRunner()
    for name, extra in (("onnx", []), ("int8", ["--quantize", "int8"])):
        result = runner.invoke(capline, ["export", "--model", str(model), "--format", "onnx", *extra,
                                         "--metrics", str(root / "eval.json"), "--out", str(root / name)])
        assert result.exit_code == 0, result.output
    return model, root / "onnx", root / "int8", [str(p) for p in images]


def captions(folder, images, d, **kw):
    return [r.texts for r in caption_inputs(folder, images, d, progress=False, batch_size=8, **kw)]


def agreement(a, b) -> float:
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_the_folder_holds_everything_it_needs(exported):
    _, onnx_dir, int8_dir, _ = exported
    for folder, precision in ((onnx_dir, "fp32"), (int8_dir, "int8")):
        manifest = json.loads((folder / "onnx.json").read_text())
        assert manifest["precision"] == precision
        for name in ("clip.onnx", "mapper.onnx", "decoder.onnx", "preprocessor_config.json", "tokenizer.json",
                     "generation_config.json", "eval.json"):
            assert (folder / name).is_file(), name
        assert not (folder / "captioner.json").exists()  # never mistaken for a PyTorch model folder


def test_images_become_the_vectors_the_model_was_trained_on(exported):
    model_dir, onnx_dir, _, images = exported
    model = ClipCaptioner.load(model_dir)
    ours = OnnxEmbedder(onnx_dir)
    torch_side = ImageEmbedder(model.clip_dir, model.features, torch.device("cpu"), "fp32")
    pixels = [ours.pre.to_uint8(open(p, "rb").read()) for p in images[:6]]
    got, want = ours(pixels), torch_side(pixels)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(6), atol=1e-5)


@pytest.mark.parametrize("d", [GREEDY, BEAM, SAMPLE], ids=["greedy", "beam3", "sample"])
def test_fp32_export_captions_as_pytorch_fp32(exported, d, tmp_path):
    """Found by the folder's contents (no --backend); moved away from the model folder first."""
    model_dir, onnx_dir, _, images = exported
    moved = shutil.copytree(onnx_dir, tmp_path / "deployed")
    want = caption_inputs(model_dir, images, d, precision="fp32", progress=False, batch_size=8)
    got = caption_inputs(moved, images, d, progress=False, batch_size=8)
    assert len({r.texts[0] for r in want}) >= 6  # the captions depend on the image
    assert agreement([r.texts for r in got], [r.texts for r in want]) >= 0.95
    for g, w in zip(got, want):
        if g.texts == w.texts and w.captions[0].score is not None:
            assert [c.score for c in g.captions] == pytest.approx([c.score for c in w.captions], abs=1e-4)


def test_int8_export_is_quantised_and_captions_nearly_as_pytorch_fp32(exported):
    import onnx

    model_dir, onnx_dir, int8_dir, images = exported
    for name in ("clip.onnx", "mapper.onnx", "decoder.onnx"):
        graph = onnx.load(str(int8_dir / name)).graph
        weights = {i.name for i in graph.initializer}
        ops = [n.op_type for n in graph.node]
        assert "MatMulInteger" in ops, name
        float_linear = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert float_linear == [], (name, float_linear)  # every linear layer holds int8 weights
    want = captions(model_dir, images, GREEDY, precision="fp32")
    got = captions(int8_dir, images, GREEDY, backend="onnx")
    # Measured: 22/24 greedy, 24/24 beam; the bound leaves room for another CPU's int8 kernels.
    assert agreement(got, want) >= 0.8, list(zip(got, want))
    beams = captions(int8_dir, images, BEAM)
    assert agreement([b[0] for b in beams], [w[0] for w in captions(model_dir, images, BEAM, precision="fp32")]) >= 0.8


def test_export_replaces_only_an_earlier_export(exported, tmp_path):
    model_dir, _, _, _ = exported
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.jpg").write_bytes(b"mine")
    runner = CliRunner()
    for out in (tmp_path / "photos", model_dir):
        result = runner.invoke(capline, ["export", "--model", str(model_dir), "--format", "onnx", "--out", str(out)])
        assert result.exit_code == 1 and ("refusing" in result.output or "model folder itself" in result.output)
    assert (tmp_path / "photos" / "a.jpg").read_bytes() == b"mine"
    assert (model_dir / "captioner.json").is_file()


def test_backend_is_chosen_by_option_or_folder(exported):
    model_dir, onnx_dir, _, images = exported
    runner = CliRunner()
    ok = runner.invoke(capline, ["caption", "--model", str(onnx_dir), "--backend", "onnx", "--num-beams", "1",
                                 "--max-new-tokens", "8", images[0]])
    assert ok.exit_code == 0, ok.output
    assert ok.output.split("\t")[1].strip() == captions(model_dir, images[:1], GREEDY, precision="fp32")[0][0]
    wrong = runner.invoke(capline, ["caption", "--model", str(model_dir), "--backend", "onnx", images[0]])
    assert wrong.exit_code == 1 and "no onnx.json" in wrong.output
    gpu = runner.invoke(capline, ["caption", "--model", str(onnx_dir), "--device", "cuda", images[0]])
    assert gpu.exit_code == 1 and "runs on the CPU" in gpu.output
