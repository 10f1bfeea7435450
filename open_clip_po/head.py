"""The learnable linear head W of paper Sec. 3.4.

One matrix W (D×D, identity at init) acts on the features before L2 normalisation: ``f ↦ W f``
(``features @ W.T``). With W = I the model is the base model, so the reference is simply the same
backbone without W and costs nothing extra. Where W acts is the head's ``towers``:

- ``"both"`` (the paper's head): on the image and the text features, so the similarity is
  ``xᵀ WᵀW y`` — a positive semi-definite form, scaled after training as W_t = U Σ^t Vᵀ. It can weaken or
  erase a concept whose image and caption directions are nearly parallel, but not reverse it: reversing
  needs ``Δxᵀ WᵀW Δy < 0``, impossible when the caption direction Δy is a positive mix of the image
  directions, which is where contrastive pre-training puts it.
- ``"image"``: on the image features only, similarity ``(W x)ᵀ y`` — an indefinite form that can map
  the image direction onto the opposite caption direction.

How W is parameterised is the head's ``param``:

- ``"log"`` (:class:`LogLinearHead`, what ``--po-linear-head`` trains on both towers): ``W = exp(A)``, the matrix
  exponential of a learned generator A (zero at init), and ``W_t = exp(t A)`` — exact and invertible for every t,
  with ``W_0 = I`` the base model and ``W_{-t} = W_t⁻¹``. On both towers A is symmetric, so ``W = V diag(e^λ) Vᵀ`` is
  its own SVD and ``exp(t A) = U Σ^t Vᵀ`` (paper Eq. 16) with log-singular values λ; nothing is lost, since the
  similarities see W only through WᵀW (and any W has the same WᵀW as the symmetric V Σ Vᵀ). On the image tower A
  is a general matrix. Weight decay on A pulls W towards the identity (it penalises ‖log Σ‖²), not towards 0.
- ``"dense"`` (:class:`LinearHead`, the default on the image tower, see :func:`default_param`): W itself is the
  parameter, scaled after training as U Σ^t Vᵀ (both towers) or I + t (W − I) (image tower); see
  ``open_clip_po.surgery.scale_head``.

The head is attached to an open_clip model *instance* as the submodule ``po_head`` and wraps the
instance's ``encode_image``/``encode_text``; ``model.forward`` calls those, so DDP, open_clip's
trainer and zero-shot code all see the head. Checkpoints store W outside the stock ``state_dict``
(see ``open_clip_po.checkpoint``), so a head checkpoint still loads in stock open_clip.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .towers.unwrap import unwrap

HEAD_ATTR = "po_head"  # the submodule's name on the model, and the checkpoint key that stores W
HEAD_PARAM = f"{HEAD_ATTR}.weight"  # a dense W's name in the model's state_dict
TOWERS = ("both", "image")  # where W acts; see the module docstring
PARAMS = ("log", "dense")  # how W is parameterised; see the module docstring


def check_towers(towers: str) -> str:
    if towers not in TOWERS:
        raise ValueError(f"head towers must be one of {', '.join(TOWERS)}, got {towers!r}")
    return towers


def default_param(towers: str) -> str:
    """The parameterisation ``--po-linear-head`` trains when none is given: the log head on both towers (exact U Σ^t Vᵀ
    for every t), the dense head on the image tower (its straight line I + t (W − I) keeps the gender flip, which
    exp(tA) reaches only through a rotation that flips again for t < 0; docs/demo/head.md)."""
    return "log" if check_towers(towers) == "both" else "dense"


def check_param(param: str) -> str:
    if param not in PARAMS:
        raise ValueError(f"head param must be one of {', '.join(PARAMS)}, got {param!r}")
    return param


def generator_of(log: torch.Tensor, towers: str) -> torch.Tensor:
    """The generator A with ``W = exp(A)``: the parameter itself, or its symmetric part on both towers."""
    return (log + log.T) / 2 if towers == "both" else log


@contextmanager
def one_linalg_thread(dim: int):
    """One intra-op thread for a small factorisation (SVD, eigh): it gains nothing from threads, and on a busy
    machine the threaded LAPACK spins (measured here, 512×512 float64 SVD: 0.25 s on one thread, 8–14 s on two)."""
    threads = torch.get_num_threads()
    if dim > 2048 or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exp_head(generator: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """``exp(t A)`` in float64 (a symmetric A by its eigendecomposition: exactly symmetric positive definite);
    exactly the identity at t = 0, so that W_0 is the base model to the last bit."""
    A = generator.detach().to(torch.float64) * float(t)
    if not bool(A.any()):
        return torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    with one_linalg_thread(A.shape[0]):
        if torch.equal(A, A.T):
            eigenvalues, eigenvectors = torch.linalg.eigh(A)
            return (eigenvectors * eigenvalues.exp()) @ eigenvectors.T
        return torch.linalg.matrix_exp(A)


class LinearHead(nn.Module):
    """A dense head: W is the parameter (``param = "dense"``). Subclasses parameterise W otherwise and expose it
    as ``weight`` all the same."""

    param = "dense"

    def __init__(self, dim: int, weight: torch.Tensor | None = None, towers: str = "both"):
        super().__init__()
        self.towers, self.dim = check_towers(towers), dim
        self.weight = nn.Parameter(_square(dim, weight, torch.eye(dim), "linear head"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.weight.to(features.dtype))

    def text(self, features: torch.Tensor) -> torch.Tensor:
        """W on text features when the head acts on both towers; else the features as they are."""
        return self(features) if self.towers == "both" else features

    def reversed_weight(self) -> torch.Tensor:
        """W_{−1}, the head turned around, differentiable in its parameter: on the image tower the straight line's
        2I − W; on both towers U Σ⁻¹ Vᵀ = W⁻ᵀ (which explodes as W nears singular — the log head's does not)."""
        if self.towers == "image":
            return 2 * torch.eye(self.dim, dtype=self.weight.dtype, device=self.weight.device) - self.weight
        return torch.linalg.inv(self.weight.float()).T

    def extra_repr(self) -> str:
        return f"dim={self.dim}, towers={self.towers}, param={self.param}"


class LogLinearHead(LinearHead):
    """``W = exp(A)`` with the generator A the parameter (``param = "log"``); see the module docstring."""

    param = "log"

    def __init__(self, dim: int, log: torch.Tensor | None = None, towers: str = "both"):
        nn.Module.__init__(self)  # not LinearHead's: W is no parameter here
        self.towers, self.dim = check_towers(towers), dim
        self.log = nn.Parameter(_square(dim, log, torch.zeros(dim, dim), "linear head generator"))

    @property
    def generator(self) -> torch.Tensor:
        return generator_of(self.log, self.towers)

    @property
    def weight(self) -> torch.Tensor:
        """W = exp(A), differentiable in A; computed in A's dtype, at least float32."""
        return self.scaled(1.0)

    def reversed_weight(self) -> torch.Tensor:
        return self.scaled(-1.0)

    def scaled(self, t: float) -> torch.Tensor:
        """W_t = exp(t A), differentiable in A (t = −1: the reversed head W⁻¹)."""
        generator = self.generator
        if generator.dtype in (torch.float16, torch.bfloat16):
            generator = generator.float()
        return torch.linalg.matrix_exp(float(t) * generator)


def _square(dim: int, value: torch.Tensor | None, default: torch.Tensor, what: str) -> torch.Tensor:
    init = default if value is None else value.detach().clone().float()
    if init.shape != (dim, dim):
        raise ValueError(f"{what} must be {dim}x{dim}, got {tuple(init.shape)}")
    return init


def embed_dim_of(model: nn.Module) -> int:
    """Output feature dimension of an open_clip model (CLIP or CustomTextCLIP)."""
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, nn.Parameter):
        return text_projection.shape[1]
    if isinstance(text_projection, nn.Linear):
        return text_projection.out_features
    visual = getattr(model, "visual", None)
    if visual is not None and getattr(visual, "output_dim", None):
        return int(visual.output_dim)
    raise ValueError(f"cannot tell the embedding dimension of {type(model).__name__}")


def has_linear_head(model: nn.Module) -> bool:
    return isinstance(getattr(unwrap(model), HEAD_ATTR, None), LinearHead)


def get_linear_head(model: nn.Module) -> LinearHead:
    head = getattr(unwrap(model), HEAD_ATTR, None)
    if not isinstance(head, LinearHead):
        raise ValueError("model has no linear head (attach one with attach_linear_head)")
    return head


def generator_of_head(head: LinearHead) -> torch.Tensor | None:
    """A log-parameterised head's generator A (W = exp(A)), detached; None for a dense head."""
    return head.generator.detach() if isinstance(head, LogLinearHead) else None


def attach_linear_head(model: nn.Module, weight: torch.Tensor | None = None, towers: str = "both", *,
                       param: str = "dense", log: torch.Tensor | None = None) -> LinearHead:
    """Give ``model`` a head acting on ``towers``; returns it. ``param="dense"``: W = ``weight`` (identity if None);
    ``param="log"``: W = exp(``log``) (zero, i.e. W = I, if None). Passing ``log`` implies ``param="log"``."""
    model = unwrap(model)
    if has_linear_head(model):
        raise ValueError("model already has a linear head")
    param = "log" if log is not None else check_param(param)
    if param == "log" and weight is not None:
        raise ValueError("a log-parameterised head is given by its generator (log=), not by weight=")
    dim = embed_dim_of(model)
    head = LogLinearHead(dim, log, towers) if param == "log" else LinearHead(dim, weight, towers)
    head = head.to(next(model.parameters()).device)
    setattr(model, HEAD_ATTR, head)
    # Keep the un-headed encoders reachable: they are the reference in linear-head mode. The wrappers reach them
    # through the instance, not a closure, so that a deep copy of the model runs its own backbone.
    model.encode_image_base, model.encode_text_base = model.encode_image, model.encode_text

    def encode_image(self, image, normalize: bool = False):
        features = getattr(self, HEAD_ATTR)(self.encode_image_base(image, normalize=False))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize: bool = False):
        features = getattr(self, HEAD_ATTR).text(self.encode_text_base(text, normalize=False))
        return F.normalize(features, dim=-1) if normalize else features

    model.encode_image = types.MethodType(encode_image, model)
    model.encode_text = types.MethodType(encode_text, model)
    return head
