"""One edit over several GPUs, for latency: CFG-parallel and diffusers' context parallelism.

Two ways to split one edit, combined when there are enough GPUs:

- **CFG-parallel** (2 groups): with true CFG each step runs the transformer twice, on the
  prompt and on the negative prompt. One group of GPUs runs the positive branch, the other the
  negative; the two predictions are exchanged (`all_gather`) and combined on every rank with
  the same `stages.cfg_combine`, so every rank holds the same latents.
- **Context parallelism** (diffusers `ContextParallelConfig` + the transformer's `_cp_plan`):
  the transformer's token sequence is split over the GPUs of a group; attention runs as
  Ulysses (all-to-all over heads; fast on NVLink) or ring attention. qie uses the "anything"
  variants so that any text length and head count work.

`plan_layout(n, cfg=...)` decides: with CFG and an even count, 2 CFG groups of n/2 GPUs each,
context-parallel inside a group; otherwise n GPUs of context parallelism. One GPU (or a CPU)
needs no layout: the edit runs as usual and a WARNING says so.

Each rank is its own process with a full copy of the weights (about 58 GiB in bf16: 80 GB
cards). Launch with torchrun; rank 0 writes the output:

    torchrun --nproc-per-node 4 -m qie.cli.parallel photo.jpg --prompt "white background" --output out.png

Example (the layout alone, no GPU needed):
    >>> plan_layout(4, cfg=True, heads=24).describe()
    'cfg 2 x ulysses 2 (4 ranks)'
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from qie.errors import InvalidRequestError

log = logging.getLogger(__name__)

CP_MODES = ("ulysses", "ring")
# diffusers' "anything" attention exchanges each call's split sizes; routing those over gloo
# ("cpu:gloo,cuda:nccl") was measured slower on 2 H100s than NCCL (0.904 vs 0.820 s/step), so NCCL.
PROCESS_GROUP_BACKEND = "nccl"
# Ring attention merges partial results with their log-sum-exp, which native SDPA does not return.
LSE_BACKENDS = ("flash", "_flash_3", "flash_hub", "_flash_3_hub", "_native_cudnn")
BRANCHES = ("cond", "uncond")


@dataclass(frozen=True)
class RankRole:
    """What one rank does: its device, its CFG branch (None: both) and its place in its context-parallel group."""

    rank: int
    device: str
    branch: str | None
    cp_rank: int


@dataclass(frozen=True)
class ParallelLayout:
    """How `world_size` ranks split one edit: `cfg_degree` (1 or 2) groups of `cp_degree` ranks each.

    Ranks are numbered group by group: rank = cfg_index * cp_degree + cp_rank.
    """

    world_size: int
    cfg_degree: int
    cp_degree: int
    cp_mode: str  # "ulysses" or "ring" (meaningless when cp_degree == 1)
    device_type: str = "cuda"

    def __post_init__(self) -> None:
        if self.cfg_degree not in (1, 2):
            raise InvalidRequestError("cfg_degree", self.cfg_degree, "use 1 (off) or 2 (one GPU group per branch)")
        if self.cfg_degree * self.cp_degree != self.world_size:
            raise InvalidRequestError(
                "world_size", self.world_size, f"must equal cfg_degree x cp_degree = {self.cfg_degree * self.cp_degree}"
            )
        if self.cp_mode not in CP_MODES:
            raise InvalidRequestError("cp_mode", self.cp_mode, f"use one of {CP_MODES}")

    def role(self, rank: int, local_rank: int | None = None) -> RankRole:
        """The role of `rank` (on device `local_rank`, default `rank`)."""
        if not 0 <= rank < self.world_size:
            raise InvalidRequestError("rank", rank, f"give 0 to {self.world_size - 1}")
        group, cp_rank = divmod(rank, self.cp_degree)
        device = (
            "cpu" if self.device_type == "cpu" else f"{self.device_type}:{rank if local_rank is None else local_rank}"
        )
        return RankRole(rank, device, BRANCHES[group] if self.cfg_degree == 2 else None, cp_rank)

    def describe(self) -> str:
        parts = []
        if self.cfg_degree == 2:
            parts.append("cfg 2")
        if self.cp_degree > 1:
            parts.append(f"{self.cp_mode} {self.cp_degree}")
        return f"{' x '.join(parts)} ({self.world_size} ranks)"

    def context_parallel_config(self, mesh: Any = None) -> Any:
        """diffusers' `ContextParallelConfig` for one CFG group (None when `cp_degree` is 1).

        The "anything" variants accept sequence lengths and head counts that do not divide
        evenly (the text length changes with every prompt).
        """
        if self.cp_degree == 1:
            return None
        from diffusers import ContextParallelConfig

        if self.cp_mode == "ulysses":
            return ContextParallelConfig(ulysses_degree=self.cp_degree, ulysses_anything=True, mesh=mesh)
        return ContextParallelConfig(ring_degree=self.cp_degree, ring_anything=True, mesh=mesh)


def plan_layout(
    world_size: int, *, cfg: bool, heads: int = 24, cp_mode: str = "ulysses", device_type: str = "cuda"
) -> ParallelLayout | None:
    """The layout for `world_size` GPUs, or None (WARNING logged) when one device is all there is.

    CFG-parallel is used when the edit uses true CFG and the count is even; the rest is context
    parallelism (`cp_mode`). Ulysses with more ranks than attention `heads` is refused.

    Example:
        >>> plan_layout(8, cfg=True).describe()
        'cfg 2 x ulysses 4 (8 ranks)'
        >>> plan_layout(3, cfg=False, cp_mode="ring").describe()
        'ring 3 (3 ranks)'
    """
    if cp_mode not in CP_MODES:
        raise InvalidRequestError("cp_mode", cp_mode, f"use one of {CP_MODES}")
    if world_size < 2:
        log.warning("multi-GPU edit asked for, but %d device(s) found: running on one device", world_size)
        return None
    cfg_degree = 2 if cfg and world_size % 2 == 0 else 1
    if cfg and cfg_degree == 1:
        log.warning("CFG-parallel needs an even number of GPUs, %d given: using context parallelism only", world_size)
    cp_degree = world_size // cfg_degree
    if cp_mode == "ulysses" and cp_degree > heads:
        raise InvalidRequestError(
            "cp_mode", cp_mode, f"Ulysses splits the {heads} heads: use at most {heads} GPUs per group, or 'ring'"
        )
    if cfg_degree == 1:
        log.warning(
            "%s over %d GPUs without CFG-parallel: on 2 H100s context parallelism alone ran slower than one GPU "
            "(README, 'One edit over several GPUs'); CFG-parallel is the layout that paid (1.97x)",
            cp_mode,
            cp_degree,
        )
    return ParallelLayout(world_size, cfg_degree, cp_degree, cp_mode, device_type)


class CfgParallelPredictor:
    """A `stages.Predictor` for one rank of a CFG-parallel layout: its own branch, then an exchange.

    Both groups end each step with the same guided prediction, so their latents stay equal.
    """

    def __init__(self, branch: str, group: Any) -> None:
        self.branch = branch
        self.group = group

    def __call__(self, pipe, model_input, timestep, prompt, negative, img_shapes, true_cfg_scale: float):
        import torch
        import torch.distributed as dist

        from qie.core.stages import _predict, cfg_combine, guided_prediction

        if negative is None:  # this request has no CFG: nothing to split, every rank runs it all
            return guided_prediction(pipe, model_input, timestep, prompt, None, img_shapes, true_cfg_scale)
        mine = _predict(
            pipe, self.branch, model_input, timestep, prompt if self.branch == "cond" else negative, img_shapes
        )
        both = [torch.empty_like(mine) for _ in BRANCHES]
        dist.all_gather(both, mine.contiguous(), group=self.group)
        return cfg_combine(both[0], both[1], true_cfg_scale)


def enable(editor: Any, layout: ParallelLayout, rank: int) -> RankRole:
    """Set up this rank of `layout` on `editor` (torch.distributed must be initialized): the device
    mesh, context parallelism on the transformer and the CFG-parallel predictor. Once per load.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    role = layout.role(rank, int(os.environ.get("LOCAL_RANK", rank)))
    # One mesh over all ranks: (cfg, ring, ulysses), so every sub-group is a slice of it.
    ring, ulysses = (layout.cp_degree, 1) if layout.cp_mode == "ring" else (1, layout.cp_degree)
    mesh = init_device_mesh(
        layout.device_type, (layout.cfg_degree, ring, ulysses), mesh_dim_names=("cfg", "ring", "ulysses")
    )
    cp_config = layout.context_parallel_config(mesh["ring", "ulysses"])
    speed = getattr(editor, "speed", None)
    backend = getattr(speed, "attention_backend", "native")
    if cp_config is not None and layout.cp_mode == "ring" and backend not in LSE_BACKENDS:
        log.warning("ring attention needs the log-sum-exp, which %r attention does not return: using cuDNN", backend)
        editor.pipe.transformer.set_attention_backend("_native_cudnn")
        if speed is not None:
            speed.attention_backend = "_native_cudnn"
    if cp_config is not None:
        editor.pipe.transformer.enable_parallelism(config=cp_config)
    if layout.cfg_degree == 2:
        editor.predictor = CfgParallelPredictor(role.branch, mesh["cfg"].get_group())
    log.info(
        "rank %d/%d: %s on %s (%s)", rank, dist.get_world_size(), role.branch or "both", role.device, layout.describe()
    )
    return role
