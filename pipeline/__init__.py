"""Batch ImageNet classification and pooled ResNet features over image shards, on Ray Data."""

__version__ = "0.2.0"
