"""A numpy re-implementation of torch's CPU random generator, for ``torch.randn`` in float32.

``TorchCPUGenerator(seed).randn(shape)`` returns the same numbers, drawn in the same order, as
``torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))``, so ``--seed S`` means what it
means in diffusers. What torch does (aten ``normal_kernel`` / ``normal_fill``, ``CPUGeneratorImpl``):

* the engine is mt19937 seeded with ``init_genrand(seed mod 2**32)``;
* a float tensor of 16 elements or more is filled with 24-bit uniforms ``(u32 & 0xFFFFFF) / 2**24``, one
  32-bit draw each, then turned into normals by Box-Muller in blocks of 16, element j paired with j+8
  (``u1 = 1 - data[j]``, ``u2 = data[j+8]``, radius*cos into j, radius*sin into j+8), in float32; when the
  size is not a multiple of 16 the last 16 elements are redrawn (16 fresh uniforms) and recomputed.
  On x86 torch runs this through ``normal_fill_16_AVX2`` (also on AVX512 CPUs: ``normal_stub`` is not
  dispatched to AVX512), whose log and sincos are avx_mathfun's Cephes polynomials, compiled with FMA
  contraction. We evaluate those same polynomials, operation for operation, FMAs included, so the result
  is bit-identical to torch on x86. (On a CPU without AVX2 torch uses libm's logf/cosf/sinf instead and
  differs from itself on x86 by up to a few ulp; we follow x86.)
* a tensor of fewer than 16 elements takes one double-precision normal per element: two 53-bit uniforms
  from two 64-bit draws (each two 32-bit draws, high word first), Box-Muller in double, the cos value
  returned and the sin value cached in the generator for the next scalar normal (the cache outlives the
  call and is untouched by the vectorised path). Python's ``math`` calls the same libm as torch here.
"""

from __future__ import annotations

import math

import numpy as np

_MT_N = 624


def _mt19937_state(seed: int) -> np.ndarray:
    """init_genrand: the 624-word state torch's ``mt19937(seed)`` starts from."""
    key = np.empty(_MT_N, dtype=np.uint32)
    x = seed & 0xFFFFFFFF
    key[0] = x
    for j in range(1, _MT_N):
        x = (1812433253 * (x ^ (x >> 30)) + j) & 0xFFFFFFFF
        key[j] = x
    return key


class TorchCPUGenerator:
    """Bit-compatible stand-in for ``torch.Generator("cpu").manual_seed(seed)`` (``randn`` only).

    Stateful like torch's: use one per generation call, not one shared between threads.
    """

    def __init__(self, seed: int):
        seed = int(seed) % (1 << 64)  # torch takes the seed as uint64 (negative seeds wrap)
        self.seed = seed
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_state(seed), "pos": _MT_N}}
        self._cached_normal: float | None = None  # torch's next_double_normal_sample

    def _u32(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n).astype(np.uint32)

    def _uniform24(self, n: int) -> np.ndarray:
        """``at::uniform_real_distribution<float>(0, 1)``: the low 24 bits of one draw, over 2**24."""
        return (self._u32(n) & np.uint32(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)

    def _uniform53(self) -> float:
        """``at::uniform_real_distribution<double>(0, 1)``: 53 low bits of a 64-bit draw (high word first)."""
        hi, lo = (int(v) for v in self._u32(2))
        return (((hi << 32) | lo) & ((1 << 53) - 1)) * 2.0**-53

    def _scalar_normal(self) -> float:
        """``at::normal_distribution<double>``: Box-Muller with one value cached for the next call."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        u1 = self._uniform53()
        u2 = self._uniform53()
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape) -> np.ndarray:
        """Standard normals in float32, as ``torch.randn(shape, generator=self)`` on the CPU."""
        shape = (int(shape),) if np.isscalar(shape) else tuple(int(s) for s in shape)
        size = math.prod(shape)
        if size < 16:
            return np.array([self._scalar_normal() for _ in range(size)], dtype=np.float32).reshape(shape)
        data = self._uniform24(size)
        whole = size - size % 16
        data[:whole] = _box_muller_16(data[:whole])
        if size % 16:
            data[size - 16 :] = _box_muller_16(self._uniform24(16))
        return data.reshape(shape)


def fma_float32(a: np.ndarray, b, c) -> np.ndarray:
    """float32 fused multiply-add ``a*b + c``, rounded once, as the compiled AVX2 code does it.

    ``a*b`` is exact in float64, so the float64 sum carries one rounding; rounding that to float32 can only
    differ from the single rounding when the float64 sum sits exactly halfway between two float32 values. Those
    (rare) entries are redone with the exact TwoSum error deciding the side (round-to-odd).
    """
    total = np.multiply(a, b, dtype=np.float64) + np.asarray(c, dtype=np.float64)
    result = total.astype(np.float32)
    # a float32 halfway point has, in float64, a 1 right after the 24 kept bits and zeros below it
    low = total.view(np.int64) & 0x1FFFFFFF
    halfway = low == 0x10000000
    if halfway.any():
        product, c64 = np.broadcast_arrays(np.multiply(a, b, dtype=np.float64), np.asarray(c, np.float64))
        p, q, t = product[halfway], c64[halfway], total[halfway]
        back = t - p
        error = (p - (t - back)) + (q - back)
        odd = np.where(error != 0, np.nextafter(t, np.copysign(np.inf, error)), t)
        result[halfway] = odd.astype(np.float32)
    return result


_F = np.float32
_LOG_P = tuple(_F(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                               1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                               3.3333331174e-1))
_SIN_P = tuple(_F(v) for v in (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1))
_COS_P = tuple(_F(v) for v in (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2))
_SIGN = np.int32(-0x80000000)


def _log_avx(x: np.ndarray) -> np.ndarray:
    """``log256_ps`` (avx_mathfun, Cephes logf) as torch's AVX2 build evaluates it, FMAs included. x > 0."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(np.float32) + _F(1)
    m = ((bits & np.int32(~0x7F800000)) | _F(0.5).view(np.int32)).view(np.float32)  # mantissa in [0.5, 1)
    small = m < _F(0.707106781186547524)
    x = (m - _F(1)) + np.where(small, m, _F(0))
    e = e - np.where(small, _F(1), _F(0))
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:
        y = fma_float32(y, x, p)
    y = fma_float32(y * x, z, e * _F(-2.12194440e-4))
    y = fma_float32(z, _F(-0.5), y)
    return fma_float32(e, _F(0.693359375), x + y)


def _sincos_avx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``sincos256_ps`` (avx_mathfun, Cephes sinf/cosf) as torch's AVX2 build evaluates it. Returns (sin, cos)."""
    sign_sin = x.view(np.int32) & _SIGN
    x = np.abs(x)
    octant = ((x * _F(1.27323954473516)).astype(np.int32) + 1) & ~1  # 4/pi, truncated, rounded up to even
    y = octant.astype(np.float32)
    # extended-precision reduction x - y*pi/4 in three parts (Cody-Waite)
    x = fma_float32(y, _F(-0.78515625), x)
    x = fma_float32(y, _F(-2.4187564849853515625e-4), x)
    x = fma_float32(y, _F(-3.77489497744594108e-8), x)
    sign_sin = sign_sin ^ ((octant & 4) << 29)
    sign_cos = (~(octant - 2) & 4) << 29
    use_sin_poly = (octant & 2) == 0
    z = x * x
    cos_poly = np.full_like(x, _COS_P[0])
    for p in _COS_P[1:]:
        cos_poly = fma_float32(cos_poly, z, p)
    cos_poly = fma_float32(cos_poly * z, z, -(z * _F(0.5))) + _F(1)
    sin_poly = np.full_like(x, _SIN_P[0])
    for p in _SIN_P[1:]:
        sin_poly = fma_float32(sin_poly, z, p)
    sin_poly = fma_float32(sin_poly * z, x, x)
    sin = np.where(use_sin_poly, sin_poly, cos_poly)
    cos = np.where(use_sin_poly, cos_poly, sin_poly)
    return (sin.view(np.int32) ^ sign_sin).view(np.float32), (cos.view(np.int32) ^ sign_cos).view(np.float32)


def _box_muller_16(uniforms: np.ndarray) -> np.ndarray:
    """aten ``normal_fill_16_AVX2`` over consecutive blocks of 16 float32 uniforms (j paired with j+8)."""
    blocks = uniforms.reshape(-1, 2, 8)
    u1 = (_F(1) - blocks[:, 0]).reshape(-1)  # [0, 1) -> (0, 1] for the log; contiguous for speed
    radius = np.sqrt(_F(-2) * _log_avx(u1))
    sin, cos = _sincos_avx(_F(2 * math.pi) * blocks[:, 1].reshape(-1))
    return np.stack([(radius * cos).reshape(-1, 8), (radius * sin).reshape(-1, 8)], axis=1).reshape(-1)
