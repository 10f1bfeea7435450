"""The linear head on the image tower only: similarity (W x)ᵀ y, scaled as W_t = I + t (W − I).

What it is for: the paper's head acts on both towers, xᵀ WᵀW y, a positive semi-definite form. When the
caption direction of a concept is a positive mix of its image directions — where contrastive pre-training puts
it — that form can weaken the concept but never reverse it for every image; the image-tower head can.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from open_clip_po.checkpoint import CheckpointCodec, CheckpointError, atomic_save, create_model_from_checkpoint, \
    head_towers, load_checkpoint
from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.eval import gender_curves
from open_clip_po.head import attach_linear_head, get_linear_head
from open_clip_po.losses import get_loss
from open_clip_po.reference import make_reference
from open_clip_po.surgery.cli import SurgeryError, fold_head, head_model_at, main as svd_scale_main, scale_head


def random_head(dim=32, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.eye(dim) + scale * torch.randn(dim, dim, generator=g)


@pytest.fixture
def inputs(tiny_model_and_transforms):
    tokenizer = tiny_model_and_transforms[3]
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return images, tokenizer(["a photo of a cat.", "a dog", "the word apple", "two birds"])


@torch.no_grad()
def logits(model, images, texts):
    image = F.normalize(model.encode_image(images), dim=-1)
    text = F.normalize(model.encode_text(texts), dim=-1)
    return model.logit_scale.exp() * image @ text.T


# ---------------------------------------------------------------- the head itself


def test_the_image_head_maps_image_features_and_leaves_text_features_alone(tiny_model, inputs):
    images, texts = inputs
    W = random_head(seed=2)
    with torch.no_grad():
        base_image, base_text = tiny_model.encode_image(images), tiny_model.encode_text(texts)
    head = attach_linear_head(tiny_model, W, towers="image")
    assert head.towers == "image" and "towers=image" in repr(head)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model.encode_image(images), base_image @ W.T, rtol=1e-5, atol=1e-6)
        assert torch.equal(tiny_model.encode_text(texts), base_text)
    by_hand = tiny_model.logit_scale.exp() * F.normalize(base_image @ W.T, dim=-1) @ F.normalize(base_text, dim=-1).T
    torch.testing.assert_close(logits(tiny_model, images, texts), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("towers", ["both", "image"])
def test_a_deep_copy_of_a_headed_model_runs_its_own_backbone(tiny_model, inputs, towers):
    images, texts = inputs
    attach_linear_head(tiny_model, random_head(seed=7), towers=towers)
    copied = copy.deepcopy(tiny_model)
    with torch.no_grad():
        copied.visual.proj.mul_(2.0)
        copied.text_projection.mul_(3.0)
        torch.testing.assert_close(copied.encode_image(images), 2.0 * tiny_model.encode_image(images))
        torch.testing.assert_close(copied.encode_text(texts), 3.0 * tiny_model.encode_text(texts))


def test_unknown_towers_are_refused(tiny_model):
    with pytest.raises(ValueError, match="head towers must be one of both, image, got 'text'"):
        attach_linear_head(tiny_model, towers="text")
    for surgery in (lambda: scale_head(torch.eye(32), 1.0, "text"),
                    lambda: fold_head(tiny_model.state_dict(), torch.eye(32), "text")):
        with pytest.raises(SurgeryError, match="head towers must be one of both, image, got 'text'"):
            surgery()


# ---------------------------------------------------------------- why: reversing a concept


class FeatureBackbone(nn.Module):
    """A stand-in backbone whose "images" are their features and whose captions are rows of a table."""

    def __init__(self, captions: torch.Tensor):
        super().__init__()
        self.captions = captions
        self.text_projection = nn.Parameter(torch.eye(captions.shape[1]), requires_grad=False)  # gives D
        # a scale that leaves the reference about as sure of gender as the gender demo's model (log-odds ~4):
        # DPO at β = 1 moves log-odds by a bounded margin, so a far surer reference would not flip in 300 steps
        self.logit_scale = nn.Parameter(torch.tensor(4.0).log(), requires_grad=False)

    def encode_image(self, images, normalize=False):
        return F.normalize(images, dim=-1) if normalize else images

    def encode_text(self, tokens, normalize=False):
        features = self.captions[tokens[:, 0]] @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features


def flip_world():
    """Two genders (±e0) × two activities (e1, e2). The man − woman caption direction 2 e0 is exactly the mean
    image direction: a positive mix of the image directions, as contrastive pre-training leaves it."""
    e = torch.eye(4, dtype=torch.float64)
    man, woman = [e[0] + e[a] for a in (1, 2)], [-e[0] + e[a] for a in (1, 2)]
    person = [e[a] for a in (1, 2)]
    captions = torch.stack(man + woman + person)          # token 0, 1: man; 2, 3: woman; 4, 5: person
    images = torch.stack(man + woman) + 0.05 * e[3]        # a little of what no caption says
    own = torch.tensor([0, 1, 2, 3])
    flipped = torch.tensor([2, 3, 0, 1])
    return captions, images, own, flipped


def train_head(towers: str, steps: int = 300) -> tuple[torch.Tensor, nn.Module]:
    captions, images, own, flipped = flip_world()
    model = FeatureBackbone(captions).double()
    attach_linear_head(model, towers=towers).double()
    criterion = POCriterion(get_loss("dpo", beta=1.0), make_reference(is_base_of_head=True),
                            POSettings(reg_lambda=1.0))
    batch = {"images": images, "chosen": flipped[:, None], "rejected": own[:, None],
             "reg_images": images, "reg_texts": torch.tensor([4, 5, 4, 5])[:, None]}
    optimizer = torch.optim.Adam(get_linear_head(model).parameters(), lr=0.05)
    for _ in range(steps):
        optimizer.zero_grad()
        criterion(model, batch)["loss"].backward()
        optimizer.step()
    with torch.no_grad():
        x = F.normalize(model.encode_image(images), dim=-1)
        y = F.normalize(model.encode_text(torch.arange(6)[:, None]), dim=-1)
        chooses_flipped = (x * y[flipped]).sum(-1) > (x * y[own]).sum(-1)
        activity_kept = ((x @ y[4:].T).argmax(-1) == torch.tensor([0, 1, 0, 1])).all()
    return chooses_flipped, bool(activity_kept)


def test_dpo_reverses_gender_with_the_image_head_but_the_paper_form_cannot_for_every_image():
    flipped, activity_kept = train_head("image")
    assert flipped.all() and activity_kept
    # xᵀ WᵀW y: flipping both genders of an activity needs e0ᵀ WᵀW e0 < 0 — impossible — so at most half flip.
    flipped_both, _ = train_head("both")
    assert flipped_both.sum() <= 2


# ---------------------------------------------------------------- scaling and folding


def test_image_head_scales_along_the_straight_line_from_the_identity():
    W = random_head(seed=3).double()
    assert torch.equal(scale_head(W, 0.0, "image"), torch.eye(32, dtype=torch.float64))
    torch.testing.assert_close(scale_head(W, 1.0, "image"), W, rtol=0, atol=1e-15)
    torch.testing.assert_close(scale_head(W, -2.0, "image"), 3 * torch.eye(32, dtype=torch.float64) - 2 * W)
    # the paper's U Σ^t Vᵀ would leave a rotation at t = 0, which the image tower's similarity sees
    assert not torch.allclose(scale_head(W, 0.0, "both"), torch.eye(32, dtype=torch.float64), atol=1e-2)


def test_a_reflection_reverses_gender_on_the_image_tower_and_does_nothing_on_both():
    """H = I − 2 e0 e0ᵀ is orthogonal: on both towers HᵀH = I, the base model; on the image tower it maps a man's
    image onto the woman's caption. The image head's own-gender probability falls with t and crosses 1/2 at 1/2."""
    e = torch.eye(3, dtype=torch.float64)
    H = e - 2 * torch.outer(e[0], e[0])
    man, woman, neutral = torch.stack([e[0] + e[1], e[0] + e[2]]), torch.stack([-e[0] + e[1], -e[0] + e[2]]), e[1:]
    images = torch.cat([man, woman]) + 0.1 * torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]] * 2, dtype=torch.float64)
    is_man, activity = torch.tensor([True, True, False, False]), torch.tensor([0, 1, 0, 1])
    ts = [-2.0, -1.0, 0.0, 0.3, 0.45, 0.55, 1.0, 2.0]
    on_image = gender_curves({t: scale_head(H, t, "image") for t in ts}, images, is_man, activity, man, woman,
                             neutral, scale=10.0, towers="image")
    on_both = gender_curves({t: scale_head(H, t, "both") for t in ts}, images, is_man, activity, man, woman,
                            neutral, scale=10.0, towers="both")
    p = on_image["p_true_gender"]
    assert all(a > b for a, b in zip(p, p[1:])) and p[ts.index(0.0)] > 0.99 and p[ts.index(1.0)] < 0.01
    assert on_image["t_star"] == pytest.approx(0.5, abs=0.01)
    assert on_image["activity_accuracy"] == [1.0] * len(ts)
    assert on_both["p_true_gender"] == pytest.approx([p[ts.index(0.0)]] * len(ts), abs=1e-12)


def test_folding_an_image_head_leaves_the_text_tower_and_matches_the_head_model(tiny_model, inputs):
    W = random_head(seed=4)
    folded_state = fold_head(tiny_model.state_dict(), W, towers="image")
    assert torch.equal(folded_state["text_projection"], tiny_model.state_dict()["text_projection"])
    assert not torch.equal(folded_state["visual.proj"], tiny_model.state_dict()["visual.proj"])
    head_model = copy.deepcopy(tiny_model)
    attach_linear_head(head_model, W, towers="image")
    for t in (1.0, 0.5, -1.0):
        stock = head_model_at(head_model, t=t)   # towers taken from the attached head
        scaled = copy.deepcopy(tiny_model)
        attach_linear_head(scaled, scale_head(W, t, "image"), towers="image")
        torch.testing.assert_close(logits(stock, *inputs), logits(scaled, *inputs), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(head_model_at(head_model, t=0.0), *inputs), logits(tiny_model, *inputs),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoints and the CLI


def test_checkpoints_record_the_towers_and_refuse_a_resume_with_the_other(tiny_model, tmp_path):
    attach_linear_head(tiny_model, random_head(seed=5), towers="image")
    ckpt = {"epoch": 1, "name": "x", "state_dict": tiny_model.state_dict()}
    encoded = CheckpointCodec(linear_head=True, head_towers="image").encode(ckpt)
    assert encoded["po_head"]["towers"] == "image" and "po_head.weight" not in encoded["state_dict"]
    assert head_towers(encoded) == "image"
    CheckpointCodec(linear_head=True, head_towers="image").decode(encoded, "ckpt.pt", distributed=False)
    with pytest.raises(CheckpointError, match="ckpt.pt has a head on image tower\\(s\\); resume it with "
                                              "--po-head-towers image"):
        CheckpointCodec(linear_head=True).decode(encoded, "ckpt.pt", distributed=False)
    # written before heads had a choice: both towers
    assert head_towers({"po_head": {"weight": torch.eye(32)}}) == "both"
    path = tmp_path / "epoch_1.pt"
    atomic_save(encoded, path)
    model = create_model_from_checkpoint("po-tiny", path)[0]
    assert get_linear_head(model).towers == "image"
    torch.testing.assert_close(get_linear_head(model).weight, get_linear_head(tiny_model).weight)


def test_svd_scale_cli_scales_and_folds_an_image_head(tiny_model, inputs, tmp_path):
    W = random_head(seed=6)
    head_model = copy.deepcopy(tiny_model)
    attach_linear_head(head_model, W, towers="image")
    path = tmp_path / "epoch_1.pt"
    atomic_save(CheckpointCodec(linear_head=True, head_towers="image").encode(
        {"epoch": 1, "name": "x", "state_dict": head_model.state_dict()}), path)
    assert svd_scale_main([str(path), "--t", "-1", "--keep-head"]) == 0
    kept = load_checkpoint(path.with_name("epoch_1.t-1.head.pt"))
    assert kept["po_head"]["towers"] == "image"
    torch.testing.assert_close(kept["po_head"]["weight"], 2 * torch.eye(32) - W)
    assert svd_scale_main([str(path), "--t", "-1"]) == 0
    folded = load_checkpoint(path.with_name("epoch_1.t-1.pt"))
    assert folded["po_svd_scale"]["towers"] == "image"
    stock = create_model_from_checkpoint("po-tiny", path.with_name("epoch_1.t-1.pt"))[0].eval()
    with_head = create_model_from_checkpoint("po-tiny", path.with_name("epoch_1.t-1.head.pt"))[0].eval()
    torch.testing.assert_close(logits(stock, *inputs), logits(with_head, *inputs), rtol=1e-4, atol=1e-4)
