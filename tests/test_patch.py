"""The upstream patch (patches/) and the adapters its entry points name (open_clip_po/losses/open_clip_adapter.py).

The patch is applied to copies of the installed open_clip 3.3.0 in temp dirs, never to the installed one.
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
PATCHES = REPO / "patches"
SOURCE_PATCH = PATCHES / "0001-open_clip-loss-plugins.patch"
TEST_PATCH = PATCHES / "0002-open_clip-loss-plugins-test.patch"
PATCHED_FOR = "3.3.0"


def _installed_open_clip() -> tuple[Path, str]:
    import open_clip
    import open_clip_train

    site = Path(open_clip.__file__).parent.parent
    assert Path(open_clip_train.__file__).parent.parent == site
    return site, open_clip.__version__


def _copy_sources(site: Path, dest: Path) -> None:
    for package in ("open_clip", "open_clip_train"):
        shutil.copytree(site / package, dest / package, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.fixture(scope="module")
def installed_open_clip():
    site, version = _installed_open_clip()
    if version != PATCHED_FOR:
        pytest.skip(f"patches/ are made against open_clip {PATCHED_FOR}; installed is {version}")
    return site


def _clean_apply(argv, cwd, patch_file):
    """Apply a patch; fail on rejects, fuzz or offsets (against 3.3.0 it must apply exactly)."""
    with open(patch_file, "rb") as f:
        out = subprocess.run(argv, cwd=cwd, stdin=f, capture_output=True, text=True)
    assert out.returncode == 0, f"{' '.join(argv)} failed:\n{out.stdout}{out.stderr}"
    text = (out.stdout + out.stderr).lower()
    assert not any(word in text for word in ("fuzz", "offset", "reject", "hunk")), text
    return out


@pytest.fixture(scope="module")
def patched_site_copy(installed_open_clip, tmp_path_factory):
    """The installed open_clip + open_clip_train, copied and patched as patches/README.md says: `patch -p2`."""
    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed (apt-get install patch)")
    dest = tmp_path_factory.mktemp("site-packages")
    _copy_sources(installed_open_clip, dest)
    out = _clean_apply(["patch", "-p2", "--forward", "--batch"], dest, SOURCE_PATCH)
    patched = sorted(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("patching file"))
    assert patched == ["open_clip/__init__.py", "open_clip/factory.py", "open_clip_train/params.py",
                       "open_clip_train/train.py"]
    return dest


def _run_python(code: str, pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


PROBE = r"""
import json, sys, torch, torch.nn.functional as F
import open_clip
from open_clip_train.params import parse_args
assert open_clip.__file__.startswith({where!r}), open_clip.__file__
args = parse_args(["--loss", "dpo", "--loss-kwargs", "beta=0.5"])
loss = open_clip.create_loss(args)
torch.manual_seed(0)
img = F.normalize(torch.randn(3, 8), dim=-1)
txt = F.normalize(torch.randn(6, 8), dim=-1)
out = loss(img, txt, torch.tensor(10.0), output_dict=True)

# open_clip's own train_one_epoch: triplet batches as (images, [y_w; y_l], extra), the distillation teacher as
# the reference (a frozen copy of the starting policy), our dpo through --loss.
import copy
import open_clip_po  # registers po-tiny
from open_clip_po.losses.open_clip_adapter import to_open_clip_batch
from open_clip_train.train import train_one_epoch

class Loader(list):
    num_samples = property(lambda self: 4 * len(self))
    num_batches = property(len)
    dataloader = property(lambda self: self)
    def set_epoch(self, epoch):
        pass

model = open_clip.create_model("po-tiny", output_dict=True)
teacher = copy.deepcopy(model).eval().requires_grad_(False)
batches = Loader(to_open_clip_batch({{
    "images": torch.randn(4, 3, 64, 64), "chosen": torch.randint(1, 400, (4, 16)),
    "rejected": torch.randint(1, 400, (4, 16)), "skipped": {{}}}}) for _ in range(3))
targs = parse_args(["--loss", "dpo", "--precision", "fp32", "--batch-size", "4", "--skip-scheduler"])
targs.device, targs.distill, targs.rank, targs.local_rank, targs.world_size = "cpu", True, 0, 0, 1
targs.wandb = targs.horovod = False
step_losses = []
train_loss = open_clip.create_loss(targs)
train_loss.register_forward_hook(lambda module, inputs, output: step_losses.append(output["dpo_loss"].item()))
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
train_one_epoch(model, {{"train": batches}}, train_loss, 0, optimizer, None, None, teacher, targs)

print(json.dumps({{
    "plugins": open_clip.list_loss_plugins(), "type": type(loss).__name__,
    "objective": type(loss.objective).__name__, "hparams": loss.objective.hparams(),
    "loss": {{k: v.item() for k, v in out.items()}}, "file": open_clip.__file__, "step_losses": step_losses,
}}))
"""


def test_patch_applies_with_p2_and_create_loss_finds_our_objective_for_open_clips_loop(patched_site_copy, tmp_path):
    result = _run_python(PROBE.format(where=str(patched_site_copy)), patched_site_copy, tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["file"].startswith(str(patched_site_copy))
    assert {"dpo", "ipo", "kto"} <= set(found["plugins"])
    assert (found["type"], found["objective"]) == ("OpenClipPreferenceLoss", "DPOLoss")
    assert found["hparams"] == {"beta": 0.5, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
                                "f_alpha_divergence_coef": 1.0}  # --po-beta reached it; the rest are DPO's defaults
    # Reference-free DPO by hand on the same features: −log σ(β s (I·T_w − I·T_l)).
    torch.manual_seed(0)
    img = F.normalize(torch.randn(3, 8), dim=-1)
    txt = F.normalize(torch.randn(6, 8), dim=-1)
    margin = 10.0 * ((img * txt[:3]).sum(-1) - (img * txt[3:]).sum(-1))
    expected = -F.logsigmoid(0.5 * margin).mean().item()
    assert found["loss"] == {"dpo_loss": pytest.approx(expected, rel=1e-5)}
    # In open_clip's loop: policy == teacher at the first step, so h = 0 and the loss is log 2; then it moves.
    steps = found["step_losses"]
    assert len(steps) == 3 and steps[0] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[1:] != [pytest.approx(math.log(2), abs=1e-6)] * 2


def test_unpatched_open_clip_has_no_loss_flag(installed_open_clip):
    """What the patch adds is really missing from the installed open_clip (so the test above means something)."""
    import open_clip
    from open_clip_train.params import parse_args

    # Unpatched, argparse's prefix matching even takes `--loss dpo` for `--loss-dist-impl dpo`, silently.
    args = parse_args(["--loss", "dpo"])
    assert not hasattr(args, "loss") and args.loss_dist_impl == "dpo"
    assert not hasattr(open_clip, "create_loss_plugin")


def test_patch_series_applies_to_upstream_layout_and_its_test_passes(installed_open_clip, tmp_path):
    """`git apply` in an upstream checkout (src/open_clip, src/open_clip_train, tests/); then upstream's new test."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    (tmp_path / "src").mkdir()
    _copy_sources(installed_open_clip, tmp_path / "src")
    (tmp_path / "tests").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for patch in (SOURCE_PATCH, TEST_PATCH):
        _clean_apply(["git", "apply", "--verbose", "-"], tmp_path, patch)
    upstream_test = tmp_path / "tests" / "test_loss_plugins.py"
    assert upstream_test.exists()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", str(upstream_test)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout


# -- the adapters (pure torch, no open_clip involved) ------------------------------------------------------------

def _features(b=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(2 * b, d, generator=g), dim=-1)
    return img, txt


def test_entry_points_name_the_adapters():
    from importlib.metadata import entry_points

    from open_clip_po.losses import list_losses
    from open_clip_po.losses.open_clip_adapter import OpenClipPreferenceLoss

    ours = {ep.name: ep for ep in entry_points(group="open_clip.losses")
            if ep.value.startswith("open_clip_po.")}
    assert set(ours) == set(list_losses()) & set(ours) and {"dpo", "ipo", "kto"} <= set(ours)
    for name, ep in ours.items():
        loss = ep.load()()
        assert isinstance(loss, OpenClipPreferenceLoss) and loss.objective_name == name


def test_adapter_with_teacher_equals_objective_on_pair_logps():
    from open_clip_po.losses import get_loss, pair_logps
    from open_clip_po.losses.open_clip_adapter import ipo

    img, txt = _features()
    ref_img, ref_txt = _features(seed=1)
    img.requires_grad_(True)
    s, ref_s = torch.tensor(12.0), torch.tensor(8.0)
    out = ipo(beta=0.1)(img, txt, s, output_dict=True, dist_image_features=ref_img.requires_grad_(True),
                        dist_text_features=ref_txt, dist_logit_scale=ref_s, logit_bias=None)
    pc, pr, _ = pair_logps(img, txt[:4], txt[4:], s)
    rc, rr, _ = pair_logps(ref_img, ref_txt[:4], ref_txt[4:], ref_s)
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(out["ipo_loss"], ((h - 1 / (2 * 0.1)) ** 2).mean())
    torch.testing.assert_close(out["ipo_loss"], get_loss("ipo", beta=0.1)(pc, pr, rc, rr)["loss"])
    out["ipo_loss"].backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert ref_img.grad is None  # the reference never receives gradient


def test_adapter_teacher_identical_to_policy_gives_log2():
    from open_clip_po.losses.open_clip_adapter import dpo

    img, txt = _features()
    loss = dpo()(img, txt, torch.tensor(10.0), dist_image_features=img, dist_text_features=txt,
                 dist_logit_scale=torch.tensor(10.0))
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))


def test_adapter_kto_without_teacher_uses_the_uniform_reference():
    from open_clip_po.losses.open_clip_adapter import kto

    img, txt = _features()
    beta, s = 1.5, 10.0
    out = kto(beta=beta)(img, txt, torch.tensor(s), output_dict=True)
    logp = torch.log_softmax(s * img @ txt.T, dim=-1)  # candidates: all 2B captions
    k = txt.shape[0]
    z = (logp.exp() * (logp + math.log(k))).sum(-1).mean().clamp(min=0)  # KL(π ‖ uniform)
    r_w = logp.diagonal() + math.log(k)
    r_l = logp[:, 4:].diagonal() + math.log(k)
    expected = torch.cat([1 - torch.sigmoid(beta * (r_w - z)), 1 - torch.sigmoid(beta * (z - r_l))]).mean()
    torch.testing.assert_close(out["kto_loss"], expected)


def test_adapter_rejects_texts_that_are_not_chosen_then_rejected():
    from open_clip_po.losses.open_clip_adapter import dpo

    img, txt = _features()
    with pytest.raises(ValueError, match=r"has 4 rows for 4 images; expected 2B = 8"):
        dpo()(img, txt[:4], torch.tensor(10.0))


def test_to_open_clip_batch_stacks_chosen_over_rejected():
    from open_clip_po.losses.open_clip_adapter import to_open_clip_batch

    images = torch.zeros(2, 3, 8, 8)
    chosen, rejected = torch.tensor([[1, 2], [3, 4]]), torch.tensor([[5, 6], [7, 8]])
    out_images, texts, extra = to_open_clip_batch(
        {"images": images, "chosen": chosen, "rejected": rejected, "skipped": {"decode": 1}})
    assert out_images is images and texts.tolist() == [[1, 2], [3, 4], [5, 6], [7, 8]]
    assert extra == {"skipped": {"decode": 1}}
    with pytest.raises(KeyError, match="lacks rejected"):
        to_open_clip_batch({"images": images, "chosen": chosen})
