"""Speed mechanisms: option values, attention backends, step cache and early exit, fast mode, compile.

Nothing here imports `qie.core` or anything above it."""
