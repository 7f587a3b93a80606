"""Text encoder and VAE placement: what each choice costs per stage, on the fp8-te-stream plan.

The 24 GiB plan keeps the fp8 transformer resident; the rest of an edit's time is the text encoder
(streamed from host memory) and the VAE (tiled so its activations fit). This section times those
stages for each choice, on one pipeline and the same request (1024², 2 steps, no CFG):

  text encoder  streamed in bf16 | streamed with fp8 storage (half the bytes cross PCIe)
  VAE           untiled | diffusers tiling with tiles of 256 (its default), 512 and 576 px

Each row records the stage's seconds (median of 3 edits after a warm-up), the stage's peak GPU
memory and PSNR against the first configuration (streamed bf16, untiled; "the plain pipeline" in
the row's note). Run with
``python -m qie bench --sections stock,placement``.
"""

from __future__ import annotations

from typing import Any

from benchmarks.bench_fast import encoder_row
from benchmarks.probes import Probe
from qie.memory.placement import set_vae_tiling

# Label -> VAE tile side in pixels (`qie.memory.placement.set_vae_tiling`); None: untiled.
VAE_CHOICES: dict[str, int | None] = {
    "untiled": None,
    "tiles 256/192 (diffusers default)": 256,
    "tiles 512/448": 512,
    "tiles 576/512": 576,
}


def run_placement(bench: Any) -> None:
    """Rows `placement: text encoder …, VAE …` (see the module docstring)."""
    from qie.memory.quantize import store_text_encoder_fp8

    size = bench.args.sizes[0]
    first: Probe | None = None
    for te in ("bf16", "fp8"):
        bench.check_time(f"placement, text encoder {te}")
        pipe = bench.fresh_pipe()
        if te == "fp8":
            store_text_encoder_fp8(pipe.text_encoder, pipe.dtype)  # before the plan streams it
        editor = bench.editor(pipe, "fp8-te-stream")
        choices = VAE_CHOICES if te == "bf16" else {"untiled": None}
        for label, tiles in choices.items():
            bench.check_time(f"placement, VAE {label}")
            set_vae_tiling(pipe.vae, tiles)
            name = f"placement: text encoder streamed {te}, VAE {label}"
            probe = encoder_row(bench, editor, name, size, first, plan="fp8-te-stream")
            first = first or probe
        del editor, pipe
