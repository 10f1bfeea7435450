"""Checkpoint surgery: W_t = U Σ^t Vᵀ (paper Eq. 16), folding W_t into stock projections, the CLI."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

import open_clip_po
from open_clip_po.checkpoint import atomic_save, create_model_from_checkpoint, load_checkpoint
from open_clip_po.head import attach_linear_head, has_linear_head
from open_clip_po.surgery.cli import SurgeryError, default_output_path, fold_head, head_model_at, main, scale_head
from open_clip_po.surgery import find_projection, head_stats

PO_TINY_JSON = Path(open_clip_po.__file__).parent / "model_configs" / "po-tiny.json"
ERROR_PREFIX = "open-clip-po-svd-scale: error: "


def random_head(dim=32, seed=0, scale=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.eye(dim, dtype=torch.float64) + scale * torch.randn(dim, dim, generator=g, dtype=torch.float64)).to(dtype)


def sym_power(G, t):
    """G^t for a symmetric positive definite G, by eigendecomposition (independent of the SVD path)."""
    evals, evecs = torch.linalg.eigh(G)
    return (evecs * evals.pow(t)) @ evecs.T


@pytest.fixture(scope="module")
def inputs(tiny_model_and_transforms):
    tokenizer = tiny_model_and_transforms[3]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 64, 64, generator=g)
    texts = tokenizer(["a photo of a cat.", "a dog", "a red square", "the word apple", "two birds"])
    return images, texts


@torch.no_grad()
def normalised_features(model, images, texts):
    return (F.normalize(model.encode_image(images), dim=-1), F.normalize(model.encode_text(texts), dim=-1))


@torch.no_grad()
def logits(model, images, texts):
    image_features, text_features = normalised_features(model, images, texts)
    return model.logit_scale.exp() * image_features @ text_features.T


def stock_model_with(model, state_dict):
    stock = copy.deepcopy(model)
    stock.load_state_dict(state_dict)
    return stock


# ---------------------------------------------------------------- scale_head


def test_t1_gives_w_back_and_t0_gives_the_orthogonal_polar_factor():
    W = random_head(dtype=torch.float64)
    torch.testing.assert_close(scale_head(W, 1.0), W, rtol=0, atol=1e-12)
    # U Vᵀ is the orthogonal factor of the polar decomposition W = Q (WᵀW)^{1/2}.
    Q = W @ sym_power(W.T @ W, -0.5)
    W0 = scale_head(W, 0.0)
    torch.testing.assert_close(W0, Q, rtol=0, atol=1e-10)
    torch.testing.assert_close(W0.T @ W0, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [2.0, -1.0, 0.5, -2.5])
def test_gram_of_w_t_is_the_gram_of_w_to_the_power_t(t):
    # W_tᵀ W_t = V Σ^{2t} Vᵀ = (WᵀW)^t: what the similarities see when W sits on both towers.
    W = random_head(seed=2, dtype=torch.float64)
    W_t = scale_head(W, t)
    torch.testing.assert_close(W_t.T @ W_t, sym_power(W.T @ W, t), rtol=1e-9, atol=1e-9)


def test_on_a_positive_definite_head_w_t_is_the_matrix_power():
    A = random_head(seed=3, dtype=torch.float64)
    S = A @ A.T + 0.5 * torch.eye(32, dtype=torch.float64)
    torch.testing.assert_close(scale_head(S, 2), S @ S, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale_head(S, -1), torch.linalg.inv(S), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale_head(S, 0), torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-10)


@pytest.mark.parametrize("a,b", [(2.0, -0.5), (-1.0, -1.0), (0.5, 3.0), (-2.0, 0.25), (3.0, 0.0)])
def test_scaling_twice_composes_like_the_product_of_the_powers(a, b):
    W = random_head(seed=4, dtype=torch.float64)
    twice = scale_head(scale_head(W, a), b)
    torch.testing.assert_close(twice, scale_head(W, a * b), rtol=1e-9, atol=1e-9)
    expected = torch.linalg.svdvals(W).pow(a * b).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(twice), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_head_returns_the_dtype_of_w(dtype):
    W = random_head(dtype=dtype)
    W_t = scale_head(W, -0.5)
    assert W_t.dtype == dtype and W_t.shape == W.shape
    torch.testing.assert_close(W_t.double(), scale_head(W.double(), -0.5), rtol=2e-2, atol=2e-2)


def _with(W, index, value):
    W = W.clone()
    W[index] = value
    return W


@pytest.mark.parametrize("W,t,message", [
    (torch.randn(3, 4), 1.0, "square matrix, got shape (3, 4)"),
    (torch.randn(5), 1.0, "square matrix, got shape (5,)"),
    (torch.eye(4, dtype=torch.int64), 1.0, "floating point"),
    (_with(torch.eye(4), (1, 2), float("nan")), 1.0, "1 non-finite value"),
    (_with(torch.eye(4), (0, 0), float("inf")), 0.0, "1 non-finite value"),
    (torch.eye(4), float("nan"), "t must be a finite number"),
    (torch.eye(4), float("inf"), "t must be a finite number"),
    (torch.diag(torch.tensor([1.0, 2.0, 0.0, 1.0])), -1.0, "W is singular"),
    (torch.diag(torch.tensor([1e10, 1.0, 1.0, 1.0])), 5.0, "non-finite values at t = 5"),
])
def test_scale_head_rejects_what_it_cannot_scale(W, t, message):
    with pytest.raises(SurgeryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        scale_head(W, t)


def test_singular_head_scales_fine_for_non_negative_t():
    W = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(scale_head(W, 2.0), torch.diag(torch.tensor([4.0, 0.0, 1.0])))


def test_head_stats_match_a_hand_computation():
    W = random_head(seed=5, dtype=torch.float64)
    stats = head_stats(W)
    residual = W.T @ W - torch.eye(32, dtype=torch.float64)
    assert stats["gram_minus_identity_fro"] == pytest.approx(residual.pow(2).sum().sqrt().item(), rel=1e-12)
    # Spectral norm of the symmetric residual = its largest |eigenvalue| = max |σ² − 1|.
    sigma = torch.linalg.svdvals(W)
    assert stats["gram_minus_identity_spectral"] == pytest.approx((sigma.pow(2) - 1).abs().max().item(), rel=1e-9)
    assert stats["singular_values"] == pytest.approx(sigma.tolist(), rel=1e-12)
    assert stats["singular_values"] == sorted(stats["singular_values"], reverse=True)


# ---------------------------------------------------------------- fold_head on po-tiny (ViT)


def test_folded_t1_gives_the_logits_of_the_head_model(tiny_model, inputs):
    W = random_head(seed=6)
    head_model = copy.deepcopy(tiny_model)
    attach_linear_head(head_model, W)
    folded = stock_model_with(tiny_model, fold_head(tiny_model.state_dict(), scale_head(W, 1.0)))
    expected = logits(head_model, *inputs)
    assert not torch.allclose(logits(tiny_model, *inputs), expected, atol=1e-3)  # the head does change them
    torch.testing.assert_close(logits(folded, *inputs), expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(normalised_features(folded, *inputs), normalised_features(head_model, *inputs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert set(fold_head(tiny_model.state_dict(), W)) == set(tiny_model.state_dict())


def test_t0_reproduces_the_base_similarities_exactly(tiny_model, inputs):
    model = tiny_model.double()
    images, texts = inputs[0].double(), inputs[1]
    W = random_head(seed=7, dtype=torch.float64)
    folded = head_model_at(model, W, t=0.0)
    torch.testing.assert_close(logits(folded, images, texts), logits(model, images, texts), rtol=0, atol=1e-10)
    # ...although the features themselves are rotated by U Vᵀ.
    assert not torch.allclose(normalised_features(folded, images, texts)[0],
                              normalised_features(model, images, texts)[0], atol=1e-2)


def test_t0_in_float32_matches_base_within_float_tolerance(tiny_model, inputs):
    folded = head_model_at(tiny_model, random_head(seed=8), t=0.0)
    torch.testing.assert_close(logits(folded, *inputs), logits(tiny_model, *inputs), rtol=1e-5, atol=1e-5)


def test_negative_t_reverses_a_head_that_amplifies_one_direction(tiny_model, inputs):
    model = tiny_model.double()
    images, texts = inputs[0].double(), inputs[1]
    base_image, base_text = normalised_features(model, images, texts)
    # Toy head: stretch by k the direction v halfway between image 0 and text 0.
    v = F.normalize(base_image[0] + base_text[0], dim=0)
    k = 3.0
    W = torch.eye(32, dtype=torch.float64) + (k - 1) * torch.outer(v, v)
    similarity = {}
    for t in (-1.0, 0.0, 1.0):
        folded = head_model_at(model, W, t)
        got = logits(folded, images, texts) / model.logit_scale.exp()
        # By hand: W is symmetric positive definite, so W_t = I + (k^t − 1) v vᵀ.
        W_t = torch.eye(32, dtype=torch.float64) + (k ** t - 1) * torch.outer(v, v)
        want = F.normalize(base_image @ W_t.T, dim=-1) @ F.normalize(base_text @ W_t.T, dim=-1).T
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        similarity[t] = got[0, 0].item()
    base = (base_image[0] @ base_text[0]).item()
    assert similarity[0.0] == pytest.approx(base, abs=1e-10)
    assert similarity[-1.0] < base - 1e-3 < base + 1e-3 < similarity[1.0]


def test_fold_head_drops_the_module_prefix_and_leaves_its_input_alone(tiny_model):
    W = random_head(seed=9)
    state_dict = tiny_model.state_dict()
    prefixed = {f"module.{k}": v.clone() for k, v in state_dict.items()}
    before = {k: v.clone() for k, v in prefixed.items()}
    folded = fold_head(prefixed, W)
    assert set(folded) == set(state_dict)
    for key, value in fold_head(state_dict, W).items():
        assert torch.equal(folded[key], value), key
    for key, value in before.items():
        assert torch.equal(prefixed[key], value), key
    # By hand, for the two projections of a ViT CLIP.
    torch.testing.assert_close(folded["visual.proj"], state_dict["visual.proj"] @ W.T)
    torch.testing.assert_close(folded["text_projection"], state_dict["text_projection"] @ W.T)


def test_head_model_at_uses_the_attached_head_and_leaves_the_model_as_it_was(tiny_model, inputs):
    W = random_head(seed=10)
    head_model = copy.deepcopy(tiny_model)
    attach_linear_head(head_model, W)
    expected = normalised_features(head_model, *inputs)
    stock = head_model_at(head_model, t=1.0)
    assert not has_linear_head(stock) and "encode_image" not in vars(stock)
    for got, want in zip(normalised_features(stock, *inputs), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(normalised_features(head_model, *inputs), expected):  # still the head model
        assert torch.equal(got, want)
    assert torch.equal(head_model.visual.proj, tiny_model.visual.proj)


# ---------------------------------------------------------------- other architectures

TINY_TEXT = dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1)
ARCHITECTURES = {
    # name: (model class, vision cfg, text cfg, image size, projection keys fold_head must find)
    "ModifiedResNet": (open_clip.CLIP, dict(layers=[1, 1, 1, 1], width=8, head_width=64, image_size=64),
                       TINY_TEXT, 64, ("visual.attnpool.c_proj.weight", "text_projection")),
    "Linear text projection": (open_clip.CLIP, dict(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                               dict(TINY_TEXT, proj_bias=True), 32, ("visual.proj", "text_projection.weight")),
    "CustomTextCLIP": (open_clip.CustomTextCLIP, dict(layers=1, width=32, head_width=16, patch_size=16, image_size=32),
                       dict(TINY_TEXT, proj_bias=True), 32, ("visual.proj", "text.text_projection.weight")),
    "CustomTextCLIP Parameter": (open_clip.CustomTextCLIP, dict(layers=[1, 1, 1, 1], width=8, image_size=64),
                                 TINY_TEXT, 64, ("visual.attnpool.c_proj.weight", "text.text_projection")),
    "timm linear proj": (open_clip.CLIP, dict(timm_model_name="test_resnet", timm_pool="avg", timm_proj="linear",
                                              timm_proj_bias=True, image_size=64),
                         TINY_TEXT, 64, ("visual.head.proj.weight", "text_projection")),
    "timm mlp proj": (open_clip.CLIP, dict(timm_model_name="test_resnet", timm_pool="avg", timm_proj="mlp",
                                           timm_proj_bias=True, image_size=64),
                      TINY_TEXT, 64, ("visual.head.mlp.fc2.weight", "text_projection")),
    "timm trunk fc": (open_clip.CLIP, dict(timm_model_name="test_resnet", timm_pool="avg", timm_proj=None,
                                           image_size=64), TINY_TEXT, 64, ("visual.trunk.fc.weight", "text_projection")),
    "timm trunk head": (open_clip.CLIP, dict(timm_model_name="test_vit", timm_pool="token", timm_proj=None,
                                             image_size=160),
                        TINY_TEXT, 160, ("visual.trunk.head.weight", "text_projection")),
    "timm trunk head.fc": (open_clip.CLIP, dict(timm_model_name="test_convnext", timm_pool="avg", timm_proj=None,
                                                image_size=64),
                           TINY_TEXT, 64, ("visual.trunk.head.fc.weight", "text_projection")),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_folding_matches_the_head_model_on_every_supported_tower(name):
    cls, vision_cfg, text_cfg, size, keys = ARCHITECTURES[name]
    torch.manual_seed(0)
    model = cls(32, vision_cfg, text_cfg).eval()
    state_dict = model.state_dict()
    assert (find_projection(state_dict, "image").weight_key, find_projection(state_dict, "text").weight_key) == keys
    # Biases must be non-zero for the test to see whether they are folded.
    for key in state_dict:
        if key.endswith("bias") and any(key.startswith(k.rsplit(".", 1)[0]) for k in keys):
            state_dict[key].normal_()
    model.load_state_dict(state_dict)
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = torch.randint(1, 999, (3, 16), generator=torch.Generator().manual_seed(0))
    W = random_head(seed=11)
    head_model = copy.deepcopy(model)
    attach_linear_head(head_model, scale_head(W, 1.5))
    folded = head_model_at(model, W, t=1.5)
    for got, want in zip(normalised_features(folded, images, texts), normalised_features(head_model, images, texts)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_text_projections_fold_as_linear_maps():
    # transformers is not installed here, so check the HFTextEncoder keys by hand on a state dict.
    g = torch.Generator().manual_seed(12)
    W = random_head(dim=8, seed=12)
    base = {"visual.proj": torch.randn(16, 8, generator=g)}
    linear = dict(base, **{"text.transformer.embeddings.x": torch.zeros(1), "text.proj.weight": torch.randn(8, 24, generator=g)})
    torch.testing.assert_close(fold_head(linear, W)["text.proj.weight"], W @ linear["text.proj.weight"])
    mlp = dict(base, **{"text.proj.0.weight": torch.randn(20, 24, generator=g), "text.proj.2.weight": torch.randn(8, 20, generator=g)})
    folded = fold_head(mlp, W)
    torch.testing.assert_close(folded["text.proj.2.weight"], W @ mlp["text.proj.2.weight"])
    assert torch.equal(folded["text.proj.0.weight"], mlp["text.proj.0.weight"])


def _without(state_dict, *keys):
    return {k: v for k, v in state_dict.items() if k not in keys}


def test_fold_head_names_the_architecture_it_cannot_fold(tiny_model):
    state_dict, W = tiny_model.state_dict(), random_head()
    with pytest.raises(SurgeryError, match=r"unsupported architecture: the image tower \(VisionTransformer without a "
                                           r"projection \(proj is None\)\)"):
        fold_head(_without(state_dict, "visual.proj"), W)
    with pytest.raises(SurgeryError, match=r"the text tower \(TextTransformer without a projection"):
        fold_head(_without(state_dict, "text_projection"), W)
    # SigLIP: timm attention pooling ends in a residual MLP, no final linear map.
    siglip = {k: v for k, v in state_dict.items() if not k.startswith("visual.")}
    siglip.update({"visual.trunk.attn_pool.mlp.fc2.weight": torch.zeros(32, 64), "visual.trunk.norm.weight": torch.ones(32)})
    with pytest.raises(SurgeryError, match=r"image tower \(timm image tower \(TimmModel\)\) has no final linear"):
        fold_head(siglip, W)
    with pytest.raises(SurgeryError, match="the head W is 16x16 but the model's embedding dimension is 32"):
        fold_head(state_dict, random_head(dim=16))
    mismatched = dict(state_dict, text_projection=torch.zeros(64, 16))
    with pytest.raises(SurgeryError, match="gives 32 features but the text projection text_projection gives 16"):
        fold_head(mismatched, W)


# ---------------------------------------------------------------- the CLI


def write_checkpoint(path, model, W=None, prefix="", average=None, **extra):
    checkpoint = {"epoch": 1, "name": "x", "optimizer": {"state": {}, "param_groups": []},
                  "state_dict": {prefix + k: v for k, v in model.state_dict().items()}, **extra}
    if W is not None:
        checkpoint["po_head"] = {"weight": W}
    if average is not None:
        checkpoint["po_average"] = average
    atomic_save(checkpoint, path)
    return Path(path)


@pytest.fixture
def head_checkpoint(tmp_path, tiny_model):
    W = random_head(seed=13)
    return write_checkpoint(tmp_path / "epoch_1.pt", tiny_model, W, prefix="module."), W


def test_cli_folds_a_ddp_checkpoint_into_a_stock_one(head_checkpoint, tiny_model, capsys):
    path, W = head_checkpoint
    assert main([str(path), "--t", "-1"]) == 0
    out = path.with_name("epoch_1.t-1.pt")
    assert str(out) in capsys.readouterr().out
    written = load_checkpoint(out)
    assert set(written) == {"epoch", "name", "state_dict", "po_svd_scale", "po_version"}  # no optimizer, no head
    assert written["po_svd_scale"] == {"t": -1.0, "weights": "raw", "folded": True, "towers": "both",
                                      "param": "dense", "source": str(path)}
    expected = fold_head(tiny_model.state_dict(), scale_head(W, -1.0))
    assert set(written["state_dict"]) == set(expected)
    for key, value in expected.items():
        assert torch.equal(written["state_dict"][key], value), key


def test_cli_keep_head_writes_w_t_as_the_head(head_checkpoint, tiny_model, inputs, tmp_path):
    path, W = head_checkpoint
    assert main([str(path), "--t", "2.5", "--keep-head"]) == 0
    out = path.with_name("epoch_1.t2.5.head.pt")
    written = load_checkpoint(out)
    assert torch.equal(written["po_head"]["weight"], scale_head(W, 2.5))
    for key, value in tiny_model.state_dict().items():
        assert torch.equal(written["state_dict"][key], value), key
    # The kept head and the folded checkpoint describe the same model.
    assert main([str(path), "--t", "2.5", "--out", str(tmp_path / "folded.pt")]) == 0
    with_head = create_model_from_checkpoint("po-tiny", out)[0].eval()
    folded = create_model_from_checkpoint("po-tiny", tmp_path / "folded.pt")[0].eval()
    assert has_linear_head(with_head) and not has_linear_head(folded)
    torch.testing.assert_close(logits(folded, *inputs), logits(with_head, *inputs), rtol=1e-4, atol=1e-4)


def test_cli_keep_head_output_can_be_scaled_again_and_composes(head_checkpoint, tmp_path):
    path, W = head_checkpoint
    assert main([str(path), "--t", "-2", "--keep-head", "--out", str(tmp_path / "a.pt")]) == 0
    assert main([str(tmp_path / "a.pt"), "--t", "0.5", "--out", str(tmp_path / "ab.pt")]) == 0
    assert main([str(path), "--t", "-1", "--out", str(tmp_path / "direct.pt")]) == 0
    twice, direct = load_checkpoint(tmp_path / "ab.pt"), load_checkpoint(tmp_path / "direct.pt")
    for key, value in direct["state_dict"].items():
        # W_{-2} was stored in float32 (σ up to ~10) before the second SVD, hence the float32-sized tolerance.
        torch.testing.assert_close(twice["state_dict"][key], value, rtol=1e-4, atol=1e-5)


def test_cli_uses_the_averaged_weights_when_asked(tmp_path, tiny_model):
    W_raw, W_avg = random_head(seed=14), random_head(seed=15)
    averaged = {k: v + 0.01 for k, v in tiny_model.state_dict().items()}
    path = write_checkpoint(tmp_path / "epoch_2.pt", tiny_model, W_raw, average={
        "kind": "bma", "state_dict": averaged, "po_head": {"weight": W_avg}, "state": {"count": 3}})
    assert main([str(path), "--t", "0.5", "--weights", "bma"]) == 0
    written = load_checkpoint(tmp_path / "epoch_2.bma.t0.5.pt")
    assert "po_average" not in written
    expected = fold_head(averaged, scale_head(W_avg, 0.5))
    for key, value in expected.items():
        assert torch.equal(written["state_dict"][key], value), key


def test_cli_accepts_negative_t_in_scientific_notation(head_checkpoint):
    path, W = head_checkpoint
    assert main([str(path), "--t", "-1e-3"]) == 0
    written = load_checkpoint(path.with_name("epoch_1.t-0.001.pt"))
    assert written["po_svd_scale"]["t"] == -1e-3


def test_default_output_names():
    assert default_output_path("run/epoch_3.pt", -2) == Path("run/epoch_3.t-2.pt")
    assert default_output_path("epoch_3.pt", 0.5, "ema", keep_head=True) == Path("epoch_3.ema.t0.5.head.pt")
    assert default_output_path("weights", 1) == Path("weights.t1.pt")
    # a run's checkpoints/ folder is where --resume latest looks: the output goes beside it, not into it
    assert default_output_path("logs/run/checkpoints/epoch_3.pt", -2) == Path("logs/run/svd_scale/epoch_3.t-2.pt")


@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink"])
def test_cli_refuses_to_overwrite_its_input(head_checkpoint, spelling, capsys):
    path, _ = head_checkpoint
    before = path.read_bytes()
    out = {"same": path, "dotted": path.parent / "." / ".." / path.parent.name / path.name}.get(spelling)
    if spelling == "symlink":
        out = path.with_name("link.pt")
        out.symlink_to(path)
    elif spelling == "hardlink":
        out = path.with_name("hard.pt")
        os.link(path, out)
    assert main([str(path), "--t", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"{ERROR_PREFIX}refusing to overwrite the input checkpoint {path} (choose another --out)\n"
    assert path.read_bytes() == before


def _bad_checkpoints(tmp_path, model):
    """name → (path, extra args, expected message)."""
    state_dict = model.state_dict()
    cases = {"missing file": (tmp_path / "nope.pt", [], "checkpoint not found"),
             "no head": (write_checkpoint(tmp_path / "nohead.pt", model), [], "has no linear head (po_head)"),
             "non-square": (write_checkpoint(tmp_path / "rect.pt", model, torch.randn(32, 16)), [],
                            "must be a square matrix, got shape (32, 16)"),
             "wrong size": (write_checkpoint(tmp_path / "small.pt", model, random_head(dim=16)), [],
                            "the head W is 16x16 but the model's embedding dimension is 32"),
             "non-finite": (write_checkpoint(tmp_path / "nan.pt", model, _with(random_head(), (3, 4), float("nan"))),
                            [], "the head W has 1 non-finite value(s)"),
             "singular with t < 0": (write_checkpoint(tmp_path / "sing.pt", model, _with(random_head(), 5, 0.0)),
                                     [], "the head W is singular"),
             "no average": (write_checkpoint(tmp_path / "noavg.pt", model, random_head()), ["--weights", "ema"],
                            "has no averaged weights"),
             "not a checkpoint": (tmp_path / "junk.pt", [], "cannot read checkpoint")}
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    unsupported = tmp_path / "noproj.pt"
    atomic_save({"epoch": 1, "name": "x", "state_dict": _without(state_dict, "visual.proj"),
                 "po_head": {"weight": random_head()}}, unsupported)
    cases["unsupported architecture"] = (unsupported, [], "unsupported architecture: the image tower "
                                                          "(VisionTransformer without a projection")
    good = write_checkpoint(tmp_path / "good.pt", model, random_head())
    cases["--out is a directory"] = (good, ["--out", str(tmp_path)], f"--out {tmp_path} is a directory")
    cases["--out below a file"] = (good, ["--out", str(good / "x.pt")], f"File exists: {good}")
    return cases


def test_cli_errors_are_one_line_with_a_non_zero_exit(tmp_path, tiny_model, capsys):
    cases = _bad_checkpoints(tmp_path, tiny_model)
    for name, (path, extra, message) in cases.items():
        before = set(tmp_path.iterdir())
        assert main([str(path), "--t", "-2", *extra]) == 1, name
        captured = capsys.readouterr()
        assert captured.err.startswith(ERROR_PREFIX) and captured.err.count("\n") == 1, (name, captured.err)
        assert message in captured.err, (name, captured.err)
        assert set(tmp_path.iterdir()) == before, f"{name}: wrote a file"  # nothing half-written


def test_cli_keep_head_still_checks_the_head_size(tmp_path, tiny_model, capsys):
    path = write_checkpoint(tmp_path / "small.pt", tiny_model, random_head(dim=16))
    assert main([str(path), "--t", "1", "--keep-head"]) == 1
    assert "the head W is 16x16 but the model's embedding dimension is 32" in capsys.readouterr().err


def test_cli_usage_errors_exit_2(capsys):
    for argv in (["x.pt"], ["x.pt", "--t", "abc"], ["x.pt", "--t", "1", "--fold", "--keep-head"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--t -2" in capsys.readouterr().out


def test_cli_report_writes_json_and_png(head_checkpoint, capsys):
    from PIL import Image

    path, W = head_checkpoint
    assert main([str(path), "--t", "-2", "--report"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(path.with_name("epoch_1.t-2.report.json").read_text())
    W64, W_t = W.double(), scale_head(W, -2.0).double()
    for key, matrix in (("head", W64), ("scaled_head", W_t)):
        residual = matrix.T @ matrix - torch.eye(32, dtype=torch.float64)
        assert report[key]["singular_values"] == pytest.approx(torch.linalg.svdvals(matrix).tolist(), rel=1e-5)
        assert report[key]["gram_minus_identity_fro"] == pytest.approx(residual.norm().item(), rel=1e-5)
        assert report[key]["gram_minus_identity_spectral"] == pytest.approx(
            torch.linalg.eigvalsh(residual).abs().max().item(), rel=1e-5)
        assert f"{report[key]['gram_minus_identity_fro']:.4g}" in printed
    assert report["t"] == -2.0 and report["weights"] == "raw"
    with Image.open(report["png"]) as png:
        assert png.format == "PNG" and png.width > 600 and png.height > 600


# ---------------------------------------------------------------- real processes


@pytest.mark.integration
def test_cli_process_folds_and_stock_open_clip_loads_it_without_the_plugin(head_checkpoint, tiny_model, inputs,
                                                                           tmp_path):
    path, W = head_checkpoint
    # A real command line: "--t -2" must parse as a negative number.
    proc = subprocess.run([sys.executable, "-m", "open_clip_po.svd_scale", str(path), "--t", "-2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = path.with_name("epoch_1.t-2.pt")
    assert out.is_file()

    images, texts = inputs
    torch.save({"images": images, "texts": texts}, tmp_path / "inputs.pt")
    stock_code = f"""
import sys, torch, open_clip
open_clip.add_model_config({str(PO_TINY_JSON)!r})  # po-tiny by path: no open_clip_po import
model, _, _ = open_clip.create_model_and_transforms("po-tiny", pretrained={str(out)!r})
model.eval()
batch = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
with torch.no_grad():
    image = model.encode_image(batch["images"], normalize=True)
    text = model.encode_text(batch["texts"], normalize=True)
torch.save({{"image": image, "text": text, "logit_scale": model.logit_scale.exp()}}, {str(tmp_path / "feats.pt")!r})
assert "open_clip_po" not in sys.modules, "the stock process imported open_clip_po"
"""
    env = dict(os.environ, PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", stock_code], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = torch.load(tmp_path / "feats.pt", weights_only=True)
    want_image, want_text = normalised_features(head_model_at(tiny_model, W, -2.0), images, texts)
    torch.testing.assert_close(got["image"], want_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["text"], want_text, rtol=1e-5, atol=1e-6)
    # By hand: normalise(W_t f) of the base features.
    W_t = scale_head(W, -2.0)
    with torch.no_grad():
        base_image = tiny_model.encode_image(images)
    torch.testing.assert_close(got["image"], F.normalize(base_image @ W_t.T, dim=-1), rtol=1e-4, atol=1e-5)


@pytest.mark.integration
def test_console_script_exits_non_zero_with_one_line(tmp_path):
    script = Path(sys.executable).with_name("open-clip-po-svd-scale")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "open_clip_po.svd_scale"]
    proc = subprocess.run([*command, str(tmp_path / "missing.pt"), "--t", "-2"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == f"{ERROR_PREFIX}checkpoint not found: {tmp_path / 'missing.pt'}\n"
