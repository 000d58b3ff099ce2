"""Interoperability with PyTorch tools (torchvision key names and layouts)."""
