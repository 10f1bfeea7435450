"""The objective registry: decorator registration, wildcards, entry points next to the built-ins, and the
open_clip.losses group of pyproject.toml."""
import tomllib
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

from open_clip_po import losses as L
from open_clip_po.losses import registry

TRL_LOSS_TYPES = {"sigmoid", "robust", "exo_pair", "hinge", "ipo", "bco_pair", "sppo_hard", "nca_pair", "aot_pair",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def with_entry_points(monkeypatch, *extra: EntryPoint, keep_installed=True):
    real = registry.entry_points

    def patched(group):
        return (list(real(group=group)) if keep_installed else []) + [ep for ep in extra if ep.group == group]

    monkeypatch.setattr(registry, "entry_points", patched)


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test disappear with it."""
    monkeypatch.setattr(registry, "_BUILTIN", dict(registry._BUILTIN))


def test_builtins_are_listed_without_any_entry_point(monkeypatch):
    with_entry_points(monkeypatch, keep_installed=False)  # a checkout that was never pip-installed
    names = L.list_losses()
    assert TRL_LOSS_TYPES | {"dpo", "kto", "ref_free", "ce", "simpo", "orpo"} <= set(names)
    assert names == sorted(names)
    assert type(L.get_loss("nca_pair")).__name__ == "NCAPairLoss"


def test_every_trl_loss_type_is_a_name():
    for name in TRL_LOSS_TYPES:
        assert L.is_loss(name) and isinstance(L.get_loss(name), L.PreferenceLoss), name
    assert not L.is_loss("no_such_loss")


def test_list_losses_filters_with_wildcards_like_timm():
    assert L.list_losses("apo*") == ["apo_down", "apo_zero"]
    assert L.list_losses(["apo*", "aot"]) == ["aot", "apo_down", "apo_zero"]
    assert L.list_losses("*_pair", exclude_filters="aot*") == ["bco_pair", "exo_pair", "nca_pair"]
    assert L.list_losses("nothing*") == []


def test_decorator_registers_a_class_and_its_aliases(scratch_registry):
    @L.register_loss("squared_test", "sq_test")
    class SquaredLoss(L.PairwiseLoss):
        def __init__(self, beta: float = 1.0, margin: float = 1.0):
            super().__init__(beta)
            self.margin = margin

        def loss_of_ratio(self, h):
            return (self.margin - self.beta * h) ** 2

    assert {"squared_test", "sq_test"} <= set(L.list_losses("sq*"))
    assert L.loss_hparams("sq_test") == {"beta": 1.0, "margin": 1.0}
    h = torch.tensor([0.5, -1.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    out = L.get_loss("squared_test", margin=2.0)(h, zero, zero, zero)
    assert out["loss"].item() == pytest.approx(((2.0 - h) ** 2).mean().item())
    with pytest.raises(TypeError, match="'gamma'"):
        L.get_loss("sq_test", gamma=1.0)


def test_decorator_refuses_a_taken_name_and_a_non_objective(scratch_registry):
    with pytest.raises(ValueError, match="'dpo' is already registered to open_clip_po.losses.dpo:DPOLoss"):
        @L.register_loss("dpo")
        class OtherDPO(L.PairwiseLoss):
            pass
    with pytest.raises(L.LossEntryPointError, match="not name a torch.nn.Module"):
        L.register_loss("not_a_loss")(int)
    with pytest.raises(ValueError, match="identifier"):
        L.register_loss("has space")
    L.register_loss("dpo")(registry._BUILTIN["dpo"])  # re-registering the same class is harmless


def test_third_party_entry_point_is_found_next_to_the_builtins(monkeypatch):
    with_entry_points(monkeypatch, EntryPoint("dpo_alias", "open_clip_po.losses.dpo:DPOLoss", registry.GROUP))
    assert "dpo_alias" in L.list_losses() and "nca_pair" in L.list_losses()
    assert L.is_loss("dpo_alias") and L.list_losses("dpo_*") == ["dpo_alias"]
    assert type(L.get_loss("dpo_alias", beta=0.3)).__name__ == "DPOLoss"


def test_entry_point_repeating_a_builtin_with_the_same_class_is_fine(monkeypatch):
    # an installed copy of an older version of this project declares its built-ins as entry points
    with_entry_points(monkeypatch, EntryPoint("dpo", "open_clip_po.losses.dpo:DPOLoss", registry.GROUP),
                      EntryPoint("ce", "open_clip_po.losses.ce : CELoss", registry.GROUP))
    assert type(L.get_loss("dpo")).__name__ == "DPOLoss" and type(L.get_loss("ce")).__name__ == "CELoss"
    assert L.list_losses().count("dpo") == 1


def test_entry_point_clashing_with_a_builtin_is_a_clear_error(monkeypatch):
    with_entry_points(monkeypatch, EntryPoint("simpo", "their_pkg.losses:SimPO", registry.GROUP))
    with pytest.raises(L.LossEntryPointError,
                       match=r"'simpo' is registered more than once.*open_clip_po.losses.simpo:SimPOLoss from "
                             r"built in; their_pkg.losses:SimPO from an unknown distribution"):
        L.get_loss("simpo")
    assert type(L.get_loss("dpo")).__name__ == "DPOLoss"  # the other names still work


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss 'simpoo'; known: aot, aot_pair, .*simpo, sppo_hard"):
        L.get_loss("simpoo")


def test_pyproject_declares_no_builtin_in_our_group_and_every_builtin_for_open_clip():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = project.get("entry-points", {})
    assert not set(groups.get(registry.GROUP, {})) & set(L.builtin_losses())  # they register themselves
    open_clip_group = groups["open_clip.losses"]
    assert set(open_clip_group) == set(L.builtin_losses())
    from open_clip_po.losses import open_clip_adapter
    for name, target in open_clip_group.items():
        module, _, attr = target.partition(":")
        assert module == "open_clip_po.losses.open_clip_adapter" and attr == name
        built = getattr(open_clip_adapter, attr)()
        assert built.objective_name == name and type(built.objective) is L.get_loss_class(name)
        # open_clip's call, no teacher (uniform reference): a finite loss with a gradient
        g = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=-1)
        loss = built(img, txt, torch.tensor(10.0), output_dict=True)[f"{name}_loss"]
        loss.backward()
        assert torch.isfinite(loss) and img.grad.abs().sum() > 0, name
