"""ImageNet-100: the 100-class ImageNet subset the paper trains on, and a class-folder view of it.

    python -m open_clip_po.data.imagenet100 --imagenet /data/imagenet/train --out data/imagenet100/train

The classes are the standard list of Tian, Krishnan & Isola, "Contrastive Multiview Coding" (ECCV 2020), file
``imagenet100.txt`` of https://github.com/HobbitLong/CMC, copied below in its order together with each WordNet id's
index among the 1000 sorted ImageNet-1k ids (the label of CLIP_benchmark's ``imagenet1k`` and torchvision's
``ImageNet``). Labels 0..99 follow the sorted WordNet ids, as an ImageNet-style class folder sorts them; class
names are OpenAI's CLIP ImageNet names (``open_clip.IMAGENET_CLASSNAMES``, the same list as CLIP_benchmark's
``imagenet1k`` class names).

The command makes ``--out`` a folder of the 100 class folders of an ImageNet split (symbolic links, nothing is
copied) plus ``classnames.txt``, which the typographic triplet builder reads as it is::

    python -m open_clip_po.data.typographic --images data/imagenet100/train \\
        --classnames data/imagenet100/train/classnames.txt --out data/typographic
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .classnames import CLASSNAMES_FILE
from .errors import DataError
from .image_files import IMAGE_EXTENSIONS

# (WordNet id, index among the sorted ImageNet-1k ids), in the order of CMC's imagenet100.txt.
CMC_IMAGENET100 = (
    ("n02869837", 452), ("n01749939", 64), ("n02488291", 374), ("n02107142", 236), ("n13037406", 993),
    ("n02091831", 176), ("n04517823", 882), ("n04589890", 904), ("n03062245", 503), ("n01773797", 74),
    ("n01735189", 57), ("n07831146", 959), ("n07753275", 953), ("n03085013", 508), ("n04485082", 872),
    ("n02105505", 228), ("n01983481", 122), ("n02788148", 421), ("n03530642", 599), ("n04435653", 858),
    ("n02086910", 157), ("n02859443", 449), ("n13040303", 994), ("n03594734", 608), ("n02085620", 151),
    ("n02099849", 209), ("n01558993", 15), ("n04493381", 876), ("n02109047", 246), ("n04111531", 766),
    ("n02877765", 455), ("n04429376", 857), ("n02009229", 131), ("n01978455", 119), ("n02106550", 234),
    ("n01820546", 90), ("n01692333", 45), ("n07714571", 936), ("n02974003", 479), ("n02114855", 272),
    ("n03785016", 665), ("n03764736", 653), ("n03775546", 659), ("n02087046", 158), ("n07836838", 960),
    ("n04099969", 765), ("n04592741", 908), ("n03891251", 703), ("n02701002", 407), ("n03379051", 560),
    ("n02259212", 317), ("n07715103", 938), ("n03947888", 724), ("n04026417", 748), ("n02326432", 331),
    ("n03637318", 619), ("n01980166", 120), ("n02113799", 267), ("n02086240", 155), ("n03903868", 708),
    ("n02483362", 368), ("n04127249", 772), ("n02089973", 167), ("n03017168", 494), ("n02093428", 180),
    ("n02804414", 431), ("n02396427", 342), ("n04418357", 854), ("n02172182", 305), ("n01729322", 54),
    ("n02113978", 268), ("n03787032", 667), ("n02089867", 166), ("n02119022", 277), ("n03777754", 662),
    ("n04238763", 798), ("n02231487", 313), ("n03032252", 498), ("n02138441", 299), ("n02104029", 222),
    ("n03837869", 682), ("n03494278", 593), ("n04136333", 775), ("n03794056", 674), ("n03492542", 592),
    ("n02018207", 137), ("n04067472", 758), ("n03930630", 717), ("n03584829", 606), ("n02123045", 281),
    ("n04229816", 796), ("n02100583", 211), ("n03642806", 620), ("n04336792", 830), ("n03259280", 544),
    ("n02116738", 275), ("n02108089", 242), ("n03424325", 570), ("n01855672", 99), ("n02090622", 169),
)
WNIDS = tuple(sorted(wnid for wnid, _ in CMC_IMAGENET100))  # label order
IMAGENET1K_INDEX = dict(CMC_IMAGENET100)
# ImageNet-1k label → ImageNet-100 label, for reading a 1000-class source (CLIP_benchmark's wds/imagenet1k).
LABEL_OF_IMAGENET1K = {IMAGENET1K_INDEX[wnid]: label for label, wnid in enumerate(WNIDS)}


def classnames() -> list[str]:
    """The 100 class names in label order."""
    from open_clip import IMAGENET_CLASSNAMES  # open_clip is heavy to import; only the names need it

    return [IMAGENET_CLASSNAMES[IMAGENET1K_INDEX[wnid]] for wnid in WNIDS]


def _image_files(folder: Path) -> list[Path]:
    suffixes = {"." + ext for ext in IMAGE_EXTENSIONS}
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes and p.is_file())


def scan_imagenet100(split_dir: str | os.PathLike) -> list[tuple[Path, int]]:
    """``[(image path, label)]`` of the 100 classes in an ImageNet-style split folder (``<wnid>/<image>``).

    The folder may hold all 1000 classes (the others are left out) or just the 100; every one of the 100 must be
    there and hold images.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise DataError(f"ImageNet split folder not found: {root} (expected {root}/<WordNet id>/<image>)")
    missing = [wnid for wnid in WNIDS if not (root / wnid).is_dir()]
    if missing:
        raise DataError(f"{root} lacks {len(missing)} of the 100 ImageNet-100 class folders, e.g. {missing[0]} "
                        f"(expected an ImageNet split: {root}/<WordNet id>/<image>)")
    items = []
    for label, wnid in enumerate(WNIDS):
        files = _image_files(root / wnid)
        if not files:
            raise DataError(f"ImageNet-100 class folder {root / wnid} holds no images")
        items.extend((path, label) for path in files)
    return items


def make_subset(imagenet_split: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``out/<wnid>`` → ``imagenet_split/<wnid>`` for the 100 classes, and ``out/classnames.txt``."""
    from ._build import write_lines

    source, out = Path(imagenet_split).resolve(), Path(out)
    scan_imagenet100(source)  # every class present, with images
    out.mkdir(parents=True, exist_ok=True)
    for wnid in WNIDS:
        link = out / wnid
        if link.is_symlink() and Path(os.readlink(link)) == source / wnid:
            continue
        if link.exists() or link.is_symlink():
            raise DataError(f"{link} exists and is not a link to {source / wnid}; choose an empty --out")
        link.symlink_to(source / wnid, target_is_directory=True)
    write_lines(out / CLASSNAMES_FILE, classnames())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m open_clip_po.data.imagenet100", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imagenet", required=True, help="an ImageNet split folder: DIR/<WordNet id>/<image>")
    parser.add_argument("--out", required=True, help="folder for the 100 class-folder links and classnames.txt")
    args = parser.parse_args(argv)
    try:
        out = make_subset(args.imagenet, args.out)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"ImageNet-100: 100 class folders and {CLASSNAMES_FILE} in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
