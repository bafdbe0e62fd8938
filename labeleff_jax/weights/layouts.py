"""Key layouts of published ResNet checkpoints: detect a flat .pth state dict's layout, extract its ResNets.

A .pth file read by `labeleff_jax.weights.pth.read_pth` is a flat dict whose keys join nested dict keys with
"." (e.g. 'state_dict.module.encoder_q.layer1.0.conv1.weight'). The layouts known here:

- `torchvision`: a torchvision or timm ResNet state dict ('conv1.weight', 'layer1.0.conv1.weight', ...),
  with or without 'fc.*' (torchgeo's SSL4EO-S12 files have none), possibly under 'state_dict.', 'model.'
  or 'module.' (DataParallel) prefixes.
- `moco`: an SSL4EO-S12 MoCo training checkpoint: 'state_dict.module.encoder_q.*' (or without 'module.');
  only encoder_q's backbone is kept: encoder_k (the momentum copy), queue, queue_ptr and encoder_q's MLP
  head 'fc.*' are ignored, and so are 'epoch', 'arch' and 'optimizer.*'.
- `dino`: an SSL4EO-S12 DINO training checkpoint: 'teacher.module.backbone.*' or 'teacher.backbone.*' (DINO
  evaluates the teacher), or a bare 'module.backbone.*'; the student and the DINO heads are ignored.
- `dual_resnet`: the dual ResNet of Scheibenreif et al. (ISPRS 2022): 'backbone1.*' the Sentinel-1 ResNet
  (2 input channels), 'backbone2.*' the Sentinel-2 ResNet (13 input channels), possibly under 'state_dict.'
  and/or 'module.'. Projection heads (Linear, ReLU, Linear: 'fc.0.*', 'fc.2.*') are taken where they are:
  a shared one at the top level ('fc.*'), or one per backbone ('backbone1.fc.*', 'backbone2.fc.*', as in
  SSLTransformerRS's DoubleResNetSimCLR, whose checkpoints are {'state_dict': {...}}).

`extract` returns, per role, a torchvision-named ResNet state dict ('encoder' for the single-encoder
layouts; 's1' and 's2' for the dual one), the dual layout's heads as roles 'projector' (shared),
'projector_s1' and 'projector_s2' ({'0.weight', '0.bias', '2.weight', '2.bias'}), and every checkpoint key
it did not hand to a role, so a caller can report them.
"""

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

LAYOUTS = ("torchvision", "moco", "dino", "dual_resnet")
# Values of config.transfer.source that ask for detection.
AUTO = ("", "auto")

# Wrappers a training script may put around a whole model's state dict: a {'state_dict': ...} checkpoint,
# a `model` attribute (Lightning-style modules), DataParallel's `module`.
_WRAPPERS = tuple(a + b for a in ("", "state_dict.") for b in ("", "module.", "model.", "model.module."))
# The two keys every torchvision/timm ResNet has; their common prefix is where a ResNet sits in a file.
_STEM_KEY = "conv1.weight"
_FIRST_BLOCK_KEY = "layer1.0.conv1.weight"
_MOCO_ROOT = re.compile(r"^(state_dict\.)?(module\.)?encoder_q\.$")
# In order of preference: the teacher is the network DINO evaluates (and the one SSL4EO-S12 released).
_DINO_ROOTS = ("teacher.module.backbone.", "teacher.backbone.", "module.backbone.")
_EXAMPLE_KEYS = {
    "torchvision": "'conv1.weight', 'layer1.0.conv1.weight' (optionally under 'state_dict.' or 'model.')",
    "moco": "'state_dict.module.encoder_q.conv1.weight', 'state_dict.module.encoder_k.conv1.weight'",
    "dino": "'teacher.module.backbone.conv1.weight' (or 'teacher.backbone.', 'module.backbone.')",
    "dual_resnet": "'backbone1.conv1.weight', 'backbone2.conv1.weight' (optionally under 'state_dict.')",
}


class LayoutError(ValueError):
  """A checkpoint whose keys fit no known layout, or not the layout it was said to have."""


@dataclasses.dataclass(frozen=True)
class Extracted:
  """What `extract` found: the layout, the torchvision-named state dict of each role, the ignored keys."""
  layout: str
  roles: dict[str, dict[str, Any]]  # role -> {torchvision key relative to the role's prefix: array}
  prefixes: dict[str, str]  # role -> the checkpoint prefix its keys came from
  ignored: list[str]  # checkpoint keys no role took, in checkpoint order


def resnet_roots(keys: Iterable[str]) -> list[str]:
  """Prefixes P (possibly '') under which a torchvision-named ResNet sits: P + 'conv1.weight' and
  P + 'layer1.0.conv1.weight' are both keys."""
  keys = set(keys)
  roots = {key[:-len(_FIRST_BLOCK_KEY)] for key in keys if key.endswith(_FIRST_BLOCK_KEY)}
  return sorted(root for root in roots if root + _STEM_KEY in keys)


def _match_torchvision(keys, roots) -> dict | None:
  for wrapper in _WRAPPERS:
    if wrapper in roots:
      return {"encoder": wrapper}
  return None


def _match_moco(keys, roots) -> dict | None:
  for root in roots:
    if _MOCO_ROOT.match(root):
      return {"encoder": root}
  return None


def _match_dino(keys, roots) -> dict | None:
  for root in _DINO_ROOTS:
    if root in roots:
      return {"encoder": root}
  return None


def _match_dual(keys, roots) -> dict | None:
  for wrapper in _WRAPPERS:
    if wrapper + "backbone1." in roots and wrapper + "backbone2." in roots:
      found = {"s1": wrapper + "backbone1.", "s2": wrapper + "backbone2."}
      # SSLTransformerRS's DoubleResNetSimCLR gives each backbone its own head (its fc); a shared head
      # would sit at the top level.
      for role, head in (("projector", "fc."), ("projector_s1", "backbone1.fc."),
                         ("projector_s2", "backbone2.fc.")):
        if any(key.startswith(wrapper + head) for key in keys):
          found[role] = wrapper + head
      return found
  return None


# Detection tries the specific layouts first: a MoCo or dual file never has a ResNet at a wrapper prefix,
# but a torchvision file could in principle also hold other networks beside it.
_MATCHERS = {"dual_resnet": _match_dual, "moco": _match_moco, "dino": _match_dino,
             "torchvision": _match_torchvision}


def _check_source(source: str | None) -> str | None:
  if source is None or source in AUTO:
    return None
  if source not in LAYOUTS:
    raise LayoutError(f"unknown checkpoint layout {source!r} (config.transfer.source); known layouts: "
                      f"{', '.join(LAYOUTS)}, or 'auto' to detect")
  return source


def _first_keys(keys: list[str], count: int = 8) -> str:
  shown = ", ".join(repr(key) for key in keys[:count])
  return shown + (f", ... ({len(keys)} keys)" if len(keys) > count else f" ({len(keys)} keys)")


def _matches(keys: list[str]) -> dict[str, dict]:
  roots = resnet_roots(keys)
  found = {}
  for layout, match in _MATCHERS.items():
    prefixes = match(keys, roots)
    if prefixes is not None:
      found[layout] = prefixes
  return found


def detect_layout(state: Mapping[str, Any]) -> str:
  """The name of the layout of a flat state dict (keys joined by '.'); LayoutError when none fits."""
  keys = list(state)
  found = _matches(keys)
  if not found:
    raise LayoutError(
        f"the checkpoint fits no known layout; its first keys: {_first_keys(keys)}. Known layouts: "
        + "; ".join(f"{name} ({example})" for name, example in _EXAMPLE_KEYS.items())
        + ". Set config.transfer.source to the file's layout to skip detection, or re-save the file with the "
        "keys of one of these layouts.")
  return next(iter(found))


def extract(state: Mapping[str, Any], source: str | None = None) -> Extracted:
  """Splits a flat state dict into torchvision-named ResNet state dicts by role.

  `source` forces a layout (config.transfer.source; None, '' or 'auto' detects it); a forced layout the
  keys do not fit is a LayoutError that says which layout detection finds instead.
  """
  forced = _check_source(source)
  keys = list(state)
  if forced is None:
    layout = detect_layout(state)
    prefixes = _matches(keys)[layout]
  else:
    layout = forced
    prefixes = _MATCHERS[forced](keys, resnet_roots(keys))
    if prefixes is None:
      found = list(_matches(keys))
      instead = (f"detection finds {found[0]!r}" if found else "it fits no known layout")
      raise LayoutError(
          f"config.transfer.source={forced!r}, but the checkpoint's keys do not have that layout (expected "
          f"keys like {_EXAMPLE_KEYS[forced]}); {instead}. Its first keys: {_first_keys(keys)}")
  # MoCo's encoder_q carries the MLP projection head as its fc: pretraining-only, not a classifier.
  dropped = {"encoder": prefixes["encoder"] + "fc."} if layout == "moco" else {}
  roles: dict[str, dict[str, Any]] = {role: {} for role in prefixes}
  ignored = []
  # Longest prefix first, so that a role nested inside another's prefix would win its keys.
  ordered = sorted(prefixes.items(), key=lambda item: -len(item[1]))
  for key in keys:
    for role, prefix in ordered:
      if key.startswith(prefix) and not (role in dropped and key.startswith(dropped[role])):
        roles[role][key[len(prefix):]] = state[key]
        break
    else:
      ignored.append(key)
  return Extracted(layout=layout, roles=roles, prefixes=dict(prefixes), ignored=ignored)


def summarize_keys(keys: Iterable[str], max_lines: int = 8) -> list[str]:
  """Short lines for a report: each whole ResNet among `keys` as one 'PREFIX* (N keys)' line (e.g. MoCo's
  encoder_k), the other keys grouped by their leading dotted parts, the deepest grouping that fits in
  `max_lines` lines (so that 'encoder_q.fc.*' shows apart from 'queue')."""
  keys = list(keys)
  lines = []
  for root in resnet_roots(keys):
    under = [key for key in keys if key.startswith(root)]
    lines.append(f"{root}* ({len(under)} keys)")
    keys = [key for key in keys if not key.startswith(root)]
  deepest = max((key.count(".") for key in keys), default=0)
  for depth in range(deepest, -1, -1):
    groups: dict[str, int] = {}
    for key in keys:
      parts = key.split(".")
      group = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "") if depth else "*"
      groups[group] = groups.get(group, 0) + 1
    if len(groups) <= max_lines:
      break
  return lines + [f"{group} ({count} keys)" if count > 1 else group for group, count in groups.items()]
