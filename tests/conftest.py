import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Under pytest-xdist the workers share the cores: each worker's torch, and the processes its tests launch, get an
# equal share of threads, so workers do not oversubscribe the machine (set before any test module imports torch).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


@pytest.fixture(scope="session")
def tiny_model_and_transforms():
    """A po-tiny CLIP built offline (random weights), its train/val transforms and tokenizer."""
    import torch
    import open_clip
    import open_clip_po  # noqa: F401  (registers po-tiny)

    torch.manual_seed(0)
    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms("po-tiny", output_dict=True)
    tokenizer = open_clip.get_tokenizer("po-tiny")
    return model.eval(), preprocess_train, preprocess_val, tokenizer


@pytest.fixture
def tiny_model(tiny_model_and_transforms):
    import copy

    return copy.deepcopy(tiny_model_and_transforms[0])
