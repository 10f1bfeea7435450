"""Everything the GPU benchmark does differently on a CUDA device and on the CPU, in one place: timing,
synchronisation, memory statistics, and the environment of the processes it launches. The rest of
``benchmarks/gpu.py`` runs the same code on both."""
from __future__ import annotations

import gc
import os
import re

import torch
from torch import nn

from _timing import wall_seconds


class Device:
    def __init__(self, name: str):
        self.torch = torch.device(name)
        self.is_cuda = self.torch.type == "cuda"
        if self.torch.type not in ("cuda", "cpu"):
            raise SystemExit(f"gpu.py: error: --device {name}: only cuda[:N] and cpu are supported")
        if self.is_cuda:
            if not torch.cuda.is_available():
                raise SystemExit("gpu.py: error: torch sees no CUDA device (for the CPU smoke run: --device cpu "
                                 "--quick)")
            if self.torch.index is None:
                self.torch = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.torch)
            # as open_clip_train.main sets them for every CUDA run
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
            torch.backends.cudnn.deterministic = False

    @property
    def label(self) -> str:
        return "cuda" if self.is_cuda else "cpu"

    def describe(self) -> str:
        if not self.is_cuda:
            return f"CPU ({torch.get_num_threads()} torch threads)"
        p = torch.cuda.get_device_properties(self.torch)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}, "
                f"CUDA {torch.version.cuda}")

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def seconds(self, fn) -> float:
        """One call's time: CUDA events around it on a GPU (after the queue is drained, so only this call's
        kernels fall between them; host work inside the call that stalls the GPU, e.g. the caption span's one
        device-to-host read, counts as it would in training), the wall clock on the CPU."""
        if not self.is_cuda:
            return wall_seconds(fn)
        self.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    def step_peak_rise(self, fn) -> int | None:
        """Bytes by which one call raises the device's peak allocation above what was allocated before it
        (activations, gradients, temporaries): ``torch.cuda.max_memory_allocated`` after
        ``reset_peak_memory_stats``; on the CPU the process's peak RSS (VmHWM, reset through
        /proc/self/clear_refs) over its RSS, None where /proc has neither."""
        gc.collect()
        if self.is_cuda:
            self.synchronize()
            torch.cuda.reset_peak_memory_stats(self.torch)
            before = torch.cuda.memory_allocated(self.torch)
            fn()
            self.synchronize()
            return torch.cuda.max_memory_allocated(self.torch) - before
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = _status_kib("VmRSS")
            fn()
            return (_status_kib("VmHWM") - before) * 1024
        except (OSError, AttributeError):
            fn()
            return None

    def free(self) -> None:
        gc.collect()
        if self.is_cuda:
            torch.cuda.empty_cache()

    def out_of_memory(self) -> type[BaseException]:
        return torch.cuda.OutOfMemoryError if self.is_cuda else MemoryError

    def child_env(self, processes: int = 1) -> dict:
        """Environment of a launched process (the cache builder, torchrun): on the CPU no CUDA device is visible;
        on a GPU this device (or, for several processes, the first ``processes`` visible ones: each rank takes
        cuda:LOCAL_RANK), and NCCL kept on this host (loopback sockets, no InfiniBand probing) unless set."""
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        if not self.is_cuda:
            return {**env, "CUDA_VISIBLE_DEVICES": ""}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        chosen = ids[self.torch.index:self.torch.index + 1] if processes == 1 else ids[:processes]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
        env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        env.setdefault("NCCL_IB_DISABLE", "1")
        return env


def _status_kib(key: str) -> int:
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))


def resident_bytes(holds, device: torch.device) -> int:
    """Bytes of the tensors on ``device`` that ``holds`` (modules, optimizers) keep between steps, each storage
    once: weights, buffers, optimizer state."""
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if torch.is_tensor(tensor) and tensor.device == device:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    for obj in holds:
        if isinstance(obj, nn.Module):
            for tensor in [*obj.parameters(), *obj.buffers()]:
                add(tensor)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    add(value)
    return total
