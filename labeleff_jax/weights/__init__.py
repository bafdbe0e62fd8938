"""Published pretrained weights: read PyTorch .pth files without torch, map them onto our models, catalogue."""
