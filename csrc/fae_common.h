// Shared by the C++ (CPU) and CUDA sources of fae_fast._C: the counter-based random numbers of the elastic
// field, the Gaussian taps and the cubic Bezier evaluation. Everything here is written once and compiled for
// both the host and the device so that the CPU and CUDA kernels produce the same field for the same seed: no
// libm transcendental is used (own log / sincos polynomials), and both sides are compiled without FMA
// contraction or fast math, so the noise is bitwise equal and the blurred field equal up to the order of the
// double-precision RMS reduction.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FAE_HD __host__ __device__ __forceinline__
#else
#define FAE_HD inline
#endif

namespace fae_fast {

// splitmix64 finaliser (Steele et al. 2014): a bijection on 64 bits with full avalanche. Chaining it over the
// coordinates gives a stateless hash of (seed, b, y, x): any pixel's noise is computable independently, in any
// order, on any device (no generator state, no per-thread offsets), which is what makes CPU == CUDA possible.
FAE_HD uint64_t splitmix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

FAE_HD uint64_t pixel_hash(uint64_t seed, uint64_t b, uint64_t y, uint64_t x) {
  return splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ b) ^ y) ^ x);
}

FAE_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FAE_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// Natural log of a normal float u in (0, 1] (Cephes logf: frexp, one reduction to [sqrt(1/2), sqrt(2)), degree-9
// polynomial; ~1 ulp). Our own instead of logf so that CPU and CUDA run the very same float operations (bitwise
// equal with FMA contraction off), and branch-free so the CPU noise loop vectorises (libm calls made the noise
// pass 3x slower than torch.randn).
FAE_HD float log_unit(float u) {
  const uint32_t bits = float_bits(u);
  int e = static_cast<int>((bits >> 23) & 0xFFu) - 126;       // u = m * 2^e, m in [0.5, 1)
  const float m = bits_float((bits & 0x007FFFFFu) | 0x3F000000u);
  const int low = m < 0.707106781186547524f;  // arithmetic, not branches: keeps the CPU loop vectorisable
  e -= low;
  const float x = (m + bits_float(float_bits(m) & (0u - static_cast<uint32_t>(low)))) - 1.0f;  // 2m - 1 or m - 1
  const float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  const float fe = static_cast<float>(e);
  y = y + -2.12194440e-4f * fe;
  y = y + -0.5f * z;
  return (x + y) + 0.693359375f * fe;
}

// sin and cos of 2*pi*u for u in [0, 1): exact quadrant reduction on u itself (u is a multiple of 2^-24, so
// u - q/4 is exact), then the Cephes sinf/cosf polynomials on [-pi/4, pi/4] (~1 ulp). Same reasons as log_unit.
FAE_HD void sincos_2pi(float u, float* s, float* c) {
  const int q = static_cast<int>(4.0f * u + 0.5f);  // nearest quadrant, 0..4
  const float r = u - 0.25f * static_cast<float>(q);  // in [-1/8, 1/8]
  const float x = r * 6.28318530717958647692f;
  const float z = x * x;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  const float sx = ps * z * x + x;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float cx = (pc * z * z - 0.5f * z) + 1.0f;
  // quadrant k: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s); signs flipped through the sign bit
  const int k = q & 3;
  const uint32_t odd = 0u - static_cast<uint32_t>(k & 1);  // all ones in odd quadrants (bitwise select)
  const float s0 = bits_float((float_bits(cx) & odd) | (float_bits(sx) & ~odd));
  const float c0 = bits_float((float_bits(sx) & odd) | (float_bits(cx) & ~odd));
  *s = bits_float(float_bits(s0) ^ (static_cast<uint32_t>(k & 2) << 30));
  *c = bits_float(float_bits(c0) ^ (static_cast<uint32_t>((k + 1) & 2) << 30));
}

// The two 24-bit uniforms of a pixel's hash: u1 in (0, 1] (log(u1) is finite, |z| <= 5.8), u2 in [0, 1).
// 24 bits are exact in float.
FAE_HD float hash_u1(uint64_t h) {
  return static_cast<float>(static_cast<uint32_t>(h >> 40) + 1u) * 5.9604644775390625e-08f;  // 2^-24
}
FAE_HD float hash_u2(uint64_t h) {
  return static_cast<float>(static_cast<uint32_t>((h >> 16) & 0xFFFFFFULL)) * 5.9604644775390625e-08f;
}

// Two independent N(0, 1) numbers (dx and dy noise of one pixel) from its two uniforms, by Box-Muller.
FAE_HD void box_muller(float u1, float u2, float* z0, float* z1) {
  const float r = sqrtf(-2.0f * log_unit(u1));
  float s, c;
  sincos_2pi(u2, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
}

// PyTorch's "reflect" padding (no edge repeat: -1 -> 1, n -> n - 2); valid for one reflection, i.e.
// |overshoot| <= n - 1, which the radius crop (r <= n - 1) guarantees.
FAE_HD int reflect_index(int i, int n) {
  if (i < 0) return -i;
  if (i >= n) return 2 * (n - 1) - i;
  return i;
}

// Radius of the blur as fae_fast.reference.elastic_field defines it: ceil(3 * max smoothness) over the
// batch, then cropped to n - 1 per axis (the kernel is renormalised after the crop).
FAE_HD int gaussian_radius(float max_smoothness) {
  // in double, like the reference's math.ceil(3.0 * float(smax)): ceilf(3.0f * s) differs for s = 1/3, 4/3, ...
  return max_smoothness > 0.f ? static_cast<int>(ceil(3.0 * static_cast<double>(max_smoothness))) : 0;
}

// Normalised taps w[0 .. 2r] of exp(-t^2 / (2 s^2)) for t = -r .. r. Computed in double (identical on both
// platforms to the last float bit in practice) and stored as float.
FAE_HD void gaussian_taps(float smoothness, int r, float* w) {
  const double s = smoothness < 1e-3f ? 1e-3 : static_cast<double>(smoothness);
  double sum = 0.0;
  for (int t = -r; t <= r; ++t) sum += exp(-0.5 * (t / s) * (t / s));
  for (int t = -r; t <= r; ++t) w[t + r] = static_cast<float>(exp(-0.5 * (t / s) * (t / s)) / sum);
}

// torch.linspace(0, 1, n)[i] in float32 (the scalar formula of ATen: first half from 0, second from 1).
FAE_HD float linspace01(int i, int n) {
  const float step = 1.0f / static_cast<float>(n - 1);
  return i < n / 2 ? step * static_cast<float>(i) : 1.0f - step * static_cast<float>(n - 1 - i);
}

// One coordinate of a cubic Bezier at t with the reference's float operation order
// (u^3 c0 + 3 u^2 t c1 + 3 u t^2 c2 + t^3 c3, left to right), so the points match bezier_points bit for bit.
FAE_HD float bezier(float t, float c0, float c1, float c2, float c3) {
  const float u = 1.0f - t;
  const float a = u * u * u * c0;
  const float b = 3.0f * u * u * t * c1;
  const float c = 3.0f * u * t * t * c2;
  const float d = t * t * t * c3;
  return a + b + c + d;
}

// Distance from pixel centre (px, py) to segment a-b, with the reference's float operation order.
FAE_HD float segment_distance(float px, float py, float ax, float ay, float bx, float by) {
  const float dx = bx - ax, dy = by - ay;
  float L2 = dx * dx + dy * dy;
  L2 = L2 < 1e-12f ? 1e-12f : L2;
  float t = ((px - ax) * dx + (py - ay) * dy) / L2;
  t = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);
  const float qx = ax + t * dx - px, qy = ay + t * dy - py;
  return sqrtf(qx * qx + qy * qy);
}

}  // namespace fae_fast
