"""Two gloo processes on shards of a batch give the loss and gradients of one process on the whole batch."""
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp

WORLD, B, D, CLASSES = 2, 3, 8, 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def global_batch():
    """The concatenated batch (N = WORLD·B rows), identical in every process."""
    g = torch.Generator().manual_seed(1234)

    def unit(*shape):
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        return x / x.norm(dim=-1, keepdim=True)

    n = WORLD * B
    return {
        "img": unit(n, D), "tw": unit(n, D), "tl": unit(n, D),
        "ref_img": unit(n, D), "ref_tw": unit(n, D), "ref_tl": unit(n, D),
        "prompts": unit(CLASSES, D), "ref_prompts": unit(CLASSES, D),
        "ci": torch.randint(0, CLASSES, (n,), generator=g), "ri": torch.randint(0, CLASSES, (n,), generator=g),
        "reg_img": unit(n, D), "reg_txt": unit(n, D), "ref_reg_img": unit(n, D), "ref_reg_txt": unit(n, D),
    }


def objectives(batch, gather: bool) -> dict:
    """Every objective, the regulariser in both directions and both candidate sets; loss and gradients.

    ``batch`` holds this process's rows (a shard under gloo, everything in one process); leaves that
    carry gradient: policy image/caption features, the class prompts and the logit scale.
    """
    from open_clip_po import losses as L

    leaves = {k: batch[k].clone().requires_grad_() for k in ("img", "tw", "tl", "prompts", "reg_img", "reg_txt")}
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    leaves["scale"] = scale
    pc, pr, pm = L.pair_logps(leaves["img"], leaves["tw"], leaves["tl"], scale, gather=gather)
    rc, rr, rm = L.pair_logps(batch["ref_img"], batch["ref_tw"], batch["ref_tl"], 8.0, gather=gather)
    fixed = dict(candidates=leaves["prompts"], chosen_index=batch["ci"], rejected_index=batch["ri"], gather=gather)
    ref_fixed = dict(fixed, candidates=batch["ref_prompts"])
    fpc, fpr, fpm = L.pair_logps(leaves["img"], None, None, scale, **fixed)
    frc, frr, frm = L.pair_logps(batch["ref_img"], None, None, 8.0, **ref_fixed)

    values = {}
    for name in sorted(set(L.builtin_losses()) - {"kto"}):  # KTO: below, with each reference point
        values[name] = L.get_loss(name)(pc, pr, rc, rr)["loss"]
        values[name + "/classes"] = L.get_loss(name)(fpc, fpr, frc, frr)["loss"]
    kto = L.get_loss("kto")
    pkl, rkl = L.kto_kl_logps(pm, rm)
    values["kto/mismatched"] = kto(pc, pr, rc, rr, policy_kl_logps=pkl, ref_kl_logps=rkl)["loss"]
    values["kto/exact"] = kto(pc, pr, rc, rr, kl=L.kto_reference_point_exact(pm, rm))["loss"]
    fpkl, frkl = L.kto_kl_logps(fpm, frm, chosen_index=L.gather_features(batch["ci"]) if gather else batch["ci"])
    values["kto/classes"] = kto(fpc, fpr, frc, frr, policy_kl_logps=fpkl, ref_kl_logps=frkl)["loss"]
    # local rows, fixed candidates, no gather: only z crosses ranks (TRL's gathered mean), so the mean of
    # the ranks' losses is the one-process loss and each rank's gradient is WORLD times its slice
    lpc, lpr, lpm = L.pair_logps(leaves["img"], None, None, scale, **dict(fixed, gather=False))
    lrc, lrr, lrm = L.pair_logps(batch["ref_img"], None, None, 8.0, **dict(ref_fixed, gather=False))
    values["kto/classes/local"] = kto(lpc, lpr, lrc, lrr, kl=L.kto_reference_point_exact(lpm, lrm))["loss"]
    for direction in ("forward", "reverse"):
        values["kl/" + direction] = L.kl_regulariser(leaves["reg_img"], leaves["reg_txt"], batch["ref_reg_img"],
                                                     batch["ref_reg_txt"], scale, 8.0, direction, gather=gather)

    out = {}
    for name, value in values.items():
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, retain_graph=True)
        out[name] = {"loss": value.detach()}
        out[name].update({k: (torch.zeros_like(v) if g is None else g) for (k, v), g in zip(leaves.items(), grads)})
    return out


def worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        full = global_batch()
        shard = {k: (v if k in ("prompts", "ref_prompts") else v[rank * B:(rank + 1) * B]) for k, v in full.items()}
        torch.save(objectives(shard, gather=True), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_world(out_dir, timeout=180.0):
    ctx = mp.start_processes(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"gloo workers did not finish within {timeout:.0f} s")


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    run_world(tmp_path)
    single = objectives(global_batch(), gather=False)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    shared = ("prompts", "scale")  # same tensor on every rank: each rank's gradient is the full one
    local = single.pop("kto/classes/local")
    assert torch.allclose(sum(r["kto/classes/local"]["loss"] for r in ranks) / WORLD, local["loss"], rtol=1e-12)
    for rank, got in enumerate(ranks):
        want = local["img"][rank * B:(rank + 1) * B] * WORLD
        assert torch.allclose(got["kto/classes/local"]["img"], want, rtol=1e-10, atol=1e-13), rank
    assert torch.allclose(sum(r["kto/classes/local"]["prompts"] for r in ranks) / WORLD, local["prompts"],
                          rtol=1e-10, atol=1e-13)
    for name, expected in single.items():
        for rank, got in enumerate(ranks):
            assert torch.allclose(got[name]["loss"], expected["loss"], rtol=1e-12, atol=1e-14), (name, rank)
            for key, grad in expected.items():
                if key == "loss":
                    continue
                want = grad if key in shared else grad[rank * B:(rank + 1) * B]
                assert torch.allclose(got[name][key], want, rtol=1e-10, atol=1e-13), (name, key, rank)
    # the comparison has teeth: the local shards receive non-zero gradients
    assert ranks[1]["kto/mismatched"]["tw"].abs().sum() > 0 and ranks[0]["kl/forward"]["reg_txt"].abs().sum() > 0


# ---------------------------------------------------------------- BCO's running baseline across ranks

BCO_STEPS, BCO_BETA = 3, 0.7


def bco_local_batch(rank: int, step: int):
    """Different log-probs on every rank and step (no gather: each rank sees its own batch)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(B, generator=g, dtype=torch.float64) - 2.0 - rank for _ in range(4)]


def bco_worker(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    from open_clip_po import losses as L

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        loss = L.get_loss("bco_pair", beta=BCO_BETA)
        steps = [loss(*bco_local_batch(rank, step)) for step in range(BCO_STEPS)]
        torch.save({"delta": torch.stack([s["delta"] for s in steps]), "loss": torch.stack([s["loss"] for s in steps]),
                    "state": loss.state_dict()}, f"{out_dir}/bco{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_bco_baseline_is_pooled_over_ranks_like_trl_running_moments(tmp_path):
    from test_losses_trl import RunningMomentsTRL, trl_losses

    ctx = mp.start_processes(bco_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 180
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("gloo workers did not finish within 180 s")
    ranks = [torch.load(tmp_path / f"bco{r}.pt", weights_only=True) for r in range(WORLD)]
    # TRL: each rank's batch-mean reward is gathered, so one update sees WORLD observations
    running = RunningMomentsTRL()
    for step in range(BCO_STEPS):
        batches = [bco_local_batch(rank, step) for rank in range(WORLD)]
        means = torch.stack([(BCO_BETA * torch.cat([pc - rc, pr - rr])).mean() for pc, pr, rc, rr in batches])
        running.update(means)
        for rank, (pc, pr, rc, rr) in enumerate(batches):
            assert ranks[rank]["delta"][step].item() == pytest.approx(float(running.mean), rel=1e-12)
            want = trl_losses("bco_pair", pc, pr, rc, rr, BCO_BETA, running=_Fixed(running.mean)).mean()
            assert ranks[rank]["loss"][step].item() == pytest.approx(want.item(), rel=1e-12)
    for key in ("running_mean", "running_var", "running_count"):
        assert ranks[0]["state"][key].item() == ranks[1]["state"][key].item()
    assert ranks[0]["state"]["running_count"].item() == pytest.approx(WORLD * BCO_STEPS)


class _Fixed:
    """A RunningMoments stand-in whose update leaves the mean where the pooled update put it."""

    def __init__(self, mean):
        self.mean = mean

    def update(self, _):
        pass
