"""Bone-age assessment platform: data, models, training, tuning and serving on Ray."""
__version__ = "0.1.0"
