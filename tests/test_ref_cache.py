"""The reference's features computed once ahead of training: exact, checked against the run, resumable."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

import open_clip
from open_clip_po.criterion import POCriterion, POSettings
from open_clip_po.data import get_po_data
from open_clip_po.losses import get_loss
from open_clip_po.trainer.seam import main
from open_clip_po.ref_cache import CacheError, load_ref_cache
from open_clip_po.ref_cache.build import build, parse_args, reference_model
from open_clip_po.ref_cache.spot_check import compare
from open_clip_po.ref_cache.store import MANIFEST, SHARDS_DIR, run_signature
from open_clip_po.reference import CachedReference, make_reference
from train_helpers import base_args, make_toy, run_cli

EXACT_AUG = ["--aug-cfg", "scale=(1.0, 1.0)"]


def cache_argv(toy, out, *extra):
    return ["--model", "po-tiny", "--pretrained", toy["pretrained"], "--train-data", toy["pref"],
            "--po-reg-data", toy["reg"], "--po-classnames", toy["classnames"], "--batch-size", "16",
            "--precision", "fp32", *EXACT_AUG, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    root = tmp_path_factory.mktemp("refcache")
    toy = make_toy(root, num_samples=64, per_shard=32)
    build(parse_args(cache_argv(toy, root / "cache")))
    return toy, root / "cache"


def load(toy, cache, args_extra=()):
    args = parse_args(cache_argv(toy, cache, *args_extra))
    _, preprocess, _ = open_clip.create_model_and_transforms("po-tiny", aug_cfg=args.aug_cfg)
    urls = [str(Path(toy["root"], "shards", f"{k}-{i:06d}.tar")) for k in ("pref", "reg") for i in range(2)]
    return load_ref_cache(cache, run_signature(args, preprocess), urls, need_prompts=True), args, preprocess


@pytest.mark.parametrize("loss,candidates,reg_lambda", [
    ("dpo", "batch", 1.0), ("ipo", "batch", 0.5), ("kto", "batch", 0.0), ("kto", "classes", 1.0),
    ("dpo", "classes", 0.0)])
def test_a_step_with_the_cache_equals_the_online_reference(cached, loss, candidates, reg_lambda):
    toy, cache_dir = cached
    cache, args, preprocess = load(toy, cache_dir)
    args.workers, args.seed, args.po_reg_num_samples, args.train_num_samples = 0, 0, 64, 64
    tokenizer = open_clip.get_tokenizer("po-tiny")
    batch = next(iter(get_po_data(args, (preprocess, preprocess), tokenizer=tokenizer)["train"].dataloader))
    reference_model = open_clip.create_model("po-tiny", pretrained=toy["pretrained"], output_dict=True)
    prompts = tokenizer([f"a photo of a {n}." for n in Path(toy["classnames"]).read_text().split()])
    settings = POSettings(reg_lambda=reg_lambda, candidates=candidates)
    results = []
    for reference in (make_reference(reference_model), CachedReference(cache)):
        torch.manual_seed(1)
        policy = open_clip.create_model("po-tiny", pretrained=toy["pretrained"], output_dict=True)
        with torch.no_grad():  # move the policy away from the reference so that the loss is not trivial
            for p in policy.parameters():
                p.add_(0.02 * torch.randn_like(p))
        out = POCriterion(get_loss(loss), reference, settings, prompt_tokens=prompts)(policy, batch)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (online, g_online), (from_cache, g_cache) = results
    for key in online:
        torch.testing.assert_close(from_cache[key], online[key], rtol=1e-5, atol=1e-6, msg=key)
    for name, grad in g_online.items():
        err = (g_cache[name] - grad).abs().max().item()
        assert err <= 1e-4 * grad.abs().max().item() + 1e-7, (name, err, grad.abs().max().item())


def test_a_cache_that_does_not_fit_the_run_is_a_one_line_error(cached, tmp_path):
    toy, cache_dir = cached
    args = parse_args(cache_argv(toy, cache_dir))
    _, preprocess, _ = open_clip.create_model_and_transforms("po-tiny", aug_cfg=args.aug_cfg)
    urls = [str(Path(toy["root"], "shards", "pref-000000.tar"))]
    other = dict(run_signature(args, preprocess), pretrained="0" * 64)
    with pytest.raises(CacheError, match=r"manifest.json was computed with pretrained = [0-9a-f]+, this run has 0+: rebuild"):
        load_ref_cache(cache_dir, other, urls)
    with pytest.raises(CacheError, match=r"has no features for shard elsewhere.tar"):
        load_ref_cache(cache_dir, run_signature(args, preprocess), [str(tmp_path / "elsewhere.tar")])
    cache = load_ref_cache(cache_dir, run_signature(args, preprocess), urls)
    with pytest.raises(CacheError, match=r"sample pref-000000.tar/nope is not in the reference cache"):
        cache.image_features(["pref-000000.tar/nope"], "cpu")
    # a truncated shard file, and a build that never finished
    broken = tmp_path / "broken"
    (broken / SHARDS_DIR).mkdir(parents=True)
    (broken / MANIFEST).write_text((cache_dir / MANIFEST).read_text())
    data = (cache_dir / SHARDS_DIR / "pref-000000.tar.pt").read_bytes()
    (broken / SHARDS_DIR / "pref-000000.tar.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CacheError, match=r"pref-000000.tar.pt does not match the SHA-256 that .*manifest.json records"):
        load_ref_cache(broken, run_signature(args, preprocess), urls)
    (broken / MANIFEST).unlink()
    with pytest.raises(CacheError, match=r"manifest.json not found: the cache was not built, or its build did not"):
        load_ref_cache(broken, run_signature(args, preprocess), urls)


def test_a_killed_build_resumes_with_the_shards_it_had(cached, tmp_path):
    toy, cache_dir = cached
    out = tmp_path / "again"
    build(parse_args(cache_argv(toy, out)))
    kept = out / SHARDS_DIR / "pref-000000.tar.pt"
    stamp = kept.stat().st_mtime_ns
    (out / MANIFEST).unlink()  # as if killed before the end
    (out / SHARDS_DIR / "reg-000001.tar.pt").unlink()
    build(parse_args(cache_argv(toy, out)))
    assert kept.stat().st_mtime_ns == stamp  # not computed again
    assert (out / SHARDS_DIR / "reg-000001.tar.pt").is_file()
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(manifest["shards"]) == ["pref-000000.tar", "pref-000001.tar", "reg-000000.tar", "reg-000001.tar"]


def test_training_flags_refuse_what_the_cache_cannot_serve(cached, tmp_path):
    toy, cache_dir = cached
    cases = [
        (["--aug-cfg", "scale=(0.5, 1.0)"], "--po-ref-cache is exact only with deterministic training preprocessing"),
        (["--po-linear-head"], "--po-ref-cache is not for --po-linear-head"),
        (["--po-ref-sync-steps", "4"], "--po-ref-cache cannot follow the policy"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(base_args(toy, tmp_path, "x", "--po-loss", "dpo", "--po-ref-cache", str(cache_dir), *extra))
        text = str(exc.value.code)
        assert message in text and "\n" not in text, text


@pytest.mark.slow
@pytest.mark.integration
def test_two_process_training_with_the_cache_logs_the_online_losses(cached, tmp_path):
    toy, cache_dir = cached
    common = ["--po-loss", "dpo", "--batch-size", "8", "--lr-scheduler", "const"]
    run_cli(base_args(toy, tmp_path, "online", *common, epochs=1), nproc=2)
    run_cli(base_args(toy, tmp_path, "cached", *common, "--po-ref-cache", str(cache_dir), epochs=1), nproc=2)

    def losses(name):
        log = (tmp_path / name / "out.log").read_text()
        return [float(x) for x in re.findall(r"Train Epoch: 0 \[.*?\].* loss: ([0-9.e+-]+) ", log)]
    online, from_cache = losses("online"), losses("cached")
    assert len(online) == 4 and len(from_cache) == 4
    assert from_cache == pytest.approx(online, rel=1e-4, abs=1e-5)


# ---------------------------------------------------------------- the cache proves its contents


def copy_cache(cache_dir: Path, to: Path) -> Path:
    shutil.copytree(cache_dir, to)
    return to


def run_error(argv) -> str:
    """The one line ``open_clip_po.main`` ends with (in this process)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    text = str(exc.value.code)
    assert text.startswith("open_clip_po.main: error: ") and "\n" not in text, text
    return text


def swap_two_images(shard: Path) -> None:
    """Swap the image bytes of the shard's first two samples; the tar keeps its byte size."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith(".png")][:2]
    (a, data_a), (b, data_b) = members[images[0]], members[images[1]]
    assert data_a != data_b
    members[images[0]], members[images[1]] = (a, data_b), (b, data_a)
    size = shard.stat().st_size
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    assert shard.stat().st_size == size


def test_a_cache_file_edited_in_place_stops_the_run_naming_it(cached, tmp_path):
    toy, cache_dir = cached
    cache = copy_cache(cache_dir, tmp_path / "cache")
    target = cache / SHARDS_DIR / "pref-000001.tar.pt"
    d = torch.load(target, weights_only=True)
    d["image"] = -d["image"]  # a wrong reference that still has the right shapes
    torch.save(d, target)
    line = run_error(base_args(toy, tmp_path, "negated", "--po-loss", "dpo", "--po-ref-cache", str(cache)))
    assert f"--po-ref-cache: reference cache file {target} does not match the SHA-256" in line
    assert "rebuild the cache" in line
    checkpoints = tmp_path / "negated" / "checkpoints"
    assert not checkpoints.exists() or not any(checkpoints.iterdir())  # nothing trained on the wrong reference


def test_a_data_shard_with_two_images_swapped_stops_the_run_naming_it(cached, tmp_path):
    toy, cache_dir = cached
    data = tmp_path / "data"
    shutil.copytree(Path(toy["root"], "shards"), data)
    swap_two_images(data / "pref-000000.tar")  # same name, same byte size: the size check alone passes it
    moved = {**toy, "pref": str(data / Path(toy["pref"]).name), "reg": str(data / Path(toy["reg"]).name)}
    line = run_error(base_args(moved, tmp_path, "swapped", "--po-loss", "dpo", "--po-ref-cache", str(cache_dir)))
    assert f"data shard {data / 'pref-000000.tar'} is not the shard the reference cache was computed from" in line
    assert "rebuild the cache" in line


def test_rebuilding_recomputes_only_the_shards_that_changed(cached, tmp_path):
    toy, _ = cached
    data = tmp_path / "data"
    shutil.copytree(Path(toy["root"], "shards"), data)
    moved = {**toy, "pref": str(data / Path(toy["pref"]).name), "reg": str(data / Path(toy["reg"]).name),
             "classnames": str(data / "classnames.txt")}
    out = tmp_path / "cache"
    build(parse_args(cache_argv(moved, out)))
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / SHARDS_DIR).iterdir()}
    swap_two_images(data / "pref-000000.tar")
    build(parse_args(cache_argv(moved, out)))
    changed = {p.name for p in (out / SHARDS_DIR).iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"pref-000000.tar.pt"}
    args = parse_args(cache_argv(moved, out))
    _, preprocess, _ = open_clip.create_model_and_transforms("po-tiny", aug_cfg=args.aug_cfg)
    urls = sorted(str(p) for p in data.glob("*.tar"))
    cache = load_ref_cache(out, run_signature(args, preprocess), urls)  # the digests agree again
    key = next(k for k in cache.image_index if k.startswith("pref-000000.tar/"))
    assert cache.image_features([key], "cpu").shape[0] == 1


def test_a_cache_without_digests_must_be_rebuilt(cached, tmp_path):
    toy, cache_dir = cached
    cache = copy_cache(cache_dir, tmp_path / "old")
    manifest = json.loads((cache / MANIFEST).read_text())
    manifest["format"] = 1
    del manifest["files"]
    for entry in manifest["shards"].values():
        del entry["sha256"]
    (cache / MANIFEST).write_text(json.dumps(manifest))
    line = run_error(base_args(toy, tmp_path, "old", "--po-loss", "dpo", "--po-ref-cache", str(cache)))
    assert f"{cache / MANIFEST} was written by an earlier version that kept no content digests" in line
    assert f"rebuild it (python -m open_clip_po.ref_cache with --out {cache}" in line


def test_the_spot_check_recomputes_samples_and_names_a_file_that_lies(cached, tmp_path, caplog):
    toy, cache_dir = cached
    args = parse_args(cache_argv(toy, cache_dir))
    encoder, _, preprocess, tokenizer = reference_model(args, torch.device("cpu"))
    urls = [str(Path(toy["root"], "shards", f"{k}-{i:06d}.tar")) for k in ("pref", "reg") for i in range(2)]
    cache = load_ref_cache(cache_dir, run_signature(args, preprocess), urls, need_prompts=True)
    tokenize = lambda t: tokenizer([t])[0]  # noqa: E731
    summary = compare(cache, urls, 12, encoder, preprocess, tokenize, "fp32")
    largest = float(re.search(r"largest distance (\S+) ", summary).group(1))
    assert "12 sample(s) recomputed" in summary and largest < 1e-5
    # A file whose manifest digest was updated along with it (nothing but the features themselves can tell)
    cache.images[0] = -cache.images[0]
    with pytest.raises(ValueError, match=r"reference cache file .*/shards/pref-000000.tar.pt: the image features of "
                                         r"sample pref-000000.tar/\S+ are 2 away from the reference's own "
                                         r"\(tolerance 0.01 at fp32; 2 = opposite\)"):
        compare(cache, urls, 64, encoder, preprocess, tokenize, "fp32")
    # through the trainer: --po-ref-cache-verify N logs the check, and refuses a lying cache with one line
    caplog.set_level(logging.INFO)
    lying = copy_cache(cache_dir, tmp_path / "lying")
    target = lying / SHARDS_DIR / "reg-000001.tar.pt"
    d = torch.load(target, weights_only=True)
    d["image"] = -d["image"]
    torch.save(d, target)
    manifest = json.loads((lying / MANIFEST).read_text())
    manifest["files"]["shards/reg-000001.tar.pt"]["sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
    (lying / MANIFEST).write_text(json.dumps(manifest))
    line = run_error(base_args(toy, tmp_path, "lying", "--po-loss", "dpo", "--po-ref-cache", str(lying),
                               "--po-ref-cache-verify", "64"))
    assert line.startswith(f"open_clip_po.main: error: --po-ref-cache-verify: reference cache file {target}: the "
                           "image features of sample reg-000001.tar/")


def test_ref_cache_out_that_is_a_file_is_refused_before_any_work(cached, tmp_path):
    toy, _ = cached
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exc:
        parse_args(cache_argv(toy, tmp_path / "file"))
    assert str(exc.value.code) == (f"open_clip_po.ref_cache: error: --out {tmp_path / 'file'} is a file; give a "
                                   "folder (it is created)")
