"""Memory plans: the plan registry and planner, block streaming, weight quantization, VAE tiling.

Mechanisms only: nothing here imports `qie.core` or anything above it."""
