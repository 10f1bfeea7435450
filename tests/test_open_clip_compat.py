"""Our shards work with stock open_clip's own loader (why webdataset is pinned below 0.2.96)."""
import types

import pytest
from PIL import Image

import open_clip
import open_clip_po  # noqa: F401
from open_clip_train.data import get_wds_dataset

from open_clip_po.data.pairs import build_pairs
from open_clip_po.data.typographic import build_typographic


@pytest.fixture
def class_folder(tmp_path):
    for colour in ("red", "blue", "green"):
        (tmp_path / "imgs" / colour).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (80, 64), colour).save(tmp_path / "imgs" / colour / f"{i}.png")
    return tmp_path / "imgs"


def read_with_open_clip(url, n):
    args = types.SimpleNamespace(train_data=url, val_data=None, train_num_samples=n, val_num_samples=None,
                                 dataset_resampled=False, train_data_upsampling_factors=None, seed=0, batch_size=1,
                                 workers=1, world_size=1, rank=0, distributed=False)
    _, _, preprocess = open_clip.create_model_and_transforms("po-tiny")
    tokenizer = open_clip.get_tokenizer("po-tiny")
    # the training loader is the one that breaks on webdataset >= 0.2.96 (KeyError 'fname')
    data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    captions = []
    for images, texts in data.dataloader:
        assert images.shape[1:] == (3, 64, 64)
        captions.append(texts[0])
    return captions


def test_stock_open_clip_reads_pairs_shards(class_folder, tmp_path):
    build_pairs(class_folder, tmp_path / "pairs", quiet=True)
    captions = read_with_open_clip(str(tmp_path / "pairs" / "pairs-000000.tar"), 12)
    assert len(captions) == 12


def test_stock_open_clip_reads_triplet_shards_as_pairs_of_x_and_y_w(class_folder, tmp_path):
    build_typographic(class_folder, tmp_path / "typo", image_size=64, quiet=True)
    captions = read_with_open_clip(str(tmp_path / "typo" / "pref-000000.tar"), 12)
    tokenizer = open_clip.get_tokenizer("po-tiny")
    prompts = {tuple(tokenizer([f"a photo of a {c}."])[0].tolist()) for c in ("red", "blue", "green")}
    assert len(captions) == 12 and all(tuple(c.tolist()) in prompts for c in captions)  # KEY.txt = y_w
