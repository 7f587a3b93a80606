"""Serving at scale: the Ray Serve HTTP service, request batching, the result cache, job cancellation,
multi-GPU layouts."""
