// CPU (OpenMP through at::parallel_for) kernels of fae_fast::elastic_field, elastic_warp, elastic_warp_field.
//
// Semantics: fae_fast.reference.elastic_field / elastic_warp, except that the white noise comes from the
// counter hash of fae_common.h (identical on CUDA) instead of torch.Generator.
//
// Passes over (B, 2, H, W) float32: noise (write), vertical blur (read + write), horizontal blur (read + write),
// sum of squares (read); the warp then reads the field once and the masks ~once (bilinear taps hit cache) and
// writes the output once. The RMS scale is folded into the warp instead of a separate pass.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "fae_common.h"

namespace fae_fast {
namespace {

// Rows (of W floats) per parallel task: small enough to balance 2..64 threads on 256^2 images.
constexpr int64_t kRowGrain = 16;

// Inner row loops, cloned for AVX2 with runtime dispatch (GCC target_clones -> ifunc). AVX2 without FMA: the
// products and sums round exactly as in the default SSE2 clone and in the CUDA kernel (--fmad=false), so the
// result does not depend on the machine. With the branch-free Box-Muller of fae_common.h this took the noise
// pass of 16 x 256^2 from ~25 ms to ~2 ms on 2 shared EPYC cores (torch.randn of the same size: ~10 ms).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FAE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FAE_CLONES
#endif

// dst[x] += w * src[x] for x < n (one tap of a separable blur; vectorises over x)
FAE_CLONES void axpy_row(float* __restrict__ dst, const float* __restrict__ src, float w, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] += w * src[x];
}

// dst[x] = sum_t w[t] * pad[x + t], t < taps, accumulated tap by tap (same order as the CUDA kernel)
FAE_CLONES void conv_row(float* __restrict__ dst, const float* __restrict__ pad, const float* __restrict__ w,
                         int taps, int64_t n) {
  for (int64_t x = 0; x < n; ++x) dst[x] = 0.f;
  for (int t = 0; t < taps; ++t) {
    const float wt = w[t];
    const float* s = pad + t;
    for (int64_t x = 0; x < n; ++x) dst[x] += wt * s[x];
  }
}

// Noise of one row: (dx, dy) of pixels (b, y, 0 .. n-1). The 64-bit hashes are computed in a scalar loop (AVX2
// has no 64-bit multiply) into small uniform buffers, then Box-Muller runs as a branch-free float loop that the
// compiler vectorises 8 wide.
FAE_CLONES void noise_row(uint64_t seed, uint64_t b, uint64_t y, int64_t n, float* __restrict__ o0,
                          float* __restrict__ o1) {
  constexpr int64_t kChunk = 256;
  float u1[kChunk], u2[kChunk];
  const uint64_t hy = splitmix64(splitmix64(splitmix64(seed) ^ b) ^ y);  // = pixel_hash up to the last round
  for (int64_t x0 = 0; x0 < n; x0 += kChunk) {
    const int64_t m = std::min(kChunk, n - x0);
    for (int64_t i = 0; i < m; ++i) {
      const uint64_t h = splitmix64(hy ^ static_cast<uint64_t>(x0 + i));
      u1[i] = hash_u1(h);
      u2[i] = hash_u2(h);
    }
    for (int64_t i = 0; i < m; ++i) box_muller(u1[i], u2[i], o0 + x0 + i, o1 + x0 + i);
  }
}

void check_params(const at::Tensor& alpha, const at::Tensor& smoothness, int64_t height, int64_t width) {
  TORCH_CHECK(alpha.dim() == 1, "fae_fast::elastic_field: alpha must be (B,), got ", alpha.sizes());
  TORCH_CHECK(smoothness.dim() == 1 && smoothness.size(0) == alpha.size(0),
              "fae_fast::elastic_field: smoothness must be (B,) like alpha, got ", smoothness.sizes());
  TORCH_CHECK(height >= 1 && width >= 1, "fae_fast::elastic_field: height and width must be >= 1, got ", height,
              "x", width);
  TORCH_CHECK(height < (1 << 30) && width < (1 << 30), "fae_fast::elastic_field: image too large");
}

// Blurred noise (B, 2, H, W), not yet normalised, and the per-sample factor alpha / RMS (B,) float32.
std::pair<at::Tensor, at::Tensor> blurred_noise_cpu(const at::Tensor& alpha_in, const at::Tensor& smooth_in,
                                                    int64_t seed, int64_t H, int64_t W) {
  check_params(alpha_in, smooth_in, H, W);
  const at::Tensor alpha = alpha_in.to(at::kFloat).contiguous();
  const at::Tensor smooth = smooth_in.to(at::kFloat).contiguous();
  const int64_t B = alpha.size(0);
  const float* sp = smooth.data_ptr<float>();
  float smax = 0.f;
  for (int64_t b = 0; b < B; ++b) smax = std::max(smax, sp[b]);
  const int R = gaussian_radius(smax);
  const int ry = static_cast<int>(std::min<int64_t>(R, H - 1));
  const int rx = static_cast<int>(std::min<int64_t>(R, W - 1));
  const int ny = 2 * ry + 1, nx = 2 * rx + 1;
  std::vector<float> wy(B * ny), wx(B * nx);
  for (int64_t b = 0; b < B; ++b) {
    gaussian_taps(sp[b], ry, wy.data() + b * ny);
    gaussian_taps(sp[b], rx, wx.data() + b * nx);
  }

  auto opts = alpha.options().dtype(at::kFloat);
  at::Tensor noise = at::empty({B, 2, H, W}, opts);
  float* np = noise.data_ptr<float>();
  const uint64_t useed = static_cast<uint64_t>(seed);
  const int64_t HW = H * W;
  at::parallel_for(0, B * H, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      float* o0 = np + (b * 2) * HW + y * W;
      float* o1 = o0 + HW;
      noise_row(useed, static_cast<uint64_t>(b), static_cast<uint64_t>(y), W, o0, o1);
    }
  });

  at::Tensor cur = noise;
  if (ry > 0) {  // vertical pass: out row y = sum_t w[t] * in row reflect(y + t - ry); vectorises over x
    at::Tensor out = at::empty_like(cur);
    const float* in = cur.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, B * 2 * H, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t plane = row / H, y = row % H, b = plane / 2;
        const float* w = wy.data() + b * ny;
        const float* src = in + plane * HW;
        float* dst = op + plane * HW + y * W;
        std::fill(dst, dst + W, 0.f);
        for (int t = 0; t < ny; ++t) {
          axpy_row(dst, src + reflect_index(static_cast<int>(y) + t - ry, static_cast<int>(H)) * W, w[t], W);
        }
      }
    });
    cur = out;
  }
  if (rx > 0) {  // horizontal pass on a reflect-padded copy of the row, so the inner loop has no index logic
    at::Tensor out = (cur.data_ptr() == noise.data_ptr()) ? at::empty_like(cur) : noise;
    const float* in = cur.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, B * 2 * H, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> pad(W + 2 * rx);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t plane = row / H, b = plane / 2;
        const float* w = wx.data() + b * nx;
        const float* src = in + row * W;
        float* dst = op + row * W;
        for (int64_t i = 0; i < W + 2 * rx; ++i)
          pad[i] = src[reflect_index(static_cast<int>(i) - rx, static_cast<int>(W))];
        conv_row(dst, pad.data(), w, nx, W);
      }
    });
    cur = out;
  }

  // RMS over (2, H, W) per sample: row sums in double, then a fixed-order sum per sample (deterministic for any
  // thread count).
  std::vector<double> rows(B * 2 * H);
  const float* cp = cur.data_ptr<float>();
  at::parallel_for(0, B * 2 * H, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* s = cp + row * W;
      double acc = 0.0;
      for (int64_t x = 0; x < W; ++x) acc += static_cast<double>(s[x]) * s[x];
      rows[row] = acc;
    }
  });
  at::Tensor scale = at::empty({B}, opts);
  const float* ap = alpha.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    double ss = 0.0;
    for (int64_t r = 0; r < 2 * H; ++r) ss += rows[b * 2 * H + r];
    const double rms = std::max(std::sqrt(ss / static_cast<double>(2 * HW)), 1e-12);
    scale.data_ptr<float>()[b] = static_cast<float>(static_cast<double>(ap[b]) / rms);
  }
  return {cur, scale};
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t>
scalar_t store(acc_type_t<scalar_t> v) {
  if constexpr (std::is_same<scalar_t, uint8_t>::value) {
    // torch.round is round-half-to-even; adding and subtracting 1.5 * 2^23 rounds a float in [0, 2^22) to an
    // integer half-to-even in the default rounding mode, with no libm call (nearbyint saves the FP environment)
    const float c = v < 0.f ? 0.f : (v > 255.f ? 255.f : v);
    return static_cast<uint8_t>((c + 12582912.0f) - 12582912.0f);
  } else {
    return static_cast<scalar_t>(v);
  }
}

// One output row of one sample: out[k, x] = bilinear(mask[k], x + s*dx[x], y + s*dy[x]), zeros outside.
// Branch-free (taps outside the image get weight 0 and a clamped, valid index), so for float masks the
// compiler turns the four taps into AVX2 gathers.
template <typename scalar_t>
FAE_CLONES void warp_row(const scalar_t* __restrict__ mask, const float* __restrict__ fx, const float* __restrict__ fy,
                         float s, bool scaled, int64_t y, int64_t K, int64_t H, int64_t W, scalar_t* __restrict__ out) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t HW = H * W;
  const float fyv = static_cast<float>(y);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* m = mask + k * HW;
    scalar_t* o = out + k * HW;
    for (int64_t x = 0; x < W; ++x) {
      const float dx = scaled ? fx[x] * s : fx[x], dy = scaled ? fy[x] * s : fy[x];
      float ix = static_cast<float>(x) + dx, iy = fyv + dy;
      // outside (-1, W) x (-1, H) every tap reads zero padding; clamping there (and NaN -> -1) keeps the
      // index arithmetic in range and the result 0
      ix = ix > -1.f ? (ix < static_cast<float>(W) ? ix : static_cast<float>(W)) : -1.f;
      iy = iy > -1.f ? (iy < static_cast<float>(H) ? iy : static_cast<float>(H)) : -1.f;
      // floor without a libm call (std::floor is not inlined without SSE4.1): truncate, step down below zero
      int x0 = static_cast<int>(ix), y0 = static_cast<int>(iy);
      x0 -= static_cast<float>(x0) > ix;
      y0 -= static_cast<float>(y0) > iy;
      const float x0f = static_cast<float>(x0), y0f = static_cast<float>(y0);
      const int x1 = x0 + 1, y1 = y0 + 1;
      // grid_sample's weights: nw = (x1 - ix)(y1 - iy), ne = (ix - x0)(y1 - iy), ...
      const acc_t ex = static_cast<acc_t>(ix - x0f), ey = static_cast<acc_t>(iy - y0f);
      const acc_t vx0 = (x0 >= 0) & (x0 < W), vx1 = x1 < W, vy0 = (y0 >= 0) & (y0 < H), vy1 = y1 < H;
      const acc_t wx0 = (acc_t(1) - ex) * vx0, wx1 = ex * vx1, wy0 = (acc_t(1) - ey) * vy0, wy1 = ey * vy1;
      // x0 in [-1, W], x1 in [0, W + 1]: clamp both into the image (their weight is already 0 when outside)
      const int64_t cx0 = x0 < 0 ? 0 : (x0 >= W ? W - 1 : x0), cx1 = x1 >= W ? W - 1 : x1;
      const int64_t cy0 = y0 < 0 ? 0 : (y0 >= H ? H - 1 : y0), cy1 = y1 >= H ? H - 1 : y1;
      acc_t v = wx0 * wy0 * static_cast<acc_t>(m[cy0 * W + cx0]);
      v += wx1 * wy0 * static_cast<acc_t>(m[cy0 * W + cx1]);
      v += wx0 * wy1 * static_cast<acc_t>(m[cy1 * W + cx0]);
      v += wx1 * wy1 * static_cast<acc_t>(m[cy1 * W + cx1]);
      o[x] = store<scalar_t>(v);
    }
  }
}

template <typename scalar_t>
void warp_kernel(const scalar_t* mask, const float* field, const float* scale, scalar_t* out, int64_t B,
                 int64_t K, int64_t H, int64_t W) {
  const int64_t HW = H * W;
  at::parallel_for(0, B * H, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const float* fx = field + b * 2 * HW + y * W;
      warp_row<scalar_t>(mask + b * K * HW, fx, fx + HW, scale ? scale[b] : 1.f, scale != nullptr, y, K, H, W,
                         out + b * K * HW + y * W);
    }
  });
}

at::Tensor warp_cpu(const at::Tensor& mask_in, const at::Tensor& field_in, const at::Tensor* scale) {
  TORCH_CHECK(mask_in.dim() == 4, "fae_fast::elastic_warp: mask must be (B, K, H, W), got ", mask_in.sizes());
  const int64_t B = mask_in.size(0), K = mask_in.size(1), H = mask_in.size(2), W = mask_in.size(3);
  TORCH_CHECK(field_in.dim() == 4 && field_in.size(0) == B && field_in.size(1) == 2 && field_in.size(2) == H &&
                  field_in.size(3) == W,
              "fae_fast::elastic_warp: field must be (", B, ", 2, ", H, ", ", W, "), got ", field_in.sizes());
  TORCH_CHECK(field_in.is_floating_point(), "fae_fast::elastic_warp: field must be floating point");
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor field = field_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, mask.scalar_type(), "elastic_warp_cpu", [&] {
    warp_kernel<scalar_t>(mask.data_ptr<scalar_t>(), field.data_ptr<float>(),
                          scale ? scale->data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), B, K, H, W);
  });
  return out;
}

at::Tensor elastic_field_cpu(const at::Tensor& alpha, const at::Tensor& smoothness, int64_t seed, int64_t height,
                             int64_t width) {
  auto [field, scale] = blurred_noise_cpu(alpha, smoothness, seed, height, width);
  // same float product as the fused scale in the warp, so warp(field op) == elastic_warp bit for bit
  return field.mul_(scale.view({-1, 1, 1, 1}));
}

at::Tensor elastic_warp_cpu(const at::Tensor& mask, const at::Tensor& alpha, const at::Tensor& smoothness,
                            int64_t seed) {
  TORCH_CHECK(mask.dim() == 4, "fae_fast::elastic_warp: mask must be (B, K, H, W), got ", mask.sizes());
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == mask.size(0), "fae_fast::elastic_warp: alpha must be (",
              mask.size(0), ",), got ", alpha.sizes());
  auto [field, scale] = blurred_noise_cpu(alpha, smoothness, seed, mask.size(2), mask.size(3));
  return warp_cpu(mask, field, &scale);
}

at::Tensor elastic_warp_field_cpu(const at::Tensor& mask, const at::Tensor& field) {
  return warp_cpu(mask, field, nullptr);
}

}  // namespace
}  // namespace fae_fast

TORCH_LIBRARY_IMPL(fae_fast, CPU, m) {
  m.impl("elastic_field", &fae_fast::elastic_field_cpu);
  m.impl("elastic_warp", &fae_fast::elastic_warp_cpu);
  m.impl("elastic_warp_field", &fae_fast::elastic_warp_field_cpu);
}
