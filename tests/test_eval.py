"""open_clip_po.eval: zero-shot clean/typographic metrics, the t-sweep, gender flipping, KL — against brute force."""
import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

CLASSES = ["cat", "dog", "red_fox"]          # folder names; "red_fox" → class name "red fox"
PER_CLASS = 4
D = 32  # po-tiny embedding dim


# ---------------------------------------------------------------------------------------------------------------
# fixtures: image folders, an attacked copy, checkpoints with and without a head


def _write_image_folder(root, seed=0, classes=CLASSES, per_class=PER_CLASS):
    rng = random.Random(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(min(255, 60 * c + rng.randrange(0, 120)) for _ in range(3))
            image = Image.new("RGB", (64, 64), colour)
            for _ in range(30):  # some texture so images differ
                x, y = rng.randrange(64), rng.randrange(64)
                image.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, x + 6, y + 6))
            image.save(root / name / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from open_clip_po.data.typographic import build_eval_folder

    root = tmp_path_factory.mktemp("eval_data")
    clean = _write_image_folder(root / "clean")
    attacked = root / "attacked"
    build_eval_folder(clean, attacked, [c.replace("_", " ") for c in CLASSES], image_size=64, seed=1, quiet=True)
    return clean, attacked


@pytest.fixture(scope="module")
def head_weight_matrix():
    g = torch.Generator().manual_seed(7)
    # Far from orthogonal, so t = 0 and t = 1 differ visibly.
    return torch.eye(D) + 0.8 * torch.randn(D, D, generator=g) / math.sqrt(D)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_model_and_transforms, head_weight_matrix):
    from open_clip_po.checkpoint import atomic_save

    model = tiny_model_and_transforms[0]
    root = tmp_path_factory.mktemp("eval_ckpt")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = atomic_save({"epoch": 1, "name": "base", "state_dict": state}, root / "base.pt")
    head = atomic_save({"epoch": 1, "name": "head", "state_dict": {f"module.{k}": v for k, v in state.items()},
                        "po_head": {"weight": head_weight_matrix}}, root / "head.pt")
    return base, head


def _with_head(model, weight):
    import copy

    from open_clip_po.head import attach_linear_head

    model = copy.deepcopy(model)
    attach_linear_head(model, weight)
    return model.eval()


class _DDPLike(torch.nn.Module):
    """Stands in for DistributedDataParallel: the model one attribute down, no encode_* methods."""

    def __init__(self, module):
        super().__init__()
        self.module = module


@torch.no_grad()
def _brute_force(model, tokenizer, preprocess, classnames, templates, samples):
    """Predictions one image and one prompt at a time: (#correct, #written predicted, n)."""
    weights = []
    for name in classnames:
        per_template = [F.normalize(model.encode_text(tokenizer([t.format(name)])), dim=-1)[0] for t in templates]
        mean = torch.stack(per_template).mean(0)
        weights.append(mean / mean.norm())
    correct = written_hits = 0
    for path, label, written in samples:
        x = preprocess(Image.open(path).convert("RGB"))[None]
        feature = F.normalize(model.encode_image(x), dim=-1)[0]
        prediction = max(range(len(classnames)), key=lambda c: float(feature @ weights[c]))
        correct += prediction == label
        written_hits += prediction == written
    return correct, written_hits, len(samples)


def _attacked_samples(attacked):
    samples = []
    for label, name in enumerate(CLASSES):
        for path in sorted((attacked / name).glob("*.png")):
            written = int(path.stem.rsplit("_written", 1)[1])
            samples.append((path, label, written))
    return samples


def _clean_samples(clean):
    return [(p, label, -1) for label, name in enumerate(CLASSES) for p in sorted((clean / name).glob("*.png"))]


def _run_cli(argv):
    from open_clip_po.eval.__main__ import main

    return main(argv)


# ---------------------------------------------------------------------------------------------------------------
# zero-shot


def test_top1_and_written_count_exactly():
    from open_clip_po.eval import top1_and_written

    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 1, 5], [4, 0, 1], [0, 0.5, 0.1]])
    labels = torch.tensor([0, 2, 2, 1, 1])       # predictions 0 1 2 0 1 → correct: 0, 2, 4
    written = torch.tensor([1, 1, 0, 0, -1])     # written predicted: rows 1 and 3; row 4 not attacked
    m = top1_and_written(logits, labels, written)
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["n_written"] == 4
    assert m["written_rate"] == pytest.approx(2 / 4)
    assert "top5" not in m   # 3 classes only


def test_typographic_eval_matches_brute_force_with_head_and_ddp(tiny_model, folders, head_weight_matrix,
                                                                 tiny_model_and_transforms):
    from open_clip_po.eval import typographic_eval

    _, _, preprocess, tokenizer = tiny_model_and_transforms
    clean, attacked = folders
    model = _with_head(tiny_model, head_weight_matrix)
    model.train()
    templates = ["a photo of a {}.", "a blurry picture of the {}."]
    got = typographic_eval(_DDPLike(model), tokenizer, preprocess, clean, attacked, templates=templates,
                           batch_size=5)
    assert model.training, "typographic_eval must restore train mode"
    model.eval()
    names = [c.replace("_", " ") for c in CLASSES]
    clean_correct, _, n_clean = _brute_force(model, tokenizer, preprocess, names, templates, _clean_samples(clean))
    t_correct, w_hits, n_t = _brute_force(model, tokenizer, preprocess, names, templates, _attacked_samples(attacked))
    assert n_t == n_clean == len(CLASSES) * PER_CLASS
    assert got == {"clean_top1": pytest.approx(clean_correct / n_clean),
                   "typographic_top1": pytest.approx(t_correct / n_t),
                   "written_rate": pytest.approx(w_hits / n_t)}


def test_zeroshot_cli_writes_documented_json_and_png(folders, checkpoints, tmp_path, tiny_model,
                                                     head_weight_matrix, tiny_model_and_transforms):
    from open_clip_po.eval import typographic_eval
    from open_clip_po.eval.plots import SINGLE_FIGSIZE, figure_pixels

    clean, attacked = folders
    _, head = checkpoints
    out = tmp_path / "zs" / "result.json"
    rc = _run_cli(["zeroshot", "--model", "po-tiny", "--pretrained", str(head), "--images", str(clean),
                   "--typographic", str(attacked), "--templates-for", "pets", "--workers", "0", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "clean" and result["model"] == "po-tiny" and result["pretrained"] == str(head)
    assert result["task"] == "zeroshot_classification_typographic"
    assert result["linear_head"] is True and result["templates"] == ["a photo of a {}, a type of pet."]
    metrics = result["metrics"]
    assert metrics["num_clean"] == metrics["num_typographic"] == len(CLASSES) * PER_CLASS
    assert metrics["skipped_clean"] == metrics["skipped_typographic"] == 0
    # The checkpoint's weights and head, evaluated in-process, give the same numbers.
    _, _, preprocess, tokenizer = tiny_model_and_transforms
    expected = typographic_eval(_with_head(tiny_model, head_weight_matrix), tokenizer, preprocess, clean, attacked,
                                templates=result["templates"])
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value)
    with Image.open(out.with_suffix(".png")) as png:
        png.verify()
    with Image.open(out.with_suffix(".png")) as png:
        assert png.format == "PNG" and png.size == figure_pixels(SINGLE_FIGSIZE)


def test_on_the_fly_attack_is_reproducible_and_counts_written(folders, tiny_model, tiny_model_and_transforms):
    from open_clip_po.data.typographic import pick_written_class, render_attack
    from open_clip_po.eval import typographic_eval

    _, _, preprocess, tokenizer = tiny_model_and_transforms
    clean, _ = folders
    first = typographic_eval(tiny_model, tokenizer, preprocess, clean, attack_seed=3)
    assert first == typographic_eval(tiny_model, tokenizer, preprocess, clean, attack_seed=3, batch_size=3)
    # Brute force with the documented per-sample seeding: random.Random(f"{seed}:{index}").
    names = [c.replace("_", " ") for c in CLASSES]
    samples, attacked_dir = _clean_samples(clean), clean.parent / "on_the_fly"
    rebuilt = []
    for index, (path, label, _) in enumerate(samples):
        rng = random.Random(f"3:{index}")
        written = pick_written_class(label, len(names), rng)
        image, _ = render_attack(Image.open(path).convert("RGB"), names[written], rng)
        attacked_dir.mkdir(exist_ok=True)
        image.save(attacked_dir / f"{index}.png")
        rebuilt.append((attacked_dir / f"{index}.png", label, written))
    correct, hits, n = _brute_force(tiny_model, tokenizer, preprocess, names, ["a photo of a {}."], rebuilt)
    assert first["typographic_top1"] == pytest.approx(correct / n)
    assert first["written_rate"] == pytest.approx(hits / n)


def _write_shard(path, samples, with_cls, extra_bad=True):
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, (image_path, label, written) in enumerate(samples):
            add(f"{i:05d}.png", image_path.read_bytes())
            if with_cls:
                add(f"{i:05d}.cls", str(label).encode())
            else:
                add(f"{i:05d}.json", json.dumps({"label": label, "written": written}).encode())
        if extra_bad:
            add("99999.json", b"{}")   # a sample with no image: skipped and counted, not a crash


@pytest.fixture(scope="module")
def shards(folders, tmp_path_factory):
    clean, attacked = folders
    root = tmp_path_factory.mktemp("eval_shards")
    (root / "clean").mkdir()
    (root / "attacked").mkdir()
    samples = _clean_samples(clean)
    _write_shard(root / "clean" / "clean-000.tar", samples[:5], True)
    _write_shard(root / "clean" / "clean-001.tar", samples[5:], True)
    _write_shard(root / "attacked" / "t-000.tar", _attacked_samples(attacked), False)
    (root / "clean" / "classnames.txt").write_text("\n".join(c.replace("_", " ") for c in CLASSES) + "\n")
    return root


def test_webdataset_shards_give_the_folder_numbers(folders, shards, tiny_model, tiny_model_and_transforms):
    from open_clip_po.eval import typographic_eval

    _, _, preprocess, tokenizer = tiny_model_and_transforms
    clean, attacked = folders
    names = [c.replace("_", " ") for c in CLASSES]
    from_shards = typographic_eval(tiny_model, tokenizer, preprocess, str(shards / "clean" / "clean-{000..001}.tar"),
                                   str(shards / "attacked"), classnames=names)
    from_folders = typographic_eval(tiny_model, tokenizer, preprocess, clean, attacked)
    assert from_shards == pytest.approx(from_folders)


def test_reads_the_typographic_builders_shards(folders, tmp_path, tiny_model, tiny_model_and_transforms):
    """reg-*.tar (clean, json label) and pref-*.tar (json label + written) from open_clip_po.data.typographic."""
    from open_clip_po.data.typographic import build_typographic
    from open_clip_po.eval import typographic_eval

    _, _, preprocess, tokenizer = tiny_model_and_transforms
    clean, _ = folders
    build_typographic(clean, tmp_path / "out", image_size=64, image_format="png", quiet=True)
    names = (tmp_path / "out" / "classnames.txt").read_text().split("\n")[:3]
    from_shards = typographic_eval(tiny_model, tokenizer, preprocess, str(tmp_path / "out" / "reg-*.tar"),
                                   str(tmp_path / "out" / "pref-*.tar"), classnames=names)
    # Lossless PNG at the images' own size: the clean shards hold exactly the folder's images.
    assert from_shards["clean_top1"] == pytest.approx(typographic_eval(tiny_model, tokenizer, preprocess,
                                                                       clean)["clean_top1"])
    assert set(from_shards) == {"clean_top1", "typographic_top1", "written_rate"}


def test_on_the_fly_attack_on_shards_does_not_depend_on_workers(shards, checkpoints, tmp_path):
    base, _ = checkpoints
    results = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}.json"
        assert _run_cli(["zeroshot", "--model", "po-tiny", "--pretrained", str(base), "--images",
                         str(shards / "clean"), "--attack-on-the-fly", "--seed", "4", "--workers", workers,
                         "--batch-size", "4", "--output", str(out)]) == 0
        results.append(json.loads(out.read_text())["metrics"])
    assert results[0] == results[1]
    # classnames.txt beside the shards was used; the two image-less samples were counted, not dropped.
    assert results[0]["num_clean"] == len(CLASSES) * PER_CLASS and results[0]["skipped_clean"] == 2
    assert results[0]["num_typographic"] == len(CLASSES) * PER_CLASS


# ---------------------------------------------------------------------------------------------------------------
# sweep


def test_parse_t_values():
    from open_clip_po.eval import EvalError, parse_t_values

    ts = parse_t_values("-4:4:0.5")
    assert len(ts) == 17 and ts[0] == -4 and ts[-1] == 4 and 0.0 in ts and 1.0 in ts
    assert parse_t_values("0:1:0.3") == [0, 0.3, 0.6, 0.9]
    assert parse_t_values("0,1,2.5") == [0, 1, 2.5]
    for bad in ("1:0:0.1", "0:1:0", "a:b:c", "0:1"):
        with pytest.raises(EvalError):
            parse_t_values(bad)


def test_feature_path_equals_model_with_scaled_head(tiny_model, head_weight_matrix, tiny_model_and_transforms):
    """Base features + W_t afterwards == a model carrying W_t, for images and the zero-shot classifier."""
    from open_clip_po.eval.features import PromptFeatures, apply_head, base_encoders, zero_shot_classifier
    from open_clip_po.surgery.cli import scale_head

    tokenizer = tiny_model_and_transforms[3]
    model = _with_head(tiny_model, head_weight_matrix)
    images = torch.randn(4, 3, 64, 64)
    names, templates = ["cat", "dog", "red fox"], ["a photo of a {}.", "art of the {}."]
    encode_image, encode_text = base_encoders(model)
    prompts = PromptFeatures(encode_text, tokenizer, [t.format(n) for n in names for t in templates])
    with torch.no_grad():
        base = encode_image(images)
    for t in (-1.5, 0.0, 0.5, 1.0, 2.0):
        w_t = scale_head(head_weight_matrix, t)
        reference = _with_head(tiny_model, w_t)
        with torch.no_grad():
            torch.testing.assert_close(apply_head(base, w_t), reference.encode_image(images, normalize=True),
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(prompts.classifier(names, templates, w_t),
                                   zero_shot_classifier(reference, tokenizer, names, templates), atol=1e-5, rtol=1e-5)


def test_sweep_reproduces_base_at_t0_and_head_at_t1(folders, checkpoints, tmp_path):
    from open_clip_po.eval.plots import WIDE_FIGSIZE, figure_pixels

    clean, attacked = folders
    base, head = checkpoints
    common = ["--model", "po-tiny", "--images", str(clean), "--typographic", str(attacked), "--workers", "0"]
    assert _run_cli(["zeroshot", "--pretrained", str(base), "--output", str(tmp_path / "base.json")] + common) == 0
    assert _run_cli(["zeroshot", "--pretrained", str(head), "--output", str(tmp_path / "head.json")] + common) == 0
    assert _run_cli(["sweep", "--pretrained", str(head), "--t", "-1:1:0.5", "--output",
                     str(tmp_path / "sweep.json")] + common) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    rows = {r["t"]: r for r in sweep["rows"]}
    assert sweep["head"]["dim"] == D and len(sweep["head"]["singular_values"]) == D
    assert sorted(rows) == [-1, -0.5, 0, 0.5, 1]
    # The head matters on this data, so matching both ends is not a coincidence of equal numbers.
    assert rows[0] != {**rows[1], "t": 0}
    for t, name in ((0, "base"), (1, "head")):
        metrics = json.loads((tmp_path / f"{name}.json").read_text())["metrics"]
        for key in ("clean_top1", "typographic_top1", "written_rate"):
            assert rows[t][key] == pytest.approx(metrics[key]), (t, key)
    csv_lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert csv_lines[0] == "t,clean_top1,typographic_top1,written_rate" and len(csv_lines) == 6
    with Image.open(tmp_path / "sweep.png") as png:
        assert png.format == "PNG" and png.size == figure_pixels(WIDE_FIGSIZE)


# ---------------------------------------------------------------------------------------------------------------
# gender


def test_find_crossing_interpolates_linearly():
    from open_clip_po.eval import find_crossing

    assert find_crossing([0, 1, 2], [1.0, 0.5, -1.5]) == pytest.approx(1.25)
    assert find_crossing([0, 0.5, 1], [0.2, 0.0, -0.3]) == 0.5
    assert math.isnan(find_crossing([0, 1], [0.3, 0.1]))
    # Several crossings: the first met going from the base model (t = 0) towards the head, else the nearest below.
    ts = [-2, -1, 0, 1, 2]
    assert find_crossing(ts, [1, -1, -0.5, 0.5, 1]) == pytest.approx(0.5)
    assert find_crossing(ts, [1, -1, -0.5, -0.5, -1]) == pytest.approx(-1.5)


def test_gender_curves_find_the_analytic_crossing():
    """D = 2, W = diag(1, 4): W_t = diag(1, 4^t). An image x = (a, 1) of a man with "man" = e1 and "woman" = e2
    scores a / |W_t x| against 4^t / |W_t x|: P(man) = P(woman) exactly at t* = log_4(a)."""
    from open_clip_po.eval import gender_curves
    from open_clip_po.surgery.cli import scale_head

    W = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    ts = [round(0.03 * i, 2) for i in range(35)]          # 0 … 1.02, never exactly on an answer
    heads = {t: scale_head(W, t) for t in ts}
    a = torch.tensor([2.0 ** 0.5, 2.0, 2.0 ** 1.5], dtype=torch.float64)   # t* = 0.25, 0.5, 0.75
    images = torch.stack([a, torch.ones(3, dtype=torch.float64)], dim=1)
    images = torch.cat([images, torch.tensor([[1.0, 3.0]], dtype=torch.float64)])   # a woman: never flips
    is_man = torch.tensor([True, True, True, False])
    activity = torch.zeros(4, dtype=torch.long)
    man, woman = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    curves = gender_curves(heads, images, is_man, activity, man, woman, (man + woman) / 2, scale=10.0)
    per_image = curves["t_star_per_image"]
    assert per_image[:3] == pytest.approx([0.25, 0.5, 0.75], abs=2e-3)
    assert math.isnan(per_image[3])
    # The mean curves cross exactly where the mean P(own gender) passes 1/2, found by interpolation too.
    p_true = curves["p_true_gender"]
    i = next(k for k in range(len(ts) - 1) if (p_true[k] - 0.5) * (p_true[k + 1] - 0.5) < 0)
    assert ts[i] < curves["t_star"] < ts[i + 1]
    assert curves["activity_accuracy"] == [1.0] * len(ts)   # one activity: always right


def test_retrieval_counts_men_and_women_in_the_top_k():
    from open_clip_po.eval.gender import retrieval_counts

    # Similarity to the prompt e1 is the first coordinate after normalisation: images 3, 0, 4 are the top 3.
    images = torch.tensor([[0.9, 0.1], [0.1, 1.0], [0.2, 0.9], [1.0, 0.0], [0.7, 0.3]])
    is_man = torch.tensor([True, False, True, False, False])
    rows = retrieval_counts(None, images, is_man, torch.tensor([[2.0, 0.0]]), ["p"], k=3)
    assert rows == [{"prompt": "p", "k": 3, "men": 1, "women": 2, "women_fraction": pytest.approx(2 / 3)}]
    # Prompt (1, 1): cosine ranks images 4, 2, 0 (2 men, 1 woman). Under W = diag(1, 10) on both towers the
    # score is (x + 100 y) / |(x, 10 y)|: images 2, 1, 4 (1 man, 2 women).
    prompt = torch.tensor([[1.0, 1.0]])
    assert retrieval_counts(None, images, is_man, prompt, ["p"], k=3)[0]["men"] == 2
    rows = retrieval_counts(torch.diag(torch.tensor([1.0, 10.0])), images, is_man, prompt, ["p"], k=3)
    assert (rows[0]["men"], rows[0]["women"]) == (1, 2)


def test_retrieval_lean_by_hand_and_its_neutral_t():
    """Prompt e1 scores a normalised image by its first coordinate. Women (1, 0), (1, 1); men (0, 1), (1, 2):
    women 1 and 1/√2, men 0 and 1/√5: lean = (mean women − mean men) / pooled sd. The image head
    W_t = I + t(W − I), W = [[0, 1], [1, 0]] swaps the coordinates at t = 1, where the men score higher:
    the lean crosses zero in between."""
    from open_clip_po.eval.gender_lean import retrieval_lean

    images = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    is_man = torch.tensor([False, False, True, True])
    prompt = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    ts = [0.0, 0.25, 0.5, 0.75, 1.0]
    heads = {t: eye + t * (swap - eye) for t in ts}
    everyone = torch.ones(4, dtype=torch.bool)
    out = retrieval_lean(heads, images, is_man, prompt.repeat(2, 1),
                         [everyone, torch.tensor([True, False, True, False])], towers="image")

    def by_hand(t):
        x = F.normalize(images @ heads[t].T, dim=-1)[:, 0]
        w, m = x[:2], x[2:]
        return ((w.mean() - m.mean()) / ((w.var() + m.var()) / 2).sqrt()).item()

    assert out["t"] == ts and out["lean"][0] == pytest.approx([by_hand(t) for t in ts])
    assert out["lean"][0][0] > 0 > out["lean"][0][-1]           # women first at t = 0, men at t = 1
    assert ts[0] < out["t_neutral"][0] < ts[-1]
    # a group with one image per gender has no spread to weigh against
    assert all(math.isnan(v) for v in out["lean"][1]) and math.isnan(out["t_neutral"][1])


def test_lean_split_by_hand():
    """3-D: "man" = e1, "woman" = e2, so g = (e2 − e1)/√2. Women e2, men e1 + e3 (normalised (e1 + e3)/√2):
    d_x = (−1/√2, 1, −1/√2), g·d_x = 1/2 + 1/√2. Neutral caption n = (0, 0.6, 0.8): image lean n·d_x = 0.6 − 0.8/√2
    = +0.034 (women first, barely); along = (n·g)(g·d_x) = (0.6/√2)(1/2 + 1/√2) = +0.512; the rest, −0.478, is read
    through d_x − (g·d_x)g = (0.146, 0.146, −0.707), mostly e3, which the gendered captions do not see."""
    from open_clip_po.eval.gender_lean import lean_split

    r2 = math.sqrt(2.0)
    images = torch.tensor([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0], [1.0, 0.0, 1.0], [3.0, 0.0, 3.0]], dtype=torch.float64)
    is_man = torch.tensor([False, False, True, True])
    activity = torch.zeros(4, dtype=torch.long)
    e = torch.eye(3, dtype=torch.float64)
    (row,) = lean_split(images, is_man, activity, e[:1], e[1:2], torch.tensor([[0.0, 0.6, 0.8]], dtype=torch.float64))
    assert row["image_lean"] == pytest.approx(0.6 - 0.8 / r2)
    assert row["along"] == pytest.approx((0.6 / r2) * (0.5 + 1 / r2))
    assert row["rest"] == pytest.approx(0.6 * (1 - (0.5 + 1 / r2) / r2) - 0.8 / r2)
    assert row["along"] > 0 > row["rest"]
    # an activity with images of one gender only has no lean to split
    (empty,) = lean_split(images[:2], is_man[:2], activity[:2], e[:1], e[1:2], e[2:])
    assert math.isnan(empty["image_lean"])


def _gender_csv(tmp_path):
    rng = random.Random(5)
    lines = ["image,gender,activity"]
    (tmp_path / "img").mkdir()
    for i in range(8):
        gender, activity = ("man", "woman")[i % 2], ("cooking", "running")[i // 4]
        Image.new("RGB", (64, 64), tuple(rng.randrange(256) for _ in range(3))).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,{gender},{activity}")
    (tmp_path / "people.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "people.csv"


def test_gender_cli_writes_curves_retrieval_and_plots(checkpoints, tmp_path, tiny_model, head_weight_matrix,
                                                      tiny_model_and_transforms):
    from open_clip_po.eval.plots import SINGLE_FIGSIZE, WIDE_FIGSIZE, figure_pixels

    _, head = checkpoints
    csv_path = _gender_csv(tmp_path)
    out = tmp_path / "g" / "gender.json"
    assert _run_cli(["gender", "--model", "po-tiny", "--pretrained", str(head), "--csv", str(csv_path),
                     "--t", "0:1:0.25", "--top-k", "3", "--retrieval-prompt", "an image of a cook",
                     "--workers", "0", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "gender_flip" and result["num_images"] == 8
    assert result["curves"]["t"] == [0, 0.25, 0.5, 0.75, 1]
    for p_true, p_flip in zip(result["curves"]["p_true_gender"], result["curves"]["p_flipped_gender"]):
        assert p_true + p_flip == pytest.approx(1)
    curves = result["curves"]
    diff = [a - b for a, b in zip(curves["p_true_gender"], curves["p_flipped_gender"])]
    from open_clip_po.eval import find_crossing
    t_star = result["metrics"]["t_star"]
    assert (t_star is None and math.isnan(find_crossing(curves["t"], diff))) or \
        t_star == pytest.approx(find_crossing(curves["t"], diff))
    lean = result["retrieval_lean"]
    assert lean["prompts"] == ["an image of a cook"] and lean["images"] == ["all"] and lean["t"] == curves["t"]
    assert len(lean["lean"][0]) == 5
    split = lean["split_t0"]   # per activity's neutral caption, whatever the retrieval prompts
    assert [r["prompt"] for r in split] == ["The person is cooking", "The person is running"]
    assert all(r["image_lean"] == pytest.approx(r["along"] + r["rest"]) for r in split)
    for label, rows in result["retrieval"].items():
        assert [r["prompt"] for r in rows] == ["an image of a cook"]
        assert rows[0]["men"] + rows[0]["women"] == rows[0]["k"] == 3
    import csv

    per_image = list(csv.DictReader(open(out.parent / "gender_images.csv")))
    assert len(per_image) == 8
    # P(man) at t = 0 is the base model's, at t = 1 the trained head's: brute force, one image at a time.
    _, _, preprocess, tokenizer = tiny_model_and_transforms
    for column, model in (("p_man_t0", tiny_model.eval()), ("p_man_t1", _with_head(tiny_model, head_weight_matrix))):
        for row in per_image[:3]:
            with torch.no_grad():
                x = F.normalize(model.encode_image(preprocess(Image.open(row["image"]).convert("RGB"))[None]), dim=-1)
                texts = F.normalize(model.encode_text(tokenizer([f"The man is {row['activity']}",
                                                                 f"The woman is {row['activity']}"])), dim=-1)
                p_man = torch.softmax(model.logit_scale.exp() * x @ texts.T, dim=-1)[0, 0].item()
            assert float(row[column]) == pytest.approx(p_man, abs=1e-5), (column, row["image"])
    with Image.open(out.with_suffix(".png")) as png:
        assert png.size == figure_pixels(WIDE_FIGSIZE)
    for name in ("gender_retrieval.png", "gender_lean.png"):
        with Image.open(out.parent / name) as png:
            assert png.size == figure_pixels(SINGLE_FIGSIZE)


# ---------------------------------------------------------------------------------------------------------------
# KL


def test_kl_per_image_matches_hand_computation():
    from open_clip_po.eval.kl import kl_per_image

    x = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=-1)
    classifier = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1).T
    ref_x = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0]]), dim=-1)
    got = kl_per_image(x, classifier, 3.0, ref_x, classifier, 2.0)
    for i in range(2):
        p = torch.softmax(3.0 * x[i] @ classifier, -1)
        q = torch.softmax(2.0 * ref_x[i] @ classifier, -1)
        by_hand = sum(float(p[k]) * math.log(float(p[k]) / float(q[k])) for k in range(3))
        assert got[i].item() == pytest.approx(by_hand, rel=1e-5)


def test_kl_cli_zero_against_itself_and_own_backbone_as_reference(folders, checkpoints, tmp_path):
    from open_clip_po.eval.plots import SINGLE_FIGSIZE, figure_pixels

    clean, _ = folders
    base, head = checkpoints
    common = ["--model", "po-tiny", "--images", str(clean), "--workers", "0"]
    assert _run_cli(["kl", "--pretrained", str(base), str(head), "--label", "base", "--label", "head",
                     "--ref-pretrained", str(base), "--output", str(tmp_path / "kl.json")] + common) == 0
    assert _run_cli(["kl", "--pretrained", str(head), "--output", str(tmp_path / "own.json")] + common) == 0
    with_ref = json.loads((tmp_path / "kl.json").read_text())
    own = json.loads((tmp_path / "own.json").read_text())
    assert with_ref["task"] == "kl_to_reference" and with_ref["direction"] == "forward"
    assert with_ref["metrics"]["base"]["kl_mean"] == pytest.approx(0, abs=1e-6)
    assert with_ref["metrics"]["head"]["kl_mean"] > 1e-4
    assert with_ref["metrics"]["head"]["n"] == len(CLASSES) * PER_CLASS
    # The head checkpoint's own backbone is the base checkpoint: both references agree.
    assert own["metrics"]["head"]["kl_mean"] == pytest.approx(with_ref["metrics"]["head"]["kl_mean"], rel=1e-4)
    with Image.open(tmp_path / "kl.png") as png:
        assert png.size == figure_pixels(SINGLE_FIGSIZE)


# ---------------------------------------------------------------------------------------------------------------
# errors: one clear line each


def _error_line(capsys, argv):
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_error_lines(folders, checkpoints, tmp_path, capsys):
    from open_clip_po.checkpoint import atomic_save

    clean, attacked = folders
    base, head = checkpoints
    zs = ["zeroshot", "--model", "po-tiny", "--pretrained", str(base), "--workers", "0",
          "--output", str(tmp_path / "x.json")]

    partial = tmp_path / "partial"
    (partial / "cat").mkdir(parents=True)
    for name in ("cat", "dog"):
        (partial / name).mkdir(exist_ok=True)
        for p in (attacked / name).glob("*.png"):
            (partial / name / p.name).write_bytes(p.read_bytes())
    err = _error_line(capsys, zs + ["--images", str(clean), "--typographic", str(partial)])
    assert "lacks class folder 'red_fox'" in err

    err = _error_line(capsys, zs + ["--images", str(tmp_path / "nowhere")])
    assert "image folder not found" in err and "nowhere" in err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no class folders" in _error_line(capsys, zs + ["--images", str(empty)])
    (empty / "cat").mkdir()
    assert "holds no images" in _error_line(capsys, zs + ["--images", str(empty)])

    import open_clip

    other = open_clip.create_model("po-small")
    small = atomic_save({"state_dict": other.state_dict()}, tmp_path / "small.pt")
    err = _error_line(capsys, ["zeroshot", "--model", "po-tiny", "--pretrained", str(small), "--images", str(clean),
                               "--workers", "0"])
    assert "does not fit model po-tiny" in err

    err = _error_line(capsys, ["sweep", "--model", "po-tiny", "--pretrained", str(base), "--images", str(clean),
                               "--workers", "0", "--output", str(tmp_path / "s.json")])
    assert "no linear head" in err
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "s.json").exists()


def test_module_entry_point_one_line_error_and_help(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "open_clip_po.eval", "zeroshot", "--model", "po-tiny",
                          "--pretrained", str(tmp_path / "missing.pt"), "--images", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"python -m open_clip_po.eval zeroshot: error: checkpoint not found: {tmp_path / 'missing.pt'}"]
    from open_clip_po.eval.cli import build_parser

    for command in ("zeroshot", "tsweep", "sweep", "gender", "kl"):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args([command, "--help"])
        assert exit_info.value.code == 0


@pytest.mark.parametrize("towers", ["both", "image"])
def test_sweep_of_a_log_head_is_its_folded_checkpoints(folders, tiny_model_and_transforms, tmp_path, towers):
    """A log head (W = exp(A), the default of --po-linear-head) is swept along exp(tA): each row is the zero-shot
    evaluation of the stock checkpoint svd_scale folds at that t (on the image tower exp(tA) is not the dense
    head's I + t(W − I), so a sweep that lost the generator would not match)."""
    from open_clip_po.checkpoint import CheckpointCodec, atomic_save
    from open_clip_po.head import attach_linear_head
    from open_clip_po.surgery.cli import main as svd_scale_main

    model = copy.deepcopy(tiny_model_and_transforms[0])
    g = torch.Generator().manual_seed(3)
    A = 0.4 * torch.randn(D, D, generator=g)
    attach_linear_head(model, towers=towers, log=(A + A.T) / 2 if towers == "both" else A)
    head = atomic_save(CheckpointCodec(linear_head=True, head_towers=towers, head_param="log").encode(
        {"epoch": 1, "name": "log-head", "state_dict": model.state_dict()}), tmp_path / "head.pt")
    clean, attacked = folders
    common = ["--model", "po-tiny", "--images", str(clean), "--typographic", str(attacked), "--workers", "0"]
    assert _run_cli(["sweep", "--pretrained", str(head), "--t", "-2,1", "--output", str(tmp_path / "sweep.json")]
                    + common) == 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["head"]["param"] == "log"
    for row in sweep["rows"]:
        folded = tmp_path / f"t{row['t']:g}.pt"
        assert svd_scale_main([str(head), "--t", str(row["t"]), "--out", str(folded)]) == 0
        assert _run_cli(["zeroshot", "--pretrained", str(folded), "--output", str(tmp_path / "z.json")] + common) == 0
        metrics = json.loads((tmp_path / "z.json").read_text())["metrics"]
        for key in ("clean_top1", "typographic_top1", "written_rate"):
            assert row[key] == pytest.approx(metrics[key]), (row["t"], key)
