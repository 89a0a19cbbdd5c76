"""The device seam: every CUDA call the runtime makes for a MoE layer goes through one small object.

A CUDA plan's MoE layers, its background copies and the page-locking of the experts' host memory call
these methods and nothing of `torch.cuda` themselves, so that the order of a layer's work (DESIGN.md,
"Accelerator memory and the CUDA execution order") and the number of times it blocks the host can be
watched on a machine without a GPU:

- `CudaDevice`: the real thing (pinned staging buffers, one compute stream and one copy stream, events,
  `cudaHostRegister`);
- `RecordingDevice`: a stand-in for tests on this CPU machine. It runs the same arithmetic on CPU
  tensors, so a model driven through it still has to equal plain transformers, and it records every
  call in order (kind, layer, what, bytes, whether it blocks the host). It checks the schedule the
  runtime asks for, not that CUDA would run it: nothing here proves a stream or an event behaves.

A plan with `accelerator: cpu` has no seam at all (`Engine` passes None): its layers take their CPU paths
and pay nothing for this one.

The methods, in the words of the execution order:
- `fetch`: step (1), the one blocking host sync of a layer: device tensors copied into pinned host
  buffers on the compute stream, one event recorded after them, the host waits for that event;
- `launch`: a kernel (a hit's or an accelerator miss's expert) queued on the compute stream;
- `send`: step (4), a host tensor copied into a pinned staging buffer, then to the device without
  blocking the host; the compute stream orders it before the work queued after it;
- `background_copies`: steps (3) and (5), promotion and prefetch copies on the copy stream, after the
  reads already queued on the compute stream; returns the event a layer later waits for (`wait`);
- `transfer_copy`: an accelerator miss's weights (a transfer) copied on the copy stream after one compute
  event only (the last reader of its destination), so that it runs while the compute stream computes the
  transfer before it (double-buffered, `MoeLayer._transfers`); returns the event its compute waits for;
- `record`: an event on the compute stream after the work queued so far (a transfer buffer's last reader).

Pinned staging buffers are reused from layer to layer: a buffer that `send` filled is written again only
after the next `fetch`, whose event comes after that copy on the same stream; one that `fetch` filled is
read by the host before the next `fetch` writes it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import HardwareError


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class DeviceSeam:
    """What a CUDA plan's layers need of the accelerator (see the module docstring)."""

    device: torch.device  # where the dense part and the expert slots live

    def fetch(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def send(self, layer: int, what: str, host: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def launch(self, layer: int, what: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        raise NotImplementedError

    def background_copies(self, layer: int, what: str,
                          pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, int]:
        raise NotImplementedError

    def transfer_copy(self, layer: int, what: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      after: Any = None) -> tuple[Any, int]:
        raise NotImplementedError

    def record(self, layer: int, what: str) -> Any:
        raise NotImplementedError

    def wait(self, layer: int, event: Any) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def lock_host(self, tensors: Iterable[torch.Tensor]) -> int:
        raise NotImplementedError

    def unlock_host(self) -> None:
        raise NotImplementedError


def unique_storages(tensors: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """(address, bytes) of each distinct storage under `tensors`: what page-locking in place registers."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        if storage.nbytes():
            seen.setdefault(storage.data_ptr(), storage.nbytes())
    return sorted(seen.items())


class _Staging:
    """Pinned host buffers reused from call to call: one per (name, dtype), grown when a bigger one is asked
    for, so that prompts of many lengths do not pile up buffers."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        key = (name, like.dtype)
        need = like.numel()
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < need:
            buf = self._buffers[key] = torch.empty(max(need, 1), dtype=like.dtype, pin_memory=self.pinned)
        return buf[:need].view(like.shape)


class CudaDevice(DeviceSeam):
    """The seam on a CUDA device: the compute stream is the current stream when the engine was built."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self.copy_stream = torch.cuda.Stream(device)
        self._staging = _Staging(pinned=True)
        self._fetched = torch.cuda.Event()
        self._locked: list[int] = []
        self.locked_bytes = 0
        # unregistered when the engine is collected or the interpreter exits, whichever comes first
        self._finalizer = weakref.finalize(self, _unregister, self._locked)

    def fetch(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, t in enumerate(tensors):
            buf = self._staging.get(f"fetch{i}", t)
            buf.copy_(t, non_blocking=True)
            out.append(buf)
        self._fetched.record(self.compute)
        self._fetched.synchronize()  # the layer's one blocking host sync
        return out

    def send(self, layer: int, what: str, host: torch.Tensor) -> torch.Tensor:
        buf = self._staging.get(what, host)
        buf.copy_(host)
        return buf.to(self.device, non_blocking=True)

    def launch(self, layer: int, what: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return fn(*args)  # queued on the current (compute) stream

    def background_copies(self, layer: int, what: str,
                          pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, int]:
        # after the reads already queued on the compute stream: a slot is never overwritten while read
        self.copy_stream.wait_stream(self.compute)
        return self._copy_on_copy_stream(pairs)

    def transfer_copy(self, layer: int, what: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      after: Any = None) -> tuple[Any, int]:
        # NOT after everything queued on the compute stream (that would wait for the transfer computed
        # before this one, and nothing would overlap): after the last reader of the destination only
        if after is not None:
            self.copy_stream.wait_event(after)
        return self._copy_on_copy_stream(pairs)

    def _copy_on_copy_stream(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, int]:
        """Queue the copies on the copy stream (after whatever it was told to wait for); their event, bytes."""
        copied = 0
        with torch.cuda.stream(self.copy_stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                copied += tensor_bytes(src)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event, copied

    def record(self, layer: int, what: str) -> Any:
        event = torch.cuda.Event()
        event.record(self.compute)
        return event

    def wait(self, layer: int, event: Any) -> None:
        self.compute.wait_event(event)

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def lock_host(self, tensors: Iterable[torch.Tensor]) -> int:
        """Page-lock the tensors' host storage in place (`cudaHostRegister`): no copy, no rounding up to a
        power of two, the pages (2 MB ones included) kept. Returns the bytes locked by this call."""
        cudart = torch.cuda.cudart()
        locked = 0
        for ptr, nbytes in unique_storages(tensors):
            if ptr in self._locked:
                continue
            err = cudart.cudaHostRegister(ptr, nbytes, 0)
            code = getattr(err, "value", err)
            if code != 0:
                raise HardwareError(f"cannot page-lock {nbytes / 2**30:.2f} GiB of expert memory in place "
                                    f"(cudaHostRegister error {code}); {self.locked_bytes / 2**30:.2f} GiB locked "
                                    f"before it; check `ulimit -l` and the host's free memory")
            self._locked.append(ptr)
            locked += nbytes
        self.locked_bytes += locked
        return locked

    def unlock_host(self) -> None:
        _unregister(self._locked)
        self.locked_bytes = 0


def _unregister(locked: list[int]) -> None:
    if not locked:
        return
    cudart = torch.cuda.cudart()
    while locked:
        cudart.cudaHostUnregister(locked.pop())


@dataclass(frozen=True)
class Call:
    """One call through the recording seam."""
    kind: str  # fetch | send | launch | background | transfer | record | wait | synchronize | lock
    layer: int  # the MoE layer that made it (-1: none)
    # e.g. "hit 3", "promote", "prefetch for 2", "cpu sum", "transfer 5 into buffer 0", "read buffer 0",
    # "read by the hits"
    what: str
    nbytes: int  # bytes moved (0 for a launch or a wait)
    blocks_host: bool  # whether the host waits for the device in this call
    after: int | None = None  # a transfer copy: the compute event (a `record` call's index) it waits for


class RecordingDevice(DeviceSeam):
    """A stand-in for `CudaDevice` on a machine without a GPU: computes on CPU tensors, records each call.

    It checks the schedule (which calls, in what order, which of them block the host), not that CUDA ran.
    Events are the index of the call that made them. Two ways the two streams can drift apart, each the
    one that shows a missing wait in the tokens:

    - `copies_land="late"` (the default): the copy stream lags. Copies on it (background and transfer) are
      held back until a `wait` for their event (or a later one: the copy stream runs in order) or a
      `synchronize`; launches compute at once. A layer that read a slot or a transfer buffer without
      waiting for the copy into it would compute with the old weights, and the tokens would show it.
    - `copies_land="early"`: the compute stream lags. Launches are held back (`record` marks where each
      compute event falls among them) and run at the next call that needs the compute stream to have
      caught up: a transfer copy that waits for a compute event runs the launches up to that event first;
      `fetch`, `send`, `background_copies` and `synchronize` run them all; so does `settle`,
      which a test calls when a layer returns (the dense part after it reads the layer's output on the
      host here, where on a GPU it would queue behind the launches). Copies land as soon as they are
      issued. A transfer buffer written before the compute that reads it had run would hand that compute
      the next expert's weights, and the tokens would show it.
    """

    def __init__(self, copies_land: str = "late") -> None:
        if copies_land not in ("late", "early"):
            raise ValueError(f"copies_land: 'late' or 'early', not {copies_land!r}")
        self.device = torch.device("cpu")
        self.calls: list[Call] = []
        self.locked_bytes = 0
        self._early = copies_land == "early"
        self._pending: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = []  # (event, copies)
        # early: the compute stream's work not run yet, in order: (None, fn, args) or (event, None, None)
        self._lagging: list[tuple[int | None, Callable[..., torch.Tensor] | None, tuple]] = []

    def _log(self, kind: str, layer: int, what: str, nbytes: int = 0, blocks_host: bool = False,
             after: int | None = None) -> None:
        self.calls.append(Call(kind, layer, what, nbytes, blocks_host, after))

    def _catch_up(self, event: int | None = None) -> None:
        """Early: run the held-back launches, all of them or those before compute event `event` (none if
        the compute stream is past that event already)."""
        if event is not None and all(mark != event for mark, _, _ in self._lagging):
            return
        while self._lagging:
            mark, fn, args = self._lagging.pop(0)
            if fn is not None:
                fn(*args)
            elif event is not None and mark == event:
                return

    def settle(self) -> None:
        """Early: the compute stream catches up (a layer's output is read on the host next)."""
        self._catch_up()

    def fetch(self, layer: int, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._catch_up()
        self._log("fetch", layer, f"{len(tensors)} tensors", sum(tensor_bytes(t) for t in tensors), True)
        return [t.clone() for t in tensors]

    def send(self, layer: int, what: str, host: torch.Tensor) -> torch.Tensor:
        self._catch_up()
        self._log("send", layer, what, tensor_bytes(host))
        return host.clone()

    def launch(self, layer: int, what: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor | None:
        self._log("launch", layer, what)
        if self._early:
            self._lagging.append((None, fn, args))
            return None
        return fn(*args)

    def _copy_stream(self, kind: str, layer: int, what: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                     after: int | None = None) -> tuple[Any, int]:
        copied = sum(tensor_bytes(src) for _, src in pairs)
        self._log(kind, layer, what, copied, after=after)
        event = len(self.calls) - 1
        if self._early:  # lands now, once the compute it waits for has run
            for dst, src in pairs:
                dst.copy_(src)
        else:  # the sources are host memory that does not change; the destinations see them at the wait
            self._pending.append((event, list(pairs)))
        return event, copied

    def background_copies(self, layer: int, what: str,
                          pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[Any, int]:
        self._catch_up()  # after every read already queued on the compute stream
        return self._copy_stream("background", layer, what, pairs)

    def transfer_copy(self, layer: int, what: str, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      after: Any = None) -> tuple[Any, int]:
        if after is not None:
            self._catch_up(after)  # after that compute event only
        return self._copy_stream("transfer", layer, what, pairs, after)

    def record(self, layer: int, what: str) -> Any:
        self._log("record", layer, what)
        event = len(self.calls) - 1
        if self._early:
            self._lagging.append((event, None, ()))
        return event

    def _complete(self, event: int) -> None:
        """Apply the held-back copies up to `event`, in the order they were queued."""
        while self._pending and self._pending[0][0] <= event:
            for dst, src in self._pending.pop(0)[1]:
                dst.copy_(src)

    def wait(self, layer: int, event: Any) -> None:
        self._log("wait", layer, f"copies of call {event}")
        self._complete(event)

    def synchronize(self) -> None:
        self._catch_up()
        self._log("synchronize", -1, "device", 0, True)
        self._complete(len(self.calls))

    def lock_host(self, tensors: Iterable[torch.Tensor]) -> int:
        nbytes = sum(n for _, n in unique_storages(tensors))
        self.locked_bytes += nbytes
        self._log("lock", -1, "expert host memory", nbytes)
        return nbytes

    def unlock_host(self) -> None:
        self.locked_bytes = 0

    def blocking(self, layer: int | None = None) -> int:
        """How many calls so far blocked the host (of one layer, or of all)."""
        return sum(1 for c in self.calls if c.blocks_host and (layer is None or c.layer == layer))
