"""Direct3D-S2 image-to-mesh engine: models, Spatial Sparse Attention, pipeline, worker."""
__version__ = "0.1.0"
