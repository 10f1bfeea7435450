import subprocess
import sys

import pytest
import torch


def test_package_imports_and_registers_configs():
    import open_clip
    import open_clip_po

    assert open_clip_po.__version__
    assert {"po-tiny", "po-small"} <= set(open_clip_po.MODEL_NAMES)
    assert "po-tiny" in open_clip.list_models()
    assert "po-small" in open_clip.list_models()


def test_forward_gives_normalised_features_of_dim_32(tiny_model_and_transforms):
    model, _, preprocess_val, tokenizer = tiny_model_and_transforms
    images = torch.randn(3, 3, 64, 64)
    texts = tokenizer(["a photo of a cat.", "a dog", "a red square"])
    assert texts.shape == (3, 16)
    with torch.no_grad():
        out = model(images, texts)
    assert out["image_features"].shape == (3, 32)
    assert out["text_features"].shape == (3, 32)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["text_features"].norm(dim=-1), torch.ones(3))


def test_stock_factory_builds_po_tiny_with_transforms():
    import open_clip
    import open_clip_po  # noqa: F401

    model, _, preprocess = open_clip.create_model_and_transforms("po-tiny")
    from PIL import Image

    image = preprocess(Image.new("RGB", (100, 80), "red"))
    assert image.shape == (3, 64, 64)
    assert model.visual.image_size == (64, 64)


def test_one_training_step_on_po_tiny_batch_32():
    import open_clip
    import open_clip_po  # noqa: F401

    model = open_clip.create_model("po-tiny", output_dict=True)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images = torch.randn(32, 3, 64, 64)
    texts = torch.randint(1, 1000, (32, 16))
    before = model.visual.conv1.weight.detach().clone()
    out = model(images, texts)
    loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.visual.conv1.weight)


@pytest.mark.parametrize("version,ok", [("3.3.0", True), ("3.1.0", True), ("3.0.2", False),
                                        ("4.0.0", False), ("4.0.0.dev1", False), ("2.24.0", False)])
def test_version_guard(version, ok):
    from open_clip_po import UnsupportedOpenClipVersion, check_open_clip_version

    if ok:
        assert check_open_clip_version(version) == version
    else:
        with pytest.raises(UnsupportedOpenClipVersion, match=r"open_clip_torch>=3.1,<4; found"):
            check_open_clip_version(version)


def test_import_fails_in_one_line_on_unsupported_open_clip(monkeypatch):
    code = (
        "import importlib.metadata as m\n"
        "real = m.version\n"
        "m.version = lambda name: '4.1.0' if name == 'open_clip_torch' else real(name)\n"
        "import open_clip_po\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "open_clip_po supports open_clip_torch>=3.1,<4; found 4.1.0")


def test_print_model_from_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-c", "import open_clip_po, open_clip; print(open_clip.create_model('po-tiny'))"],
        capture_output=True, text=True, check=True)
    assert "VisionTransformer" in proc.stdout
