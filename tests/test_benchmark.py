"""`python -m open_clip_po.eval benchmark`: Tables 1 and 2 through CLIP_benchmark, on tiny data sets in their real
on-disk layouts (tests/benchmark_helpers.py), checked against CLIP_benchmark's own evaluation and brute force."""
from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from benchmark_helpers import (PAINT_PAIRS, RTA_PAIRS, picture, save_checkpoint, write_eurosat, write_imagenet_val,
                               write_materzynska, write_named_set, write_wds_set)

REPO = Path(__file__).resolve().parents[1]
PETS = ["Abyssinian", "American Bulldog", "Beagle", "Bengal", "Birman"]
CARS = ["Audi A5 Coupe 2012", "BMW M3 Coupe 2012", "Tesla Model S Sedan 2012", "smart fortwo Convertible 2012",
        "Volvo 240 Sedan 1993", "Ford GT Coupe 2006"]
DTD = ["banded", "blotchy", "braided", "bubbly"]  # fewer than 5 classes: acc5 is NaN, as in CLIP_benchmark
WDS_SETS = {"pets": ("wds_vtab-pets", "wds/vtab/pets"), "cars": ("wds_cars", "wds/cars"),
            "dtd": ("wds_vtab-dtd", "wds/vtab/dtd")}


def _discriminative(model):
    """A random po-tiny predicts nearly one class for every image; without the visual positional and class
    embeddings its image features follow the image, so predictions spread over the classes."""
    with torch.no_grad():
        model.visual.positional_embedding.zero_()
        model.visual.class_embedding.zero_()
    return model


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import open_clip
    import open_clip_po  # noqa: F401  (registers po-tiny)
    from open_clip_po.data.imagenet100 import WNIDS

    root = tmp_path_factory.mktemp("benchmark")
    data = root / "data"
    counts = {"pets": write_wds_set(data / "wds_vtab-pets", PETS, per_class=3, shards=2, fmt="png"),
              "cars": write_wds_set(data / "wds_cars", CARS, per_class=2, fmt="jpg", seed=1),
              "dtd": write_wds_set(data / "wds_vtab-dtd", DTD, per_class=3, fmt="webp", seed=2),
              "eurosat": write_eurosat(data), "imagenet100": write_imagenet_val(data, WNIDS)}
    write_materzynska(data)
    write_named_set(data / "paint" / "typographic_attacks", PAINT_PAIRS, "png")
    write_named_set(data / "rta100" / "data", RTA_PAIRS, "jpg")
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = _discriminative(open_clip.create_model("po-tiny"))
        checkpoints.append(str(save_checkpoint(model, root / f"model{seed}.pt")))
    return {"root": root, "data": data, "counts": counts, "ckpt": checkpoints}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_benchmark(argv, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "open_clip_po.eval", "benchmark", *argv]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), "-m", "open_clip_po.eval", "benchmark", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _in_process(argv) -> int:
    from open_clip_po.eval.__main__ import main

    return main(["benchmark", *argv])


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def _metrics(results: dict, label: str, key: str) -> dict:
    row = next(r for r in results["rows"] if r["label"] == label)
    return row["datasets"][key]["metrics"]


def _load(ckpt):
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", "po-tiny", ckpt, cache_dir=None, device="cpu")
    return model.eval(), transform, tokenizer


def _clip_benchmark_loader(name, root, transform):
    """CLIP_benchmark's data set and loader exactly as its `clip_benchmark eval` builds them."""
    from clip_benchmark.datasets.builder import build_dataset, get_dataset_collate_fn

    dataset = build_dataset(dataset_name=name, root=str(root), transform=transform, split="test", download=False)
    if name.startswith("wds/"):
        loader = torch.utils.data.DataLoader(dataset.batched(4), batch_size=None, shuffle=False, num_workers=0)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, num_workers=0,
                                             collate_fn=get_dataset_collate_fn(name))
    return dataset, loader


# -- the clean split equals CLIP_benchmark's own evaluation -------------------------------------------------------

@pytest.mark.slow
def test_clean_accuracy_equals_clip_benchmark(bench, tmp_path):
    from open_clip_po.eval.benchmark import cbench

    out = tmp_path / "out"
    assert _in_process(["--model", "po-tiny", "--pretrained", bench["ckpt"][0], "--label", "m", "--datasets",
                        "pets,cars,dtd,eurosat", "--dataset-root", str(bench["data"]), "--output", str(out),
                        "--batch-size", "5", "--workers", "0"]) == 0
    results = _results(out)
    model, transform, tokenizer = _load(bench["ckpt"][0])
    sources = {**{k: (bench["data"] / folder, name) for k, (folder, name) in WDS_SETS.items()},
               "eurosat": (bench["data"] / "eurosat", "eurosat")}
    for key, (root, name) in sources.items():
        dataset, loader = _clip_benchmark_loader(name, root, transform)
        reference = cbench.zeroshot_evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                             amp=False)
        ours = _metrics(results, "m", key)["clean"]
        assert ours["num_samples"] == bench["counts"][key]
        assert ours["acc1"] == reference["acc1"], key
        assert ours["mean_per_class_recall"] == reference["mean_per_class_recall"], key
        if math.isnan(reference["acc5"]):
            assert ours["acc5"] is None  # NaN is null in JSON
        else:
            assert ours["acc5"] == reference["acc5"], key


@pytest.mark.slow
def test_clean_predictions_equal_clip_benchmark_image_for_image(bench):
    """Our batched loop (shards read by our reader, CLIP_benchmark's classifier) against its
    zero_shot_classifier + run_classification, prediction by prediction."""
    from clip_benchmark.metrics.zeroshot_classification import run_classification

    from open_clip_po.eval.benchmark import cbench
    from open_clip_po.eval.benchmark.catalog import CATALOG
    from open_clip_po.eval.benchmark.evaluate import predict
    from open_clip_po.eval.benchmark.samples import Prepare
    from open_clip_po.eval.benchmark.sources import locate

    model, transform, tokenizer = _load(bench["ckpt"][1])
    spread = set()
    for key, (folder, name) in {**WDS_SETS, "eurosat": ("eurosat", "eurosat")}.items():
        found = locate(CATALOG[key], str(bench["data"]), "test")
        dataset, loader = _clip_benchmark_loader(name, bench["data"] / folder, transform)
        assert found.classnames == list(dataset.classes) and found.templates == list(dataset.templates)
        classifier = cbench.zero_shot_classifier(model, tokenizer, found.classnames, found.templates, "cpu", False)
        logits, target = run_classification(model, classifier, loader, "cpu", amp=False)
        ours = predict(model, classifier, found.make(Prepare(transform, ["clean"]), 0, 1), ["clean"], device="cpu",
                       batch_size=3)
        assert ours["index"].tolist() == list(range(len(target)))
        assert torch.equal(ours["label"], target)
        assert torch.equal(ours["argmax"]["clean"], logits.argmax(dim=1)), key
        spread.update(logits.argmax(dim=1).tolist())
    assert len(spread) >= 3  # the model's predictions differ between images, so equality means something


# -- clean and typographic, end to end, one process ---------------------------------------------------------------

ALL_SETS = "pets,cars,dtd,eurosat,imagenet100,table2"


@pytest.fixture(scope="module")
def one_process(bench):
    out, saved = bench["root"] / "one", bench["root"] / "saved-one"
    a, b = bench["ckpt"]
    proc = run_benchmark(["--model", "po-tiny", "--pretrained", a, b, "--label", "base", "--label", "ft",
                          "--interpolate", a, b, "--alpha", "1", "--alpha", "0", "--datasets", ALL_SETS,
                          "--dataset-root", str(bench["data"]), "--typographic", "--seed", "3",
                          "--save-typographic", str(saved), "--output", str(out), "--batch-size", "7",
                          "--workers", "2"])
    return {"out": out, "saved": saved, "results": _results(out), "stdout": proc.stdout}


@pytest.mark.slow
def test_outputs_have_table_layouts(one_process):
    out, results = one_process["out"], one_process["results"]
    assert [r["label"] for r in results["rows"]] == ["base", "ft", "PAINT α=1", "PAINT α=0"]
    table1 = (out / "table1.md").read_text()
    assert "| Method | OxfordPets O | OxfordPets T | StanfordCars O |" in table1 and "Avg. O | Avg. T |" in table1
    assert "Written-class rate on T" in table1 and "| PAINT α=0 |" in table1
    header = (out / "table1.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["method", "pets_O", "pets_T"] and "avg_T" in header and "imagenet100_written" in header
    assert "| Method | Materzynska | PAINT | RTA-100 | Avg. |" in (out / "table2.md").read_text()
    for png in ("table1.png", "table2.png"):
        with Image.open(out / png) as im:
            assert im.size == (1280, 480)
    assert "Table 1" in one_process["stdout"] and "Table 2" in one_process["stdout"]
    # The average columns are the means of the data sets' columns.
    base = next(r for r in results["rows"] if r["label"] == "base")
    t1 = ["pets", "cars", "dtd", "eurosat", "imagenet100"]
    assert base["average"]["table1"]["typographic_acc1"] == pytest.approx(
        sum(base["datasets"][k]["metrics"]["typographic"]["acc1"] for k in t1) / 5)
    assert base["average"]["table2"]["acc1"] == pytest.approx(
        sum(base["datasets"][k]["metrics"]["typographic"]["acc1"] for k in ("materzynska", "paint", "rta100")) / 3)


@pytest.mark.slow
def test_every_image_is_evaluated_once_clean_and_typographic(bench, one_process):
    results = one_process["results"]
    for key, count in bench["counts"].items():
        metrics = _metrics(results, "base", key)
        assert metrics["clean"]["num_samples"] == metrics["typographic"]["num_samples"] == count, key
        assert metrics["typographic"]["num_written_known"] == count
    assert _metrics(results, "base", "imagenet100")["clean"]["num_samples"] == 100  # 2 extra ImageNet classes out
    assert _metrics(results, "base", "materzynska")["typographic"]["num_samples"] == 5
    assert _metrics(results, "base", "materzynska")["typographic"]["num_written_known"] == 4  # "good" is no class
    assert set(_metrics(results, "base", "rta100")) == {"typographic"}  # real sets have no clean split


@pytest.mark.slow
def test_paint_interpolation_ends_are_the_two_models(one_process):
    results = one_process["results"]
    for key in ("pets", "imagenet100", "rta100"):
        assert _metrics(results, "PAINT α=1", key) == _metrics(results, "base", key)
        assert _metrics(results, "PAINT α=0", key) == _metrics(results, "ft", key)
    assert _metrics(results, "base", "pets") != _metrics(results, "ft", "pets")  # the two models do differ


def _classifier(model, tokenizer, classnames, templates):
    """Hand-built zero-shot classifier: per class the mean of normalised template embeddings, normalised."""
    rows = []
    for name in classnames:
        embedded = F.normalize(model.encode_text(tokenizer([t.format(c=name) for t in templates])), dim=-1)
        rows.append(F.normalize(embedded.mean(0), dim=0))
    return torch.stack(rows, dim=1)


def _wds_samples(folder: Path):
    """(index, PIL image, label) of every sample in shard order, read with tarfile."""
    n = int((folder / "test" / "nshards.txt").read_text())
    index = 0
    for shard in range(n):
        with tarfile.open(folder / "test" / f"{shard}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key in sorted({name.split(".")[0] for name in members}):
            ext = next(e for e in ("png", "jpg", "webp") if f"{key}.{e}" in members)
            yield index, Image.open(io.BytesIO(members[f"{key}.{ext}"])).convert("RGB"), int(members[f"{key}.cls"])
            index += 1


@torch.no_grad()
@pytest.mark.slow
def test_typographic_numbers_against_brute_force(bench, one_process):
    """T accuracy and written-class rate of pets, recomputed one image at a time from the shards."""
    from open_clip_po.eval.benchmark.attack import TypographicCopy

    model, transform, tokenizer = _load(bench["ckpt"][0])
    folder = bench["data"] / "wds_vtab-pets"
    templates = (folder / "zeroshot_classification_templates.txt").read_text().split("\n")[:-1]
    classifier = _classifier(model, tokenizer, PETS, templates)
    attack = TypographicCopy(PETS, "pets", seed=3)
    correct = written_hits = n = 0
    for index, image, label in _wds_samples(folder):
        attacked, written, _, _ = attack(image, label, index)
        assert written != label
        feature = F.normalize(model.encode_image(transform(attacked)[None]), dim=-1)
        prediction = int((feature @ classifier).argmax())
        correct, written_hits, n = correct + (prediction == label), written_hits + (prediction == written), n + 1
    ours = _metrics(one_process["results"], "base", "pets")["typographic"]
    assert (ours["acc1"], ours["written_rate"]) == (correct / n, written_hits / n)


@torch.no_grad()
@pytest.mark.slow
def test_real_typographic_set_against_brute_force(bench, one_process):
    """RTA-100: classes are every true and written name, template "a photo of a {}."; file names give both."""
    model, transform, tokenizer = _load(bench["ckpt"][1])
    names = sorted({n for pair in RTA_PAIRS for n in pair})
    classifier = _classifier(model, tokenizer, names, ["a photo of a {c}."])
    correct = written_hits = 0
    for label, text in RTA_PAIRS:
        path = bench["data"] / "rta100" / "data" / f"label={label}_text={text}.jpg"
        prediction = int((F.normalize(model.encode_image(transform(Image.open(path))[None]), dim=-1)
                          @ classifier).argmax())
        correct += prediction == names.index(label)
        written_hits += prediction == names.index(text)
    ours = _metrics(one_process["results"], "ft", "rta100")["typographic"]
    assert (ours["acc1"], ours["written_rate"]) == (correct / 4, written_hits / 4)


@pytest.mark.slow
def test_saved_copy_reads_back_in_clip_benchmark(bench, one_process, tmp_path):
    """--save-typographic writes CLIP_benchmark's wds layout: its own evaluation of the copy gives our T numbers,
    and `eval benchmark` on the copy as if it were original data gives them too (ImageNet-100 included)."""
    from open_clip_po.eval.benchmark import cbench

    saved, results = one_process["saved"], one_process["results"]
    model, transform, tokenizer = _load(bench["ckpt"][0])
    dataset, loader = _clip_benchmark_loader("wds/vtab/pets", saved / "wds_vtab-pets", transform)
    reference = cbench.zeroshot_evaluate(model, loader, tokenizer, dataset.classes, dataset.templates, "cpu",
                                         amp=False)
    assert reference["acc1"] == _metrics(results, "base", "pets")["typographic"]["acc1"]
    meta = json.loads((saved / "wds_vtab-pets" / "typographic.json").read_text())
    assert meta["seed"] == 3 and meta["procedure"].startswith("Defense-Prefix")

    out = tmp_path / "reread"
    assert _in_process(["--model", "po-tiny", "--pretrained", bench["ckpt"][0], "--label", "base", "--datasets",
                        "pets,cars,eurosat,imagenet100", "--dataset-root", str(saved), "--output", str(out),
                        "--workers", "0"]) == 0
    reread = _results(out)
    for key in ("pets", "cars", "eurosat", "imagenet100"):
        original = _metrics(results, "base", key)["typographic"]
        again = _metrics(reread, "base", key)["clean"]
        assert {k: again[k] for k in ("acc1", "acc5", "mean_per_class_recall", "num_samples")} == {
            k: original[k] for k in ("acc1", "acc5", "mean_per_class_recall", "num_samples")}, key
    assert reread["datasets"]["imagenet100"]["path"].endswith("wds_imagenet100")


# -- two processes ----------------------------------------------------------------------------------------------

def _copy_contents(folder: Path) -> dict[str, bytes]:
    out = {}
    for shard in sorted((folder / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_give_the_one_process_results(bench, one_process):
    out, saved = bench["root"] / "two", bench["root"] / "saved-two"
    a, b = bench["ckpt"]
    run_benchmark(["--model", "po-tiny", "--pretrained", a, b, "--label", "base", "--label", "ft",
                   "--interpolate", a, b, "--alpha", "1", "--alpha", "0", "--datasets", ALL_SETS,
                   "--dataset-root", str(bench["data"]), "--typographic", "--seed", "3", "--save-typographic",
                   str(saved), "--output", str(out), "--batch-size", "4", "--workers", "2"], nproc=2)
    two, one = _results(out), one_process["results"]
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["rows"] == one["rows"]
    for folder in ("wds_vtab-pets", "wds_cars", "wds_vtab-dtd", "wds_vtab-eurosat", "wds_imagenet100"):
        assert _copy_contents(saved / folder) == _copy_contents(one_process["saved"] / folder), folder
        assert not (saved / folder / "test" / ".parts").exists()


# -- bad input: one line ----------------------------------------------------------------------------------------

def _error_lines(capsys, argv) -> list[str]:
    assert _in_process(argv) == 2
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_missing_data_set_is_one_line_naming_path_and_fetch(capsys, tmp_path):
    lines = _error_lines(capsys, ["--model", "po-tiny", "--pretrained", "x.pt", "--datasets", "sun397,rta100",
                                  "--dataset-root", str(tmp_path)])
    assert len(lines) == 2  # one line per missing set, found before any model is loaded
    assert f"{tmp_path}/wds_sun397/test" in lines[0] and f"{tmp_path}/sun397" in lines[0]
    assert "huggingface-cli download clip-benchmark/wds_sun397 --repo-type dataset" in lines[0]
    assert lines[1].startswith("rta100: not found") and "rta100.zip of github.com/azuma164/Defense-Prefix" in lines[1]


def test_real_set_in_another_layout_is_one_line_naming_the_layout(capsys, tmp_path):
    (tmp_path / "rta100").mkdir()
    picture(1).save(tmp_path / "rta100" / "dog.png")
    (tmp_path / "materzynska" / "images").mkdir(parents=True)
    lines = _error_lines(capsys, ["--check-data", "--model", "po-tiny", "--datasets", "rta100,materzynska",
                                  "--dataset-root", str(tmp_path)])
    assert "label=<class>_text=<class>.<ext>" in lines[0] and str(tmp_path / "rta100") in lines[0]
    assert lines[1].startswith("materzynska:") and "annotations.json and images/" in lines[1]


def test_unknown_data_set_bad_alpha_and_no_model(capsys, tmp_path):
    lines = _error_lines(capsys, ["--model", "po-tiny", "--pretrained", "x.pt", "--datasets", "pets,imagenet",
                                  "--dataset-root", str(tmp_path)])
    assert len(lines) == 1 and "unknown data set 'imagenet'" in lines[0]
    with pytest.raises(SystemExit) as exit_:
        _in_process(["--model", "po-tiny", "--pretrained", "a", "--interpolate", "a", "b", "--alpha", "1.5",
                     "--dataset-root", str(tmp_path)])
    assert exit_.value.code == 2 and "must lie in [0, 1]" in capsys.readouterr().err
    lines = _error_lines(capsys, ["--model", "po-tiny", "--dataset-root", str(tmp_path)])
    assert "--pretrained is required" in lines[0]


def test_check_data_names_each_set_and_loads_no_model(bench, capsys):
    assert _in_process(["--check-data", "--model", "po-tiny", "--datasets", "pets,eurosat,imagenet100,paint",
                        "--dataset-root", str(bench["data"])]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"pets: wds at {bench['data']}/wds_vtab-pets, 5 classes",
                   f"eurosat: torchvision at {bench['data']}/eurosat, 10 classes",
                   f"imagenet100: imagenet-folder at {bench['data']}/imagenet/val, 100 classes",
                   f"paint: real at {bench['data']}/paint/typographic_attacks, 5 classes"]


# -- pieces ------------------------------------------------------------------------------------------------------

def test_defense_prefix_line_breaks():
    from open_clip_po.eval.benchmark.attack import two_lines

    assert two_lines("dog") == "dog"
    assert two_lines("golden retriever") == "golden\nretriever"
    assert two_lines("American Pit Bull") == "American\nPit Bull"          # 2-3 words: first / rest
    assert two_lines("Audi S4 Sedan 2012") == "Audi S4\nSedan 2012"       # more: first two / rest


def test_typographic_copy_is_seeded_per_image_and_follows_defense_prefix():
    from PIL import ImageColor

    from open_clip_po.eval.benchmark.attack import DP_COLORS, TypographicCopy

    names = ["cat", "dog", "red fox", "Tesla Model S Sedan 2012"]
    attack = TypographicCopy(names, "pets", seed=0)
    source = picture(3, 50)
    first = attack(source, 1, 17)
    again = TypographicCopy(names, "pets", seed=0)(source, 1, 17)
    assert first[1:] == again[1:] and first[0].tobytes() == again[0].tobytes()
    assert TypographicCopy(names, "cars", seed=0)(source, 1, 17)[2] != first[2]  # another data set, another draw
    seen = set()
    for index in range(60):
        image, written, data, params = attack(source, 2, index)
        assert written != 2 and image.size == (224, 224) and data[:2] == b"\xff\xd8"
        assert params["fill"] != params["stroke"] and {params["fill"], params["stroke"]} <= set(DP_COLORS)
        assert 1 <= params["size"] <= 40 and 0 <= params["xy"][0] < 224 and 0 <= params["xy"][1] < 224
        assert params["text"].replace("\n", " ") == names[written]
        seen.add((written, params["fill"], params["font"]))
    assert len(seen) > 20
    assert ImageColor.getrgb("Green") == (0, 128, 0)  # PIL's colour names, as Defense-Prefix passes them


def test_interpolation_is_the_weighted_mean_and_a_missing_head_is_the_identity():
    import open_clip

    import open_clip_po  # noqa: F401
    from open_clip_po.eval.benchmark.models import _match_heads, interpolate_state_dicts
    from open_clip_po.head import attach_linear_head, get_linear_head

    zs = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    ft = {"w": torch.tensor([3.0, -2.0]), "steps": torch.tensor([5])}
    mixed = interpolate_state_dicts(zs, ft, 0.25)
    assert torch.allclose(mixed["w"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2]))
    assert mixed["steps"].item() == 5  # integers come from the fine-tuned model
    a, b = open_clip.create_model("po-tiny"), open_clip.create_model("po-tiny")
    weight = torch.randn(32, 32)
    attach_linear_head(b, weight, "image")
    _match_heads(a, b)
    assert torch.equal(get_linear_head(a).weight, torch.eye(32)) and get_linear_head(a).towers == "image"
    assert set(a.state_dict()) == set(b.state_dict())


def test_wds_split_gives_every_sample_to_exactly_one_slot(tmp_path):
    """Ranks × DataLoader workers partition the stream; a corrupt image is counted, not dropped."""
    from open_clip_po.eval.benchmark.samples import Prepare, WdsSamples, collate

    folder = tmp_path / "wds_x"
    n = write_wds_set(folder, ["a", "b", "c"], per_class=5, shards=3)
    urls = [str(folder / "test" / f"{i}.tar") for i in range(3)]
    with tarfile.open(folder / "test" / "3.tar", "w") as tar:  # a fourth shard with one corrupt image
        for name, data in (("bad.png", b"not an image"), ("bad.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    urls.append(str(folder / "test" / "3.tar"))
    prepare = Prepare(lambda im: torch.zeros(1), ["clean"])
    for world, workers in ((1, 0), (2, 0), (3, 2), (1, 2)):
        seen, skipped = [], 0
        for rank in range(world):
            loader = torch.utils.data.DataLoader(WdsSamples(urls, prepare, rank, world), batch_size=4,
                                                 num_workers=workers, collate_fn=collate)
            for batch in loader:
                skipped += batch["skipped"]
                seen += batch["index"].tolist() if batch["views"] is not None else []
        assert sorted(seen) == list(range(n)) and skipped == 1, (world, workers)


def test_imagenet100_is_cmc_list_with_clip_benchmark_indices_and_names():
    from clip_benchmark.datasets.builder import all_imagenet_wordnet_ids

    from open_clip_po.data import imagenet100
    from open_clip_po.eval.benchmark import cbench

    wnids = [w for w, _ in imagenet100.CMC_IMAGENET100]
    assert len(set(wnids)) == 100 and wnids[:3] == ["n02869837", "n01749939", "n02488291"]  # CMC's file order
    assert all(all_imagenet_wordnet_ids[i] == w for w, i in imagenet100.CMC_IMAGENET100)
    names = cbench.default_classnames("imagenet1k")
    assert imagenet100.classnames() == [names[all_imagenet_wordnet_ids.index(w)] for w in sorted(wnids)]
    assert len(set(imagenet100.classnames())) == 100  # distinct, as y_w ≠ y_l needs


def test_imagenet100_subset_feeds_the_triplet_builder(tmp_path):
    from open_clip_po.data import imagenet100
    from open_clip_po.data.typographic import build_typographic

    write_imagenet_val(tmp_path, imagenet100.WNIDS)
    subset = tmp_path / "in100"
    assert imagenet100.main(["--imagenet", str(tmp_path / "imagenet" / "val"), "--out", str(subset)]) == 0
    assert sorted(p.name for p in subset.iterdir() if p.is_dir()) == list(imagenet100.WNIDS)  # the 2 extras left out
    assert (subset / "classnames.txt").read_text().splitlines() == imagenet100.classnames()
    sizes = build_typographic(subset, tmp_path / "triplets", image_size=32, classnames=subset / "classnames.txt",
                              quiet=True)
    assert sum(v for k, v in sizes.items() if k.startswith("pref")) == 100
    with tarfile.open(tmp_path / "triplets" / "pref-000000.tar") as tar:
        captions = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith("yw.txt")}
    assert {c.removeprefix("a photo of a ").rstrip(".") for c in captions.values()} == set(imagenet100.classnames())


def test_clip_benchmark_accuracy_trap_and_the_work_around():
    """CLIP_benchmark 1.6.2's accuracy() calls float() on a one-element array, which numpy 2 refuses; ours gives
    its numbers. If this starts passing upstream, the work-around in cbench can go."""
    import numpy as np
    from clip_benchmark.metrics import zeroshot_classification as zsc

    from open_clip_po.eval.benchmark.cbench import accuracy

    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5], [0.3, 0.2, 0.5]])
    target = torch.tensor([1, 1, 2, 1])  # top-1 right for rows 0 and 2, top-2 also for row 1
    assert accuracy(logits, target, topk=(1, 2)) == [2 / 4, 3 / 4]
    if int(np.__version__.split(".")[0]) >= 2:
        with pytest.raises(TypeError):
            zsc.accuracy(logits, target, topk=(1,))


def test_missing_requests_or_clip_benchmark_is_one_line_saying_what_to_install(monkeypatch):
    from open_clip_po.eval.benchmark import cbench
    from open_clip_po.eval.errors import EvalError

    monkeypatch.setitem(sys.modules, "requests", None)  # clip_benchmark imports it without declaring it
    with pytest.raises(EvalError, match=r"needs the 'requests' package: pip install -e '\.\[benchmark\]'"):
        cbench.modules()
    monkeypatch.delitem(sys.modules, "requests")
    monkeypatch.setitem(sys.modules, "clip_benchmark.datasets", None)
    with pytest.raises(EvalError, match=r"needs clip_benchmark .*pip install -e '\.\[benchmark\]'"):
        cbench.modules()


def test_dataset_names_groups_and_roots():
    from open_clip_po.eval.benchmark.catalog import CATALOG, parse_datasets, to_clip_benchmark_template, wds_root
    from open_clip_po.eval.errors import EvalError

    assert [s.key for s in parse_datasets("table1,imagenet100,pets")] == [
        "caltech101", "pets", "cars", "flowers", "fgvc_aircraft", "dtd", "sun397", "eurosat", "imagenet100"]
    assert wds_root("/d", CATALOG["pets"]) == Path("/d/wds_vtab-pets")
    assert wds_root("/d/wds_{dataset_cleaned}", CATALOG["pets"]) == Path("/d/wds_vtab-pets")  # CLIP_benchmark's
    assert to_clip_benchmark_template("a photo of a {}.") == "a photo of a {c}."
    assert CATALOG["eurosat"].defense_prefix_templates() == ["a centered satellite photo of a {c}."]
    with pytest.raises(EvalError):
        to_clip_benchmark_template("no class here")


def test_defense_prefix_templates_and_classname_override(bench, tmp_path):
    out = tmp_path / "out"
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"wds/vtab/dtd": ["stripes", "blots", "braids", "bubbles"]}))
    assert _in_process(["--model", "po-tiny", "--pretrained", bench["ckpt"][0], "--datasets", "pets,dtd",
                        "--dataset-root", str(bench["data"]), "--templates", "defense-prefix", "--classnames",
                        str(names), "--output", str(out), "--workers", "0"]) == 0
    datasets = _results(out)["datasets"]
    assert datasets["pets"]["templates"] == ["a photo of a {c}, a type of pet."]
    assert datasets["dtd"]["templates"] == ["{c} texture."]
    assert datasets["dtd"]["classnames"] == ["stripes", "blots", "braids", "bubbles"]
