"""The data sets of the paper's Tables 1 and 2: their names, where they live under ``--dataset-root``, and how to
fetch one that is missing.

Table 1 sets (original O and a typographic copy T) are read through CLIP_benchmark: its webdataset layout
``ROOT/wds_<name with / as ->/<split>/{0..n}.tar`` (what ``huggingface-cli download clip-benchmark/wds_<...>``
writes; a ``ROOT`` holding ``{dataset}`` or ``{dataset_cleaned}`` is filled in as CLIP_benchmark's own
``--dataset_root`` is), else its torchvision-backed builder on ``ROOT/<key>`` with ``download=False``. ImageNet-100
comes from an ImageNet split folder or CLIP_benchmark's ``imagenet1k`` shards filtered to the 100 classes. Table 2
sets are the three released real typographic sets (``real_typographic``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import EvalError
from ..templates import TEMPLATE_FAMILIES

SYNTHETIC, REAL = "synthetic", "real"  # Table 1 (O and T) / Table 2 (real typographic images only)


@dataclass(frozen=True)
class BenchmarkSet:
    key: str                      # the name on the command line
    title: str                    # the column title, as in the paper's tables
    kind: str                     # SYNTHETIC or REAL
    wds: str | None = None        # CLIP_benchmark webdataset name (``wds/<wds>``)
    torchvision: str | None = None  # CLIP_benchmark's torchvision-backed name
    dp_family: str = "generic"    # Defense-Prefix's template family (open_clip_po.eval.templates)
    fetch: str = ""               # real sets: where the released archive is

    @property
    def wds_folder(self) -> str:
        return "wds_" + self.wds.replace("/", "-")

    @property
    def copy_folder(self) -> str:
        """Folder name of the set's typographic copy (``--save-typographic``): its wds folder, except that
        ImageNet-100's copy holds the 100 classes (labels 0..99) as ``wds_imagenet100``."""
        return "wds_imagenet100" if self.key == "imagenet100" else self.wds_folder

    def defense_prefix_templates(self) -> list[str]:
        return [to_clip_benchmark_template(t) for t in TEMPLATE_FAMILIES[self.dp_family]]


CATALOG = {s.key: s for s in (
    BenchmarkSet("caltech101", "Caltech101", SYNTHETIC, "vtab/caltech101", "caltech101"),
    BenchmarkSet("pets", "OxfordPets", SYNTHETIC, "vtab/pets", "pets", "pets"),
    BenchmarkSet("cars", "StanfordCars", SYNTHETIC, "cars", "cars"),
    BenchmarkSet("flowers", "Flowers102", SYNTHETIC, "vtab/flowers", "flowers", "flowers"),
    BenchmarkSet("fgvc_aircraft", "FGVCAircraft", SYNTHETIC, "fgvc_aircraft", "fgvc_aircraft", "aircraft"),
    BenchmarkSet("dtd", "DTD", SYNTHETIC, "vtab/dtd", "dtd", "dtd"),
    BenchmarkSet("sun397", "SUN397", SYNTHETIC, "sun397", "sun397"),
    BenchmarkSet("eurosat", "EuroSAT", SYNTHETIC, "vtab/eurosat", "eurosat", "eurosat"),
    BenchmarkSet("imagenet100", "ImageNet-100", SYNTHETIC, "imagenet1k"),
    BenchmarkSet("food101", "Food101", SYNTHETIC, "food101", "food101", "food"),
    BenchmarkSet("materzynska", "Materzynska", REAL, fetch="the dataset of Materzynska et al. (Google Drive folder "
                 "linked from github.com/joaanna/disentangling_spelling_in_clip)"),
    BenchmarkSet("paint", "PAINT", REAL, fetch="typographic_attack_data.zip of github.com/mlfoundations/patching"),
    BenchmarkSet("rta100", "RTA-100", REAL, fetch="rta100.zip of github.com/azuma164/Defense-Prefix"),
)}
GROUPS = {
    "table1": ("caltech101", "pets", "cars", "flowers", "fgvc_aircraft", "dtd", "sun397", "eurosat"),
    "table2": ("materzynska", "paint", "rta100"),
}


def to_clip_benchmark_template(template: str) -> str:
    """``"a photo of a {}."`` → ``"a photo of a {c}."``: CLIP_benchmark's templates name the class ``{c}``."""
    if template.count("{c}") == 1 and "{}" not in template:
        return template
    if template.count("{}") == 1 and "{c}" not in template:
        return template.replace("{}", "{c}")
    raise EvalError(f"template {template!r} must contain the class name once, as {{}} or {{c}}")


def parse_datasets(text: str) -> list[BenchmarkSet]:
    """``"table1,imagenet100"`` → the sets in that order (groups expanded, duplicates dropped)."""
    keys: list[str] = []
    for name in (part.strip() for part in text.split(",")):
        if not name:
            continue
        expanded = GROUPS.get(name, (name,))
        for key in expanded:
            if key not in CATALOG:
                raise EvalError(f"unknown data set {key!r}; choose from {', '.join(CATALOG)} or "
                                f"{', '.join(GROUPS)}")
            if key not in keys:
                keys.append(key)
    if not keys:
        raise EvalError("--datasets names no data set")
    return [CATALOG[k] for k in keys]


def _fill(root: str, name: str) -> str:
    return root.format(dataset=name, dataset_cleaned=name.replace("/", "-"))


def wds_root(root: str, spec: BenchmarkSet) -> Path:
    """Where the set's CLIP_benchmark webdataset folder is expected."""
    if "{" in root:
        return Path(_fill(root, spec.wds))
    return Path(root) / spec.wds_folder


def torchvision_root(root: str, spec: BenchmarkSet) -> Path:
    return Path(_fill(root, spec.key)) if "{" in root else Path(root) / spec.key


def imagenet_split_dirs(root: str, split: str) -> list[Path]:
    """ImageNet-style folders for ImageNet-100, in the order they are tried."""
    folder = "val" if split == "test" else split
    base = Path(_fill(root, "imagenet100")) if "{" in root else Path(root)
    return [base / "imagenet100" / folder, base / "imagenet" / folder]


def has_wds_split(folder: Path, split: str) -> bool:
    return (folder / split / "nshards.txt").is_file()


def fetch_hint(spec: BenchmarkSet, root: str) -> str:
    """How to get the set onto disk on a machine with a network (one clause)."""
    if spec.kind == REAL:
        return f"unpack {spec.fetch} into {Path(root) / spec.key}"
    target = wds_root(root, spec)
    command = (f"huggingface-cli download clip-benchmark/{spec.wds_folder} --repo-type dataset "
               f"--local-dir {target}")
    if spec.key == "imagenet100":
        return f"{command}, or put ImageNet's val split in {imagenet_split_dirs(root, 'test')[1]}/<WordNet id>/"
    return command


def missing_message(spec: BenchmarkSet, root: str, split: str, looked: list[Path]) -> str:
    tried = ", ".join(str(p) for p in looked)
    what = "not found" if spec.kind == REAL else f"no {split} split found"
    return f"{spec.key}: {what} (looked for {tried}); on a machine with a network: {fetch_hint(spec, root)}"


def existing_dir(path: Path) -> bool:
    return path.is_dir() and any(os.scandir(path))
