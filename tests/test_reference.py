"""The frozen reference's text-feature memo: exact, only unseen captions encoded, bounded, autocast-aware."""
import copy

import pytest
import torch

from open_clip_po.reference import TextFeatureCache, make_reference


class CountingEncoder:
    """A deterministic stand-in text encoder that records which rows it was asked to encode."""

    def __init__(self):
        self.rows_seen = []
        self.weight = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def __call__(self, texts):
        self.rows_seen.extend(tuple(r.tolist()) for r in texts)
        return texts.float() @ self.weight


def tokens(*ids):
    return torch.tensor([[i] * 8 for i in ids])


def test_cache_is_exact_and_encodes_each_caption_once():
    enc, cache = CountingEncoder(), TextFeatureCache()
    first = cache.features(tokens(1, 2, 1, 3), enc)
    assert torch.equal(first, tokens(1, 2, 1, 3).float() @ enc.weight)
    assert len(enc.rows_seen) == 4  # the first call encodes what it is given (duplicates are the caller's job)
    second = cache.features(tokens(3, 2, 4), enc)
    assert torch.equal(second, tokens(3, 2, 4).float() @ enc.weight)
    assert enc.rows_seen[4:] == [(4,) * 8]  # only the new caption was encoded
    assert (cache.hits, cache.misses) == (2, 5)  # call 1: 4 unseen rows; call 2: 3 and 2 seen, 4 not
    assert len(cache) == 4


def test_cache_is_bounded_and_forgets_the_least_recently_used():
    enc, cache = CountingEncoder(), TextFeatureCache(max_entries=2)
    cache.features(tokens(1, 2), enc)
    cache.features(tokens(1), enc)        # 1 is now the most recently used
    cache.features(tokens(3), enc)        # evicts 2
    assert len(cache) == 2
    enc.rows_seen.clear()
    cache.features(tokens(1, 2, 3), enc)
    assert enc.rows_seen == [(2,) * 8]
    off = TextFeatureCache(max_entries=0)
    off.features(tokens(1), enc)
    assert len(off) == 0
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        TextFeatureCache(max_entries=-1)


def test_features_made_under_autocast_are_not_reused_without_it():
    enc, cache = CountingEncoder(), TextFeatureCache()
    cache.features(tokens(5), enc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache.features(tokens(5), enc)
    assert len(enc.rows_seen) == 2 and len(cache) == 2


def test_reference_text_features_with_and_without_the_cache_agree(tiny_model, tiny_model_and_transforms):
    _, _, _, tokenizer = tiny_model_and_transforms
    texts = tokenizer(["a photo of a red.", "a photo of a blue.", "a photo of a red."])
    images = torch.randn(2, 3, 64, 64)
    cached, plain = make_reference(copy.deepcopy(tiny_model)), make_reference(copy.deepcopy(tiny_model), text_cache_size=0)
    for _ in range(2):  # the second pass is served from the cache
        a, b = cached.features(images, texts), plain.features(images, texts)
        for x, y in zip(a, b):
            assert torch.allclose(x, y, atol=1e-6)
    assert cached.text_cache.hits >= 3 and len(plain.text_cache) == 0
