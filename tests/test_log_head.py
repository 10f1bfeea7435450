"""The log-parameterised head W = exp(A) (``--po-head-param log``, the default of ``--po-linear-head``).

What it is for: W_t = exp(t A) is exact and invertible for every t. On both towers A is symmetric, so W is its own
SVD and exp(t A) is the paper's U Σ^t Vᵀ; on the image tower it is the one-parameter group through W, the base model
at t = 0 and W⁻¹ at t = −1. Old checkpoints (a dense W only) keep loading, scaling and folding by the old rules.
"""
import copy
from types import SimpleNamespace

import open_clip
import pytest
import torch
import torch.nn.functional as F

from open_clip_po.trainer import epoch as train_module
from open_clip_po.checkpoint import (CheckpointCodec, CheckpointError, atomic_save, average_entry,
                                     create_model_from_checkpoint, head_generator, load_average, load_checkpoint,
                                     model_weights)
from open_clip_po.averaging import EMA
from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.head import LinearHead, LogLinearHead, attach_linear_head, get_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.reference import make_reference
from open_clip_po.surgery.report import format_singular_values
from open_clip_po.surgery import fold_head, head_model_at, scale_head
from open_clip_po.surgery.cli import main as svd_scale_main

D = 32  # po-tiny's embedding dimension
NAMES = ("cat", "dog", "fox", "owl")


def random_generator(seed=0, scale=0.3, symmetric=True):
    g = torch.Generator().manual_seed(seed)
    A = scale * torch.randn(D, D, generator=g)
    return (A + A.T) / 2 if symmetric else A


@pytest.fixture
def inputs(tiny_model_and_transforms):
    tokenizer = tiny_model_and_transforms[3]
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return images, tokenizer(["a photo of a cat.", "a dog", "the word apple", "two birds"])


@torch.no_grad()
def logits(model, images, texts):
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(texts), dim=-1)
    return model.logit_scale.exp() * image @ text.T


def trained_log_head(model, tokenizer, towers="both", steps=30):
    """A log head trained by DPO on random images (y_w, y_l among four class prompts) until it is far from I."""
    head = attach_linear_head(model, towers=towers, param="log")
    prompts = tokenizer([f"a photo of a {n}." for n in NAMES])
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(8, 3, 64, 64, generator=g), "chosen": prompts[torch.tensor([0, 1, 2, 3] * 2)],
             "rejected": prompts[torch.tensor([1, 2, 3, 0] * 2)], "reg_images": torch.randn(4, 3, 64, 64, generator=g),
             "reg_texts": prompts}
    criterion = POCriterion(get_loss("dpo"), make_reference(is_base_of_head=True), POSettings(reg_lambda=0.1))
    optimizer = torch.optim.Adamax(head.parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(model, batch)["loss"].backward()
        optimizer.step()
    return head


# ---------------------------------------------------------------- the head and its scaling


def test_w_t_of_a_trained_log_head_is_u_sigma_t_v_transposed_of_its_w(tiny_model, tiny_model_and_transforms):
    head = trained_log_head(tiny_model, tiny_model_and_transforms[3])
    A = head.generator.detach()
    assert torch.equal(A, A.T) and A.abs().max() > 0.1  # it trained, and stayed symmetric
    W = head.weight.detach().double()   # what the checkpoint stores as po_head["weight"]
    U, S, Vh = torch.linalg.svd(W)
    for t in (-2.0, -1.0, -0.5, 0.5, 1.0, 2.0, 3.0):
        by_svd = (U * S.pow(t)) @ Vh
        torch.testing.assert_close(scale_head(W, t, "both", log=A), by_svd, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(scale_head(W, t, "both"), by_svd, rtol=1e-9, atol=1e-9)  # the dense rule agrees
    # W is symmetric positive definite: its singular values are e^{eigenvalues of A}
    torch.testing.assert_close(S, torch.linalg.eigvalsh(A.double()).exp().sort(descending=True).values,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("towers", ["both", "image"])
def test_t0_is_the_pretrained_model_exactly(tiny_model, inputs, towers):
    base = copy.deepcopy(tiny_model)
    attach_linear_head(tiny_model, towers=towers, log=random_generator(seed=1, symmetric=towers == "both"))
    assert not torch.allclose(logits(tiny_model, *inputs), logits(base, *inputs), atol=1e-3)
    stock = head_model_at(tiny_model, t=0.0)
    for key, value in base.state_dict().items():
        assert torch.equal(stock.state_dict()[key], value), key
    assert torch.equal(logits(stock, *inputs), logits(base, *inputs))


def test_the_image_head_scales_along_exp_tA_and_inverts_at_minus_one():
    A = random_generator(seed=2, symmetric=False).double()
    W = torch.linalg.matrix_exp(A)
    assert torch.equal(scale_head(W, 0.0, "image", log=A), torch.eye(D, dtype=torch.float64))
    torch.testing.assert_close(scale_head(W, 1.0, "image", log=A), W, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scale_head(W, -1.0, "image", log=A), torch.linalg.inv(W), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale_head(W, 2.0, "image", log=A), W @ W, rtol=1e-10, atol=1e-10)
    # not the dense image head's straight line I + t (W − I), which turns singular wherever 1 + t (μ − 1) = 0 for a
    # real eigenvalue μ of W; exp(t A) never does: det = e^{t tr A}, σ_min ≥ e^{−|t| ‖A‖₂}
    assert not torch.allclose(scale_head(W, -2.0, "image", log=A), scale_head(W, -2.0, "image"), atol=1e-3)
    norm = torch.linalg.matrix_norm(A, ord=2)
    for t in (-3.0, -2.0, 2.5):
        W_t = scale_head(W, t, "image", log=A)
        assert torch.linalg.slogdet(W_t).logabsdet.item() == pytest.approx(t * A.trace().item(), rel=1e-9)
        assert torch.linalg.slogdet(W_t).sign.item() == 1.0
        assert torch.linalg.svdvals(W_t).min() >= torch.exp(-abs(t) * norm) * (1 - 1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_head_computes_w_in_its_own_precision(tiny_model, dtype):
    head = attach_linear_head(tiny_model, log=random_generator(seed=3)).to(dtype)
    assert isinstance(head, LogLinearHead) and head.weight.dtype == dtype
    torch.testing.assert_close(head.weight.double(), torch.linalg.matrix_exp(head.generator.double()),
                               rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-6)


def test_attach_refuses_a_weight_for_a_log_head_and_unknown_params(tiny_model):
    with pytest.raises(ValueError, match="given by its generator"):
        attach_linear_head(tiny_model, torch.eye(D), param="log")
    with pytest.raises(ValueError, match="head param must be one of log, dense, got 'svd'"):
        attach_linear_head(tiny_model, param="svd")


def test_head_gradients_are_averaged_for_every_parameter_of_the_head(tiny_model, monkeypatch):
    # linear-head mode runs without DDP: the trainer all-reduces the head's gradients itself
    head = attach_linear_head(tiny_model, param="log")
    head.log.grad = torch.full_like(head.log, 3.0)
    reduced = []

    def all_reduce(tensor):
        reduced.append(tensor)
        tensor.mul_(2)   # as if a second rank held the same gradient

    monkeypatch.setattr(train_module.dist, "all_reduce", all_reduce)
    train_module._sync_head_grad(tiny_model, SimpleNamespace(distributed=True, po_linear_head=True, world_size=2))
    assert len(reduced) == 1 and reduced[0] is head.log.grad
    assert torch.equal(head.log.grad, torch.full_like(head.log, 3.0))


# ---------------------------------------------------------------- checkpoints


def encoded_log_head_checkpoint(model, towers="both", seed=4):
    attach_linear_head(model, towers=towers, log=random_generator(seed=seed, symmetric=towers == "both"))
    ckpt = {"epoch": 1, "name": "x", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    return CheckpointCodec(linear_head=True, head_towers=towers, head_param="log").encode(ckpt)


def test_a_checkpoint_keeps_w_for_old_readers_and_the_generator_for_exact_scaling(tiny_model, inputs, tmp_path):
    encoded = encoded_log_head_checkpoint(tiny_model)
    entry = encoded["po_head"]
    A = get_linear_head(tiny_model).generator.detach()
    assert entry["param"] == "log" and torch.equal(entry["log"], A) and entry["towers"] == "both"
    torch.testing.assert_close(entry["weight"], torch.linalg.matrix_exp(A.double()).float(), rtol=1e-6, atol=1e-6)
    assert not any(k.removeprefix("module.").startswith("po_head") for k in encoded["state_dict"])
    state_dict, W = model_weights(encoded)   # what an older reader sees: a dense W
    assert torch.equal(W, entry["weight"]) and torch.equal(head_generator(encoded), A)
    path = atomic_save(encoded, tmp_path / "epoch_1.pt")
    stock, _, _ = open_clip.create_model_and_transforms("po-tiny", pretrained=str(path))
    assert not hasattr(stock, "po_head")
    loaded = create_model_from_checkpoint("po-tiny", path)[0].eval()
    assert isinstance(get_linear_head(loaded), LogLinearHead)
    torch.testing.assert_close(logits(loaded, *inputs), logits(tiny_model, *inputs), rtol=1e-5, atol=1e-5)
    # resume: the generator goes back under the model's parameter name; a dense run is told what to do
    decoded, _ = CheckpointCodec(linear_head=True, head_param="log").decode(encoded, "c.pt", distributed=True)
    assert torch.equal(decoded["state_dict"]["module.po_head.log"], A)
    with pytest.raises(CheckpointError, match="c.pt has a log head; resume it with --po-head-param log"):
        CheckpointCodec(linear_head=True, head_param="dense").decode(encoded, "c.pt", distributed=False)


def test_the_average_of_a_log_head_is_the_average_of_its_generator(tiny_model):
    head = attach_linear_head(tiny_model, param="log")
    averager = EMA(tiny_model, decay=0.5)
    with torch.no_grad():
        head.log.copy_(random_generator(seed=5))
    averager.update(tiny_model)
    entry = average_entry(averager, tiny_model.state_dict())
    torch.testing.assert_close(entry["po_head"]["log"], 0.5 * head.generator.detach())
    torch.testing.assert_close(entry["po_head"]["weight"], torch.linalg.matrix_exp(0.5 * head.generator.detach()),
                               rtol=1e-5, atol=1e-6)
    restored = EMA(tiny_model, decay=0.5)
    load_average(restored, entry)
    torch.testing.assert_close(restored.average["po_head.log"], 0.5 * head.log.detach())


@pytest.mark.parametrize("towers", ["both", "image"])
def test_old_format_checkpoints_load_scale_and_fold(tiny_model, inputs, tmp_path, towers):
    """Written before heads had a parameterisation: po_head = {"weight": W[, "towers"]}: a dense head, scaled by
    the dense rules (U Σ^t Vᵀ; I + t (W − I) on the image tower)."""
    W = torch.eye(D) + 0.3 * torch.randn(D, D, generator=torch.Generator().manual_seed(6))
    entry = {"weight": W} if towers == "both" else {"weight": W, "towers": "image"}
    path = atomic_save({"epoch": 3, "name": "old", "state_dict": tiny_model.state_dict(), "po_head": entry},
                       tmp_path / "epoch_3.pt")
    loaded = create_model_from_checkpoint("po-tiny", path)[0].eval()
    head = get_linear_head(loaded)
    assert type(head) is LinearHead and head.towers == towers and torch.equal(head.weight.detach(), W)
    assert head_generator(load_checkpoint(path)) is None
    # resuming it under today's default (a log head) says which flag to use; with it, W comes back as it was
    old = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="has a dense head; resume it with --po-head-param dense"):
        CheckpointCodec(linear_head=True, head_towers=towers, head_param="log").decode(old, "old.pt", distributed=False)
    decoded, _ = CheckpointCodec(linear_head=True, head_towers=towers).decode(old, "old.pt", distributed=False)
    assert torch.equal(decoded["state_dict"]["po_head.weight"], W)
    W_t = scale_head(W, -1.0, towers)
    if towers == "both":
        U, S, Vh = torch.linalg.svd(W.double())
        torch.testing.assert_close(W_t.double(), (U / S) @ Vh, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(W_t, 2 * torch.eye(D) - W, rtol=1e-6, atol=1e-6)
    assert svd_scale_main([str(path), "--t", "-1"]) == 0
    folded = load_checkpoint(tmp_path / "epoch_3.t-1.pt")
    assert folded["po_svd_scale"]["param"] == "dense" and folded["po_svd_scale"]["towers"] == towers
    for key, value in fold_head(tiny_model.state_dict(), W_t, towers).items():
        assert torch.equal(folded["state_dict"][key], value), key
    scaled = copy.deepcopy(tiny_model)
    attach_linear_head(scaled, W_t, towers)
    stock = create_model_from_checkpoint("po-tiny", tmp_path / "epoch_3.t-1.pt")[0].eval()
    torch.testing.assert_close(logits(stock, *inputs), logits(scaled, *inputs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("towers", ["both", "image"])
def test_svd_scale_folds_exp_tA_and_keeps_a_log_head_that_composes(tiny_model, inputs, tmp_path, towers, capsys):
    base = copy.deepcopy(tiny_model)
    path = atomic_save(encoded_log_head_checkpoint(tiny_model, towers), tmp_path / "epoch_1.pt")
    A = get_linear_head(tiny_model).generator.detach()
    assert svd_scale_main([str(path), "--t", "-2", "--report"]) == 0
    report = capsys.readouterr().out
    assert report.count("singular values:") == 2   # before (W) and after (W_t)
    folded = load_checkpoint(tmp_path / "epoch_1.t-2.pt")
    assert folded["po_svd_scale"]["param"] == "log"
    W_t = torch.linalg.matrix_exp(-2.0 * A.double()).float()
    for key, value in fold_head(base.state_dict(), W_t, towers).items():
        torch.testing.assert_close(folded["state_dict"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    # --keep-head writes a log head with generator t A: scaling it again by b is exactly exp(t b A)
    assert svd_scale_main([str(path), "--t", "-2", "--keep-head", "--out", str(tmp_path / "a.pt")]) == 0
    kept = load_checkpoint(tmp_path / "a.pt")["po_head"]
    assert kept["param"] == "log" and torch.equal(kept["log"], -2.0 * A)
    assert svd_scale_main([str(tmp_path / "a.pt"), "--t", "0.5", "--out", str(tmp_path / "ab.pt")]) == 0
    assert svd_scale_main([str(path), "--t", "-1", "--out", str(tmp_path / "direct.pt")]) == 0
    twice, direct = load_checkpoint(tmp_path / "ab.pt"), load_checkpoint(tmp_path / "direct.pt")
    for key, value in direct["state_dict"].items():
        torch.testing.assert_close(twice["state_dict"][key], value, rtol=1e-6, atol=1e-6, msg=key)
    stock = create_model_from_checkpoint("po-tiny", tmp_path / "direct.pt")[0].eval()
    inverse = copy.deepcopy(base)
    attach_linear_head(inverse, torch.linalg.inv(get_linear_head(tiny_model).weight.detach()), towers)
    torch.testing.assert_close(logits(stock, *inputs), logits(inverse, *inputs), rtol=1e-4, atol=1e-4)


def test_the_report_lists_singular_values_largest_first():
    assert format_singular_values([0.5, 2.0, 1.0]) == "2 1 0.5"
    assert format_singular_values(list(range(1, 11)), shown=2) == "10 9 … 2 1"


# ---------------------------------------------------------------- the reversed head's KL


def reg_batch(tokenizer):
    prompts = tokenizer([f"a photo of a {n}." for n in NAMES])
    g = torch.Generator().manual_seed(2)
    return {"images": torch.randn(4, 3, 64, 64, generator=g), "chosen": prompts[torch.tensor([0, 1, 2, 3])],
            "rejected": prompts[torch.tensor([1, 2, 3, 0])], "reg_images": torch.randn(3, 3, 64, 64, generator=g),
            "reg_texts": prompts[:3]}


@pytest.mark.parametrize("param,towers", [("log", "both"), ("log", "image"), ("dense", "image"), ("dense", "both")])
def test_the_reversed_heads_kl_is_the_kl_of_the_model_turned_around(tiny_model, tiny_model_and_transforms, param,
                                                                    towers):
    batch = reg_batch(tiny_model_and_transforms[3])
    base = copy.deepcopy(tiny_model)
    if param == "log":
        head = attach_linear_head(tiny_model, towers=towers, log=random_generator(seed=7, symmetric=towers == "both"))
        W = head.weight.detach().double()
        turned = torch.linalg.inv(W)                      # exp(−A)
    else:
        W = (torch.eye(D) + random_generator(seed=7, symmetric=False)).double()
        head = attach_linear_head(tiny_model, W.float(), towers)
        turned = 2 * torch.eye(D, dtype=W.dtype) - W if towers == "image" else torch.linalg.inv(W).T  # U Σ⁻¹ Vᵀ
    torch.testing.assert_close(head.reversed_weight().double(), turned, rtol=1e-4, atol=1e-5)
    settings = POSettings(reg_lambda=1.0, head_reverse_lambda=0.5)
    out = POCriterion(get_loss("dpo"), make_reference(is_base_of_head=True), settings)(tiny_model, batch)
    # by hand: the model carrying W_{−1} (dense), its policy on the D_reg batch against the base model's
    inverse = copy.deepcopy(base)
    attach_linear_head(inverse, turned.float(), towers)
    with torch.no_grad():
        scale = base.logit_scale.exp()

        def logps(model):
            x = model.encode_image(batch["reg_images"], normalize=True)
            y = model.encode_text(batch["reg_texts"], normalize=True)
            return torch.log_softmax(scale * x @ y.T, dim=-1)

        policy, ref = logps(inverse), logps(base)
        by_hand = (policy.exp() * (policy - ref)).sum(-1).mean()
    assert by_hand > 1e-3
    torch.testing.assert_close(out["reg_kl_reversed"], by_hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["pref_loss"] + out["reg_kl"] + 0.5 * out["reg_kl_reversed"])
    out["loss"].backward()
    parameter = head.log if param == "log" else head.weight
    assert parameter.grad is not None and parameter.grad.abs().sum() > 0


def test_the_reversed_heads_kl_is_zero_at_the_identity_and_off_for_the_papers_objective(tiny_model,
                                                                                         tiny_model_and_transforms):
    batch = reg_batch(tiny_model_and_transforms[3])
    attach_linear_head(tiny_model, param="log")
    reference = make_reference(is_base_of_head=True)
    out = POCriterion(get_loss("dpo"), reference, POSettings(head_reverse_lambda=1.0))(tiny_model, batch)
    assert abs(out["reg_kl_reversed"].item()) < 1e-9   # W = W⁻¹ = I: the reference, to float rounding
    out = POCriterion(get_loss("dpo"), reference, POSettings())(tiny_model, batch)
    assert "reg_kl_reversed" not in out


def parsed(*flags):
    from open_clip_train.params import parse_args

    from open_clip_po.trainer.cli import parse_po_args

    return parse_po_args(["--model", "po-tiny", "--train-data", "p.tar", "--po-reg-data", "r.tar", "--po-loss", "dpo",
                          *flags], parse_args)


def test_the_log_head_is_the_default_on_both_towers_and_its_reversed_side_weighs_like_its_trained_side():
    args = parsed("--po-linear-head")
    assert (args.po_head_param, args.po_head_reverse_lambda) == ("log", 1.0)
    assert parsed("--po-linear-head", "--po-reg-lambda", "0.3").po_head_reverse_lambda == 0.3
    assert parsed("--po-linear-head", "--po-head-reverse-lambda", "0").po_head_reverse_lambda == 0.0
    dense = parsed("--po-linear-head", "--po-head-param", "dense")
    assert (dense.po_head_param, dense.po_head_reverse_lambda) == ("dense", 0.0)
    image = parsed("--po-linear-head", "--po-head-towers", "image")   # the straight line keeps a flip
    assert (image.po_head_param, image.po_head_reverse_lambda) == ("dense", 0.0)
    assert parsed("--po-linear-head", "--po-head-towers", "image",
                  "--po-head-reverse-lambda", "0.1").po_head_reverse_lambda == 0.1
    assert parsed().po_head_reverse_lambda == 0.0   # no head


@pytest.mark.parametrize("flags,message", [
    (("--po-head-param", "dense"), "--po-head-param is for --po-linear-head"),
    (("--po-head-reverse-lambda", "1"), "--po-head-reverse-lambda is for --po-linear-head"),
    (("--po-linear-head", "--po-head-reverse-lambda", "-1"), "--po-head-reverse-lambda must be >= 0"),
])
def test_head_flags_that_cannot_work_are_refused(flags, message):
    from open_clip_po.trainer.cli import UsageError

    with pytest.raises(UsageError, match=message):
        parsed(*flags)
