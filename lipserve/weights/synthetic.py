"""Deterministic synthetic weights, fixed by each tensor's state_dict key.

The rule (the same one ../shared/reference/detinit.py specifies, so our networks get the
exact weights the reference goldens were made with):

* counters `num_batches_tracked` are 0, `running_mean` 0, `running_var` 1;
* u = a stream of uniforms in [-1, 1) seeded by crc32(key): element i is the top 53 bits
  of splitmix64((crc32(key) << 32) + i), scaled to [0, 1) then to [-1, 1);
* `weight_g`, and 1-D tensors named `weight` (norm scales): 1 + 0.1 u;
* names ending in `bias`, and any other tensor of rank <= 1: 0.1 u;
* everything else: u * sqrt(3 / fan_in), fan_in = product of all but the first dim.

Output made with these weights is NOT meaningful speech or video; it only exercises the
real architectures. Whoever uses it must say so (`synthetic_weights: true`).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def key_uniforms(key: str, count: int) -> np.ndarray:
    """`count` float64 values in [-1, 1), a pure function of `key`."""
    seed = np.uint64(zlib.crc32(key.encode("utf-8"))) << np.uint64(32)
    with np.errstate(over="ignore"):
        z = np.arange(count, dtype=np.uint64) + seed + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z ^= z >> np.uint64(31)
    top53 = z >> np.uint64(11)
    return top53.astype(np.float64) * (2.0 / float(1 << 53)) - 1.0


def synthetic_value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    count = int(np.prod(shape)) if shape else 1
    if key.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    if key.endswith("running_mean"):
        return np.zeros(shape, dtype=np.float32)
    if key.endswith("running_var"):
        return np.ones(shape, dtype=np.float32)
    u = key_uniforms(key, count).reshape(shape)
    if key.endswith("weight_g") or (len(shape) == 1 and key.endswith("weight")):
        values = 1.0 + 0.1 * u
    elif key.endswith("bias") or len(shape) <= 1:
        values = 0.1 * u
    else:
        values = u * math.sqrt(3.0 / int(np.prod(shape[1:])))
    return values.astype(np.float32)


def synthetic_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The rule applied to every key of a {key: shape} mapping (a manifest or a module's state_dict)."""
    return {k: torch.from_numpy(synthetic_value(k, tuple(s))) for k, s in shapes.items()}


def fill_synthetic(module: torch.nn.Module) -> torch.nn.Module:
    """Give `module` the synthetic weights for its own keys (strict)."""
    # one tensor at a time, in place: a whole synthetic state_dict of WavLM-Large would
    # double peak memory (state_dict() tensors share storage with the parameters)
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            tensor.copy_(torch.from_numpy(synthetic_value(key, tuple(tensor.shape))))
    return module
