"""Partial residency: keep as many transformer blocks on the GPU as the budget allows, stream the rest.

diffusers' group offloading streams *every* block from the host; on a GPU with, say, 10 GiB free,
that throws away the memory that could hold a third of the fp8 transformer and makes each step pay
for the whole model crossing PCIe. `BlockStreamer` keeps the first `resident` blocks on the GPU
and copies the others from pinned host memory on a side CUDA stream, one block ahead of the
compute, so copies overlap with the matrix work.

Each block's weights are packed into one flat byte buffer (`BlockLayout`): one pinned host buffer
per streamed block, and two device slots that streamed blocks take in turn, so a block crosses
PCIe as one copy and nothing is allocated while the transformer runs (per-tensor copies with
`record_stream` made the caching allocator free and re-allocate at the edge of a memory budget).
CUDA events order the two streams both ways: the compute waits until its slot's copy landed, the
next copy into a slot waits until the block that used it finished.

Weights can be stored in fp8 (e4m3) with one scale per output row (`Fp8Rows`): half the bytes to
hold and to move, upcast on the GPU into one block-sized workspace just before the block runs.

Example:
    >>> streamer = BlockStreamer(pipe.transformer.transformer_blocks, torch.device("cuda"),
    ...                          resident=20, storage="fp8")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
ALIGN = 256  # bytes; every tensor in a packed buffer starts on this boundary
SLOTS = 2  # device buffers that streamed blocks take in turn: one computing, one being filled


@dataclass
class Fp8Rows:
    """A 2-D weight stored as fp8 values times one scale per output row."""

    values: torch.Tensor  # float8_e4m3fn, same shape as the weight
    scales: torch.Tensor  # (rows, 1), compute dtype

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Rows:
        w = weight.float()
        scales = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        return cls(values=(w / scales).to(FP8), scales=scales.to(weight.dtype))

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return self.values.to(dtype) * self.scales.to(dtype)


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Slice:
    """Where one tensor lies in a packed byte buffer."""

    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Entry:
    """One parameter of a block: its plain slice, or its fp8 values and row scales, and its workspace slot."""

    param: nn.Parameter
    plain: Slice | None
    values: Slice | None
    scales: Slice | None
    work: Slice | None  # where the upcast weight goes in the workspace (fp8 entries only)


class BlockLayout:
    """How one block's parameters pack into a flat byte buffer (fp8 rows for 2-D weights if asked).

    Example:
        >>> layout = BlockLayout(nn.Linear(4, 3), "fp8", torch.float32)
        >>> buf = layout.pack()
        >>> buf.dtype, buf.numel() == layout.nbytes
        (torch.uint8, True)
    """

    def __init__(self, block: nn.Module, storage: str, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.entries: list[Entry] = []
        offset = work = 0
        for p in block.parameters():
            shape = tuple(p.shape)
            if storage == "fp8" and p.dim() == 2:
                values = Slice(offset, FP8, shape)
                offset = _aligned(offset + values.nbytes)
                scales = Slice(offset, dtype, (shape[0], 1))
                offset = _aligned(offset + scales.nbytes)
                upcast = Slice(work, dtype, shape)
                work = _aligned(work + upcast.nbytes)
                self.entries.append(Entry(p, None, values, scales, upcast))
            else:
                plain = Slice(offset, dtype, shape)
                offset = _aligned(offset + plain.nbytes)
                self.entries.append(Entry(p, plain, None, None, None))
        self.nbytes, self.work_nbytes = offset, work

    def pack(self, pin: bool = False) -> torch.Tensor:
        """The block's weights (as they are now) in one host byte buffer."""
        buf = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=pin)
        for e in self.entries:
            w = e.param.data.detach().to(self.dtype)  # quantized where it lives (the GPU: fast), then copied
            if e.plain is not None:
                e.plain.view(buf).copy_(w)
            else:
                q = Fp8Rows.quantize(w)
                e.values.view(buf).copy_(q.values)
                e.scales.view(buf).copy_(q.scales)
        return buf

    def bind(self, buffer: torch.Tensor, workspace: torch.Tensor | None) -> None:
        """Point the parameters at `buffer` (fp8 entries upcast into `workspace`, on its stream)."""
        for e in self.entries:
            if e.plain is not None:
                e.param.data = e.plain.view(buffer)
            else:
                out = e.work.view(workspace)
                out.copy_(e.values.view(buffer))  # fp8 -> compute dtype in place, no temporary
                out.mul_(e.scales.view(buffer))
                e.param.data = out

    def release(self, device: torch.device) -> None:
        empty = torch.empty(0, dtype=self.dtype, device=device)
        for e in self.entries:
            e.param.data = empty


class BlockStreamer:
    """Place `blocks` (a ModuleList run in order) with the first `resident` on `device`, the rest streamed."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: torch.device,
        resident: int,
        storage: str = "bf16",
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if storage not in ("bf16", "fp8"):
            raise ValueError(f"storage={storage!r}: use 'bf16' or 'fp8'")
        self.device = device
        self.resident = max(0, min(resident, len(blocks)))
        self.streamed = list(range(self.resident, len(blocks)))
        self.next_streamed = [self._first_streamed_after(i) for i in range(len(blocks))]  # looked up per block
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.layouts = [BlockLayout(block, storage, compute_dtype) for block in blocks]
        # Resident blocks: one device buffer each. Streamed blocks: one pinned host buffer each.
        self.buffers = [layout.pack(pin=cuda and i >= self.resident) for i, layout in enumerate(self.layouts)]
        for i in range(self.resident):
            self.buffers[i] = self.buffers[i].to(device)
        for layout in self.layouts:
            layout.release(device)
        largest = max((self.layouts[i].nbytes for i in self.streamed), default=0)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(SLOTS if largest else 0)]
        work = max(layout.work_nbytes for layout in self.layouts) if self.layouts else 0
        self.workspace = torch.empty(work, dtype=torch.uint8, device=device) if work else None
        self.loaded: dict[int, int] = {}  # streamed block -> slot its copy was issued to
        self.next_slot = 0  # slots are taken in turn, never the one the running block uses
        self.ready: dict[int, torch.cuda.Event] = {}  # streamed block -> its copy is done
        self.free: list[torch.cuda.Event | None] = [None] * len(self.slots)  # slot -> its last user finished
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._make_pre_hook(i))
            block.register_forward_hook(self._make_post_hook(i))
        log.info(
            "streaming %d of %d blocks (%s storage): %.1f GiB resident, %.1f GiB in pinned host memory, "
            "%d x %.2f GiB copy slots",
            len(self.streamed),
            len(blocks),
            storage,
            self.resident_bytes() / 2**30,
            self.host_bytes() / 2**30,
            len(self.slots),
            largest / 2**30,
        )

    def resident_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in range(self.resident))

    def host_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.streamed)

    def _first_streamed_after(self, i: int) -> int | None:
        """The first streamed block after block `i` (wrapping to the next forward pass)."""
        later = [j for j in self.streamed if j > i]
        if later:
            return later[0]
        return self.streamed[0] if self.streamed else None

    def _prefetch(self, i: int) -> None:
        """Issue the copy of streamed block `i` into its slot (once the slot's last user is done)."""
        if i in self.loaded:
            return
        slot, self.next_slot = self.next_slot, (self.next_slot + 1) % len(self.slots)
        for j in [j for j, s in self.loaded.items() if s == slot]:  # left over from an interrupted pass
            del self.loaded[j]
            self.ready.pop(j, None)
        target = self.slots[slot].narrow(0, 0, self.layouts[i].nbytes)
        if self.copy_stream is None:
            target.copy_(self.buffers[i])
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.free[slot] is not None:
                    self.copy_stream.wait_event(self.free[slot])
                target.copy_(self.buffers[i], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            self.ready[i] = event
        self.loaded[i] = slot

    def _make_pre_hook(self, i: int):
        def hook(module, args):
            if i < self.resident:
                buffer = self.buffers[i]
            else:
                self._prefetch(i)
                if i in self.ready:
                    torch.cuda.current_stream(self.device).wait_event(self.ready.pop(i))
                buffer = self.slots[self.loaded[i]]
                self.next_slot = (self.loaded[i] + 1) % len(self.slots)
            self.layouts[i].bind(buffer, self.workspace)
            nxt = self.next_streamed[i]
            if nxt is not None and nxt != i:
                self._prefetch(nxt)

        return hook

    def _make_post_hook(self, i: int):
        def hook(module, args, output):
            self.layouts[i].release(self.device)
            slot = self.loaded.pop(i, None)
            if slot is not None and self.copy_stream is not None:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                self.free[slot] = done

        return hook


def block_bytes(blocks: nn.ModuleList, storage: str) -> list[int]:
    """Bytes each block's packed buffer takes in `storage` ('bf16' or 'fp8': 1 byte a weight plus row scales)."""
    return [BlockLayout(block, storage, torch.bfloat16).nbytes for block in blocks]
