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

Weights can be stored in fp8 (e4m3) with one fp32 scale per output row (`Fp8Rows`): half the bytes
to hold and to move. How they are multiplied (`compute`): on GPUs with fp8 units each linear layer
runs as an fp8 matmul straight on the stored rows (`qie.memory.fp8_matmul`, activations quantized
per token on the fly); elsewhere they are upcast on the GPU into one block-sized workspace just
before the block runs.

The block forwards can be compiled while streaming (`qie.speed.compile.compile_streamed_blocks`):
the hooks that bind weights run outside the compiled code, and the weights are graph inputs, so
one graph serves every block and step.

Example:
    >>> streamer = BlockStreamer(pipe.transformer.transformer_blocks, torch.device("cuda"),
    ...                          resident=20, storage="fp8")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from qie.memory.fp8_matmul import FP8, Fp8RowLinear, compute_mode, quantize_rows
from qie.memory.pinned import PinnedArena

log = logging.getLogger(__name__)

ALIGN = 256  # bytes; every tensor in a packed buffer starts on this boundary
SLOTS = 2  # device buffers that streamed blocks take in turn: one computing, one being filled


@dataclass
class Fp8Rows:
    """A 2-D weight stored as fp8 values times one scale per output row."""

    values: torch.Tensor  # float8_e4m3fn, same shape as the weight
    scales: torch.Tensor  # (rows, 1), float32

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Fp8Rows:
        values, scales = quantize_rows(weight)
        return cls(values=values, scales=scales)

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
    work: Slice | None  # where the upcast weight goes in the workspace (upcast fp8 entries only)
    linear: Fp8RowLinear | None = None  # the layer that multiplies the fp8 rows as they are (fp8 compute)


class BlockLayout:
    """How one block's parameters pack into a flat byte buffer (fp8 rows for 2-D weights if asked).

    With `compute="fp8"` (fp8 storage only) the block's `nn.Linear` layers become `Fp8RowLinear`s
    that multiply the stored rows directly; other 2-D weights are still upcast into the workspace.

    Example:
        >>> layout = BlockLayout(nn.Linear(4, 3), "fp8", torch.float32)
        >>> buf = layout.pack()
        >>> buf.dtype, buf.numel() == layout.nbytes
        (torch.uint8, True)
    """

    def __init__(self, block: nn.Module, storage: str, dtype: torch.dtype, compute: str = "upcast") -> None:
        self.dtype = dtype
        self.entries: list[Entry] = []
        linears = {}
        if storage == "fp8" and compute == "fp8":
            linears = {id(m.weight): m for m in block.modules() if isinstance(m, nn.Linear)}
        offset = work = 0
        for p in block.parameters():
            shape = tuple(p.shape)
            if storage == "fp8" and p.dim() == 2:
                values = Slice(offset, FP8, shape)
                offset = _aligned(offset + values.nbytes)
                scales = Slice(offset, torch.float32, (shape[0], 1))
                offset = _aligned(offset + scales.nbytes)
                linear = linears.get(id(p))
                if linear is not None:
                    self.entries.append(Entry(p, None, values, scales, None, linear))
                    continue
                upcast = Slice(work, dtype, shape)
                work = _aligned(work + upcast.nbytes)
                self.entries.append(Entry(p, None, values, scales, upcast))
            else:
                plain = Slice(offset, dtype, shape)
                offset = _aligned(offset + plain.nbytes)
                self.entries.append(Entry(p, plain, None, None, None))
        self.nbytes, self.work_nbytes = offset, work

    def to_fp8_compute(self) -> None:
        """Make the layers of fp8-compute entries `Fp8RowLinear`s (after `pack`: it reads the plain weights)."""
        for e in self.entries:
            if e.linear is not None and not isinstance(e.linear, Fp8RowLinear):
                Fp8RowLinear.to_fp8_rows(e.linear)

    def pack(self, arena: PinnedArena | None = None) -> torch.Tensor:
        """The block's weights (as they are now) in one host byte buffer (a piece of `arena`: pinned)."""
        buf = arena.empty(self.nbytes) if arena is not None else torch.empty(self.nbytes, dtype=torch.uint8)
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
            elif e.linear is not None:
                e.param.data = e.values.view(buffer)
                e.linear.weight_scale.data = e.scales.view(buffer)
            else:
                out = e.work.view(workspace)
                out.copy_(e.values.view(buffer))  # fp8 -> compute dtype in place, no temporary
                out.mul_(e.scales.view(buffer))
                e.param.data = out

    def release(self, device: torch.device) -> None:
        empty = torch.empty(0, dtype=self.dtype, device=device)
        for e in self.entries:
            e.param.data = empty
            if e.linear is not None:
                e.linear.weight_scale.data = empty.float()


class BlockStreamer:
    """Place `blocks` (a ModuleList run in order): `resident` of them on `device`, the rest streamed.

    The resident blocks are spread evenly over the stack (`spread`), so copies of streamed blocks
    keep flowing while resident blocks compute, instead of the copy engine idling through a run
    of resident blocks at the start of each pass.
    """

    def __init__(
        self,
        blocks: nn.ModuleList,
        device: torch.device,
        resident: int,
        storage: str = "bf16",
        compute_dtype: torch.dtype = torch.bfloat16,
        compute: str = "auto",
    ) -> None:
        if storage not in ("bf16", "fp8"):
            raise ValueError(f"storage={storage!r}: use 'bf16' or 'fp8'")
        self.compute = compute_mode(device, compute) if storage == "fp8" else "bf16"
        self.device = device
        self.resident = max(0, min(resident, len(blocks)))
        self.resident_ids = spread(self.resident, len(blocks))
        self.streamed = [i for i in range(len(blocks)) if i not in self.resident_ids]
        self.upcoming = [self._streamed_after(i) for i in range(len(blocks))]  # looked up per block
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        blocks.requires_grad_(False)  # inference only; fp8 weights cannot carry gradients anyway
        self.layouts = [BlockLayout(block, storage, compute_dtype, self.compute) for block in blocks]
        # Resident blocks: one device buffer each. Streamed blocks: one pinned host buffer each, cut
        # from 1 GiB pinned blocks (`PinnedArena`: pinning each alone would round it up to 0.5 GiB).
        self.arena = PinnedArena() if cuda else None
        # One block at a time: packed, placed, its plain weights freed, so the host never holds the
        # packed copy of the whole stack beside the plain one (13 GiB at a 10 GiB budget).
        self.buffers: list[torch.Tensor] = []
        for i, layout in enumerate(self.layouts):
            buf = layout.pack(None if i in self.resident_ids else self.arena)
            self.buffers.append(buf.to(device) if i in self.resident_ids else buf)
            layout.to_fp8_compute()
            layout.release(device)
        largest = max((self.layouts[i].nbytes for i in self.streamed), default=0)
        self.slots = [torch.empty(largest, dtype=torch.uint8, device=device) for _ in range(SLOTS if largest else 0)]
        work = max(layout.work_nbytes for layout in self.layouts) if self.layouts else 0
        self.workspace = torch.empty(work, dtype=torch.uint8, device=device) if work else None
        self.loaded: dict[int, int] = {}  # streamed block -> slot its copy was issued to (until it has run)
        self.ready: dict[int, torch.cuda.Event] = {}  # streamed block -> its copy is done
        self.free: list[torch.cuda.Event | None] = [None] * len(self.slots)  # slot -> its last user finished
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._make_pre_hook(i))
            block.register_forward_hook(self._make_post_hook(i))
        blocks.qie_streamer = self  # lets compile find the streamed blocks (qie.speed.compile)
        self.pcie_gbps = self._probe_pcie()
        log.info(
            "streaming %d of %d blocks (%s storage, %s compute): %.1f GiB resident, %.1f GiB in pinned host memory "
            "(%.1f GiB pinned), %d x %.2f GiB copy slots",
            len(self.streamed),
            len(blocks),
            storage,
            self.compute,
            self.resident_bytes() / 2**30,
            self.host_bytes() / 2**30,
            self.pinned_bytes() / 2**30,
            len(self.slots),
            largest / 2**30,
        )

    def resident_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.resident_ids)

    def _probe_pcie(self) -> float | None:
        """Host-to-device GB/s of one streamed block's copy (the cost model's PCIe rate); None on CPU."""
        if self.copy_stream is None or not self.streamed:
            return None
        i = self.streamed[-1]
        target = self.slots[0].narrow(0, 0, self.layouts[i].nbytes)
        target.copy_(self.buffers[i], non_blocking=True)  # warm
        torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        target.copy_(self.buffers[i], non_blocking=True)
        torch.cuda.synchronize(self.device)
        gbps = self.layouts[i].nbytes / (time.perf_counter() - start) / 1e9
        log.info("host-to-device copy of one block: %.1f GB/s", gbps)
        return gbps

    def host_bytes(self) -> int:
        return sum(self.layouts[i].nbytes for i in self.streamed)

    def pinned_bytes(self) -> int:
        """Pinned host memory held for the streamed blocks (`host_bytes` plus the arena's unused tails)."""
        return self.arena.reserved_bytes if self.arena is not None else 0

    def _streamed_after(self, i: int) -> list[int]:
        """The next `SLOTS` streamed blocks after block `i` (wrapping to the next forward pass)."""
        later = [j for j in self.streamed if j > i] + [j for j in self.streamed if j <= i]
        return [j for j in later if j != i][:SLOTS]

    def _prefetch(self, i: int, force: bool = False) -> None:
        """Issue the copy of streamed block `i` into a free slot (once that slot's last user is done).

        Without a free slot nothing happens, unless `force` (block `i` is about to run): then a
        block left over from an interrupted pass gives up its slot.
        """
        if i in self.loaded:
            return
        taken = set(self.loaded.values())
        free = [s for s in range(len(self.slots)) if s not in taken]
        if not free:
            if not force:
                return
            leftover = next(iter(self.loaded))
            free = [self.loaded.pop(leftover)]
            self.ready.pop(leftover, None)
        slot = free[0]
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
            if i in self.resident_ids:
                buffer = self.buffers[i]
            else:
                self._prefetch(i, force=True)
                if i in self.ready:
                    torch.cuda.current_stream(self.device).wait_event(self.ready.pop(i))
                buffer = self.slots[self.loaded[i]]
            self.layouts[i].bind(buffer, self.workspace)
            for j in self.upcoming[i]:  # fill every free slot: copies overlap this block's compute
                self._prefetch(j)

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


def spread(count: int, total: int) -> frozenset[int]:
    """`count` of `total` block indices, evenly spaced (e.g. 2 of 6: {0, 3}).

    Example:
        >>> sorted(spread(3, 9))
        [0, 3, 6]
    """
    return frozenset((k * total) // count for k in range(count)) if count else frozenset()


def block_bytes(blocks: nn.ModuleList, storage: str) -> list[int]:
    """Bytes each block's packed buffer takes in `storage` ('bf16' or 'fp8': 1 byte a weight plus row scales)."""
    return [BlockLayout(block, storage, torch.bfloat16).nbytes for block in blocks]
