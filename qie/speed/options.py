"""The allowed values of the per-request speed options (no torch: `qie.core.request` validates with them)."""

ATTENTION_QUANT_MODES = ("off", "int8", "fp8")  # qie.speed.attention
STEP_CACHE_MODES = ("off", "fbcache", "taylorseer")  # qie.speed.early_exit
