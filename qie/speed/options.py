"""The allowed values of the speed options (no torch: `qie.core.request` and `LoadOptions` validate with them)."""

ATTENTION_QUANT_MODES = ("off", "int8", "fp8")  # qie.speed.attention
STEP_CACHE_MODES = ("off", "fbcache", "taylorseer")  # qie.speed.early_exit
# `torch.compile` modes of the regional compile (qie.speed.compile), and the VAE decoder's compile choices.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
VAE_COMPILE_MODES = ("off", "on", "channels-last")
