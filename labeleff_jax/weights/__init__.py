"""Published pretrained weights: read PyTorch .pth files without torch, map them onto our models, catalogue.

- `read_pth(path)` (pth.py): a .pth file's tensors as numpy arrays, with allow-listed unpickling.
- layouts.py / convert.py: which checkpoint layout a file has, and its ResNets renamed onto ours.
- catalog.py / fetch.py: published Sentinel-1/2 ResNet weights and `python -m labeleff_jax.weights.fetch`.
`labeleff_jax.transfer.load_pretrained` uses all of them for `config.init_from`.
"""

from labeleff_jax.weights.pth import PthError
from labeleff_jax.weights.pth import read_pth
from labeleff_jax.weights.pth import read_pth_object

__all__ = ["PthError", "read_pth", "read_pth_object"]
