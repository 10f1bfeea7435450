"""The upstream patch that runs open_clip's causal, argmax-pooled text towers over each batch's caption span
(patches/0003-*, its upstream test in 0004-*), applied to copies of the installed open_clip 3.3.0 in temp dirs."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from test_patch import PATCHES, PATCHED_FOR, _clean_apply, _copy_sources, _installed_open_clip

SOURCE_PATCH = PATCHES / "0003-open_clip-text-caption-span.patch"
TEST_PATCH = PATCHES / "0004-open_clip-text-caption-span-test.patch"
SERIES = sorted(PATCHES.glob("*.patch"))


@pytest.fixture(scope="module")
def installed_open_clip():
    site, version = _installed_open_clip()
    if version != PATCHED_FOR:
        pytest.skip(f"patches/ are made against open_clip {PATCHED_FOR}; installed is {version}")
    return site


def _run(argv, pythonpath, cwd, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# open_clip's own training loop on a tiny CLIP (random weights) with 4–8-token captions in a 77-token context,
# patched copy first on the path; and one ClipLoss step against the same model with trim_text_to_span = False.
PROBE = r"""
import copy, json, torch
import open_clip
from open_clip import CLIP, ClipLoss
from open_clip_train.params import parse_args
from open_clip_train.train import train_one_epoch
from torch.utils.flop_counter import FlopCounterMode
assert open_clip.__file__.startswith({where!r}), open_clip.__file__

class Loader(list):
    num_samples = property(lambda self: 4 * len(self))
    num_batches = property(len)
    dataloader = property(lambda self: self)
    def set_epoch(self, epoch):
        pass

torch.manual_seed(0)
model = CLIP(32, dict(image_size=32, patch_size=16, width=64, layers=1, head_width=32),
             dict(context_length=77, width=64, heads=4, layers=2), output_dict=True)
full = copy.deepcopy(model)
full.trim_text_to_span = False
captions = ["a dog", "a photo of a dog.", "The man is cooking", "cat"]
text, images = open_clip.tokenize(captions), torch.randn(4, 3, 32, 32)
seen = []
for m in (model, full):
    m.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))

args = parse_args(["--precision", "fp32", "--batch-size", "4", "--skip-scheduler"])
args.device, args.distill, args.rank, args.local_rank, args.world_size = "cpu", False, 0, 0, 1
args.wandb = args.horovod = False
optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
train_one_epoch(model, {{"train": Loader([(images, text)] * 2)}}, ClipLoss(), 0, optimizer, None, None, None, args)
trained_positions, seen[:] = list(seen), []

def step(m):
    m.zero_grad(set_to_none=True)
    out = m(images, text)
    loss = ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    loss.backward()
    return loss.item(), out["text_features"].detach(), {{n: p.grad for n, p in m.named_parameters()}}

(loss, features, grads), (full_loss, full_features, full_grads) = step(model), step(full)
worst = max(float((grads[n] - g).abs().max() / max(float(g.abs().max()), 1e-3)) for n, g in full_grads.items())
flops = []
for m in (model, full):
    with FlopCounterMode(display=False) as counter:
        step(m)
    flops.append(counter.get_total_flops())
print(json.dumps({{"trained_positions": trained_positions, "step_positions": seen[:2], "loss": [loss, full_loss],
                  "features": float((features - full_features).abs().max()), "worst_grad": worst,
                  "flops": flops, "grads": sorted(grads) == sorted(full_grads)}}))
"""


@pytest.mark.slow
def test_patch_applies_with_p2_and_open_clips_loop_runs_the_span(installed_open_clip, tmp_path):
    if shutil.which("patch") is None:
        pytest.skip("GNU patch is not installed (apt-get install patch)")
    site = tmp_path / "site-packages"
    site.mkdir()
    _copy_sources(installed_open_clip, site)
    out = _clean_apply(["patch", "-p2", "--forward", "--batch"], site, SOURCE_PATCH)
    patched = sorted(line.split()[-1] for line in out.stdout.splitlines() if line.startswith("patching file"))
    assert patched == ["open_clip/model.py", "open_clip/transformer.py"]
    result = _run([sys.executable, "-c", PROBE.format(where=str(site))], site, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["trained_positions"] == [8, 8]  # two steps of open_clip's loop, 8 of 77 positions each
    assert found["step_positions"] == [8, 77]  # trimmed, then trim_text_to_span = False
    assert found["loss"][0] == pytest.approx(found["loss"][1], rel=1e-6)
    assert found["features"] < 1e-5 and found["grads"] and found["worst_grad"] < 1e-4
    assert found["flops"][0] < 0.75 * found["flops"][1]  # the text tower is most of this tiny model's step


def test_unpatched_open_clip_runs_the_whole_context(installed_open_clip):
    """What the patch changes is really missing from the installed open_clip (so the test above means something)."""
    import open_clip.transformer

    assert not hasattr(open_clip.transformer, "causal_text_span")


@pytest.mark.slow
def test_the_whole_series_applies_to_upstream_layout_and_the_span_test_passes(installed_open_clip, tmp_path):
    """patches/*.patch in order (both changes) by `git apply` in an upstream checkout; then upstream's new test."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert SOURCE_PATCH in SERIES and TEST_PATCH in SERIES and len(SERIES) == 4
    (tmp_path / "src").mkdir()
    _copy_sources(installed_open_clip, tmp_path / "src")
    (tmp_path / "tests").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    for patch in SERIES:
        _clean_apply(["git", "apply", "--verbose", "-"], tmp_path, patch)
    upstream_test = tmp_path / "tests" / "test_text_span.py"
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                   str(upstream_test)], tmp_path / "src", tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "12 passed" in result.stdout
