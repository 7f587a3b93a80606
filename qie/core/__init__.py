"""The edit itself: requests and results, the editor that owns the GPU, its stages, images, geometry,
masking, the encode cache, the model registry and the tiny model. Imports `speed` and `memory`, never above."""
