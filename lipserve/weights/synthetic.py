"""Deterministic synthetic weights, fixed by each tensor's state_dict key.

The rule (the one the reference goldens were made with, tests/reference/README.md, so our networks get the
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


def _affine(key: str, shape: tuple[int, ...]) -> tuple[float | None, float]:
    """(offset, scale) of the rule for a key: values = offset + scale * u (offset None: scale * u)."""
    if key.endswith("weight_g") or (len(shape) == 1 and key.endswith("weight")):
        return 1.0, 0.1
    if key.endswith("bias") or len(shape) <= 1:
        return None, 0.1
    return None, math.sqrt(3.0 / int(np.prod(shape[1:])))


def _constant(key: str) -> tuple[type, float] | None:
    if key.endswith("num_batches_tracked"):
        return np.int64, 0
    if key.endswith("running_mean"):
        return np.float32, 0.0
    if key.endswith("running_var"):
        return np.float32, 1.0
    return None


# Elements per block of the fast fill: its uint64/float64 temporaries (3 x 512 KiB) stay in cache,
# where the whole-array version streamed a dozen arrays of 8 bytes per weight through memory.
_BLOCK = 1 << 16
_PARALLEL_MIN = 1 << 20  # tensors this large are filled by several threads (numpy releases the GIL)


def _fill_range(out: np.ndarray, key: str, offset: float | None, scale: float, lo: int, hi: int) -> None:
    """out[lo:hi] (flat float32) = the rule's values for elements lo..hi of `key`, exactly as
    `key_uniforms` + `synthetic_value` compute them (same integer and float64 steps, in place)."""
    base = (zlib.crc32(key.encode("utf-8")) << 32) + int(_GOLDEN)
    index = np.arange(min(_BLOCK, hi - lo), dtype=np.uint64)
    z = np.empty_like(index)
    t = np.empty_like(index)
    f = np.empty(index.size, dtype=np.float64)
    s30, s27, s31, s11 = (np.uint64(n) for n in (30, 27, 31, 11))
    with np.errstate(over="ignore"):
        for start in range(lo, hi, _BLOCK):
            n = min(_BLOCK, hi - start)
            zn, tn, fn = z[:n], t[:n], f[:n]
            np.add(index[:n], np.uint64((base + start) % (1 << 64)), out=zn)
            np.right_shift(zn, s30, out=tn)
            np.bitwise_xor(zn, tn, out=zn)
            np.multiply(zn, _MIX1, out=zn)
            np.right_shift(zn, s27, out=tn)
            np.bitwise_xor(zn, tn, out=zn)
            np.multiply(zn, _MIX2, out=zn)
            np.right_shift(zn, s31, out=tn)
            np.bitwise_xor(zn, tn, out=zn)
            np.right_shift(zn, s11, out=zn)
            fn[:] = zn
            np.multiply(fn, 2.0 / float(1 << 53), out=fn)
            np.subtract(fn, 1.0, out=fn)
            if offset is None:
                np.multiply(fn, scale, out=fn)
            else:
                np.multiply(fn, scale, out=fn)
                np.add(fn, offset, out=fn)
            out[start:start + n] = fn


def fill_values(out: np.ndarray, key: str, pool=None) -> np.ndarray:
    """Write the rule's values for `key` into `out` (a C-contiguous float32 array of the tensor's
    shape), in place; with a thread pool, large tensors are filled in parallel slices."""
    if out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError("fill_values needs a C-contiguous float32 array")
    shape = tuple(out.shape)
    constant = _constant(key)
    if constant is not None:
        out[...] = constant[1]
        return out
    offset, scale = _affine(key, shape)
    flat = out.reshape(-1)
    workers = getattr(pool, "_max_workers", 1) if pool is not None else 1
    if workers > 1 and flat.size >= _PARALLEL_MIN:
        step = -(-flat.size // workers)
        step = -(-step // _BLOCK) * _BLOCK
        futures = [pool.submit(_fill_range, flat, key, offset, scale, lo, min(flat.size, lo + step))
                   for lo in range(0, flat.size, step)]
        for future in futures:
            future.result()
    else:
        _fill_range(flat, key, offset, scale, 0, flat.size)
    return out


def synthetic_value(key: str, shape: tuple[int, ...]) -> np.ndarray:
    shape = tuple(int(d) for d in shape)
    constant = _constant(key)
    if constant is not None:
        return np.full(shape, constant[1], dtype=constant[0])
    return fill_values(np.empty(shape, dtype=np.float32), key)


def synthetic_state_dict(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The rule applied to every key of a {key: shape} mapping (a manifest or a module's state_dict)."""
    return {k: torch.from_numpy(synthetic_value(k, tuple(s))) for k, s in shapes.items()}


def fill_synthetic(module: torch.nn.Module, threads: int | None = None) -> torch.nn.Module:
    """Give `module` the synthetic weights for its own keys (strict).

    In place, one tensor at a time (a whole synthetic state_dict of WavLM-Large would double peak
    memory: state_dict() tensors share storage with the parameters); float32 CPU tensors are
    written directly, large ones by `threads` threads (default: torch's intra-op thread count)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, threads or torch.get_num_threads())
    with torch.no_grad(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="synthetic") as pool:
        for key, tensor in module.state_dict().items():
            direct = (tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous()
                      and _constant(key) is None)
            if direct:
                fill_values(tensor.numpy(), key, pool)
            else:
                tensor.copy_(torch.from_numpy(synthetic_value(key, tuple(tensor.shape))))
    return module
