// CUDA kernels of fae_fast::elastic_field, elastic_warp, elastic_warp_field (one thread per output pixel).
//
// Same float expressions as csrc/cpu/elastic_warp.cpp (shared through fae_common.h, compiled with --fmad=false
// and without fast math), so CPU and CUDA produce the same field for the same seed (the noise bitwise; the
// field up to the last bit of the RMS scale, whose double-precision reduction order differs). No host
// synchronisation: the blur radius ceil(3 * max smoothness) is computed on the device by a tiny kernel, and every
// later kernel reads it from device memory.
//
// Traffic per call over (B, 2, H, W) float32: noise write; vertical blur read (2r + 1 taps, from L1/L2) + write;
// horizontal blur likewise; RMS partial sums read; the warp reads the field, the masks (4 taps, cached) and
// writes the output. The RMS scale is folded into the warp (elastic_warp) or applied in place (elastic_field).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <type_traits>

#include "fae_common.h"

namespace fae_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceChunks = 64;  // partial sums per sample: fixed, so the reduction order is deterministic

inline int blocks_for(int64_t n) { return static_cast<int>((n + kThreads - 1) / kThreads); }

__global__ void noise_kernel(uint64_t seed, int64_t B, int64_t H, int64_t W, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t HW = H * W;
  if (i >= B * HW) return;
  const int64_t b = i / HW, p = i % HW, y = p / W, x = p % W;
  float z0, z1;
  const uint64_t h =
      pixel_hash(seed, static_cast<uint64_t>(b), static_cast<uint64_t>(y), static_cast<uint64_t>(x));
  box_muller(hash_u1(h), hash_u2(h), &z0, &z1);
  out[(b * 2) * HW + p] = z0;
  out[(b * 2 + 1) * HW + p] = z1;
}

// One single-thread block per sample (a few microseconds): the global radius from max(smoothness) (each block
// recomputes it from B floats, so the host never syncs), the radii cropped per axis, and the normalised taps of
// this sample. wy: (B, 2H - 1), wx: (B, 2W - 1).
__global__ void taps_kernel(const float* __restrict__ smooth, int64_t B, int H, int W, float* __restrict__ wy,
                            float* __restrict__ wx, int* __restrict__ radii) {
  const int64_t b = blockIdx.x;
  float smax = 0.f;
  for (int64_t j = 0; j < B; ++j) smax = fmaxf(smax, smooth[j]);
  const int R = gaussian_radius(smax);
  const int ry = R < H - 1 ? R : H - 1, rx = R < W - 1 ? R : W - 1;
  if (b == 0) {
    radii[0] = ry;
    radii[1] = rx;
  }
  gaussian_taps(smooth[b], ry, wy + b * (2 * H - 1));
  gaussian_taps(smooth[b], rx, wx + b * (2 * W - 1));
}

// out[b, c, y, x] = sum_t w[b, t] * in[b, c, reflect(y + t - r), x]; vertical when kVertical, else horizontal.
// r = 0 gives the single tap 1.0f, i.e. an exact copy, so there is no branch on the host.
template <bool kVertical>
__global__ void blur_kernel(const float* __restrict__ in, const float* __restrict__ taps,
                            const int* __restrict__ radii, int64_t B, int H, int W, float* __restrict__ out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t HW = static_cast<int64_t>(H) * W;
  if (i >= B * 2 * HW) return;
  const int64_t plane = i / HW, p = i % HW, b = plane / 2;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p % W);
  const int r = radii[kVertical ? 0 : 1];
  const float* w = taps + b * (kVertical ? 2 * H - 1 : 2 * W - 1);
  const float* src = in + plane * HW;
  float acc = 0.f;
  if (kVertical) {
    for (int t = 0; t <= 2 * r; ++t) acc += w[t] * src[static_cast<int64_t>(reflect_index(y + t - r, H)) * W + x];
  } else {
    const float* row = src + static_cast<int64_t>(y) * W;
    for (int t = 0; t <= 2 * r; ++t) acc += w[t] * row[reflect_index(x + t - r, W)];
  }
  out[i] = acc;
}

// partial[b, chunk] = sum of squares (double) over a fixed strided subset of sample b's 2HW values.
__global__ void sumsq_kernel(const float* __restrict__ f, int64_t n_per_sample, double* __restrict__ partial) {
  __shared__ double buf[kThreads];
  const int64_t b = blockIdx.y;
  const float* src = f + b * n_per_sample;
  double acc = 0.0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n_per_sample;
       i += static_cast<int64_t>(kThreads) * kReduceChunks)
    acc += static_cast<double>(src[i]) * src[i];
  buf[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[b * kReduceChunks + blockIdx.x] = buf[0];
}

__global__ void scale_kernel(const double* __restrict__ partial, const float* __restrict__ alpha, int64_t B,
                             int64_t n_per_sample, float* __restrict__ scale) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  double ss = 0.0;
  for (int c = 0; c < kReduceChunks; ++c) ss += partial[b * kReduceChunks + c];
  double rms = sqrt(ss / static_cast<double>(n_per_sample));
  rms = rms > 1e-12 ? rms : 1e-12;
  scale[b] = static_cast<float>(static_cast<double>(alpha[b]) / rms);
}

__global__ void apply_scale_kernel(float* __restrict__ f, const float* __restrict__ scale, int64_t B,
                                   int64_t n_per_sample) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= B * n_per_sample) return;
  f[i] = f[i] * scale[i / n_per_sample];
}

// Blurred noise (B, 2, H, W), not yet normalised, and alpha / RMS per sample (B,) float32.
std::pair<at::Tensor, at::Tensor> blurred_noise_cuda(const at::Tensor& alpha_in, const at::Tensor& smooth_in,
                                                     int64_t seed, int64_t H, int64_t W) {
  TORCH_CHECK(alpha_in.is_cuda() && smooth_in.is_cuda(), "fae_fast::elastic_field: alpha and smoothness must be "
              "CUDA tensors here");
  TORCH_CHECK(alpha_in.dim() == 1 && smooth_in.dim() == 1 && smooth_in.size(0) == alpha_in.size(0),
              "fae_fast::elastic_field: alpha and smoothness must be (B,), got ", alpha_in.sizes(), " and ",
              smooth_in.sizes());
  TORCH_CHECK(H >= 1 && W >= 1 && H < (1 << 30) && W < (1 << 30),
              "fae_fast::elastic_field: bad image size ", H, "x", W);
  TORCH_CHECK(alpha_in.size(0) < 65536, "fae_fast::elastic_field: batch must be < 65536 (grid y limit), got ",
              alpha_in.size(0));
  const c10::cuda::CUDAGuard guard(alpha_in.device());
  const at::Tensor alpha = alpha_in.to(at::kFloat).contiguous();
  const at::Tensor smooth = smooth_in.to(at::kFloat).contiguous();
  const int64_t B = alpha.size(0);
  auto fopts = alpha.options().dtype(at::kFloat);
  at::Tensor scale = at::empty({B}, fopts);
  at::Tensor a = at::empty({B, 2, H, W}, fopts);
  if (B == 0) return {a, scale};
  at::Tensor tmp = at::empty_like(a);
  at::Tensor wy = at::empty({B, 2 * H - 1}, fopts), wx = at::empty({B, 2 * W - 1}, fopts);
  at::Tensor radii = at::empty({2}, alpha.options().dtype(at::kInt));
  at::Tensor partial = at::empty({B, kReduceChunks}, alpha.options().dtype(at::kDouble));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n = B * H * W, nps = 2 * H * W;

  noise_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<uint64_t>(seed), B, H, W, a.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  taps_kernel<<<static_cast<unsigned>(B), 1, 0, stream>>>(smooth.data_ptr<float>(), B, static_cast<int>(H),
                                                           static_cast<int>(W), wy.data_ptr<float>(),
                                                           wx.data_ptr<float>(), radii.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  blur_kernel<true><<<blocks_for(2 * n), kThreads, 0, stream>>>(a.data_ptr<float>(), wy.data_ptr<float>(),
                                                               radii.data_ptr<int>(), B, static_cast<int>(H),
                                                               static_cast<int>(W), tmp.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  blur_kernel<false><<<blocks_for(2 * n), kThreads, 0, stream>>>(tmp.data_ptr<float>(), wx.data_ptr<float>(),
                                                                radii.data_ptr<int>(), B, static_cast<int>(H),
                                                                static_cast<int>(W), a.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sumsq_kernel<<<dim3(kReduceChunks, static_cast<unsigned>(B)), kThreads, 0, stream>>>(a.data_ptr<float>(), nps,
                                                                                      partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  scale_kernel<<<blocks_for(B), kThreads, 0, stream>>>(partial.data_ptr<double>(), alpha.data_ptr<float>(), B, nps,
                                                       scale.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {a, scale};
}

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

template <typename scalar_t>
__device__ __forceinline__ scalar_t store(acc_type_t<scalar_t> v) {
  if constexpr (std::is_same<scalar_t, uint8_t>::value) {
    const float r = rintf(v);  // round half to even, like torch.round and the CPU kernel's nearbyint
    return static_cast<uint8_t>(r < 0.f ? 0.f : (r > 255.f ? 255.f : r));
  } else {
    return static_cast<scalar_t>(v);
  }
}

// One thread per (b, y, x); the K channels of a sample share the field and the tap weights.
template <typename scalar_t>
__global__ void warp_kernel(const scalar_t* __restrict__ mask, const float* __restrict__ field,
                            const float* __restrict__ scale, scalar_t* __restrict__ out, int64_t B, int64_t K,
                            int H, int W) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t HW = static_cast<int64_t>(H) * W;
  if (i >= B * HW) return;
  const int64_t b = i / HW, p = i % HW;
  const int y = static_cast<int>(p / W), x = static_cast<int>(p % W);
  const float* f = field + b * 2 * HW + p;
  const float s = scale ? scale[b] : 1.f;
  const float ix = static_cast<float>(x) + (scale ? f[0] * s : f[0]);
  const float iy = static_cast<float>(y) + (scale ? f[HW] * s : f[HW]);
  scalar_t* o = out + b * K * HW + p;
  if (!(ix > -1.f && ix < static_cast<float>(W) && iy > -1.f && iy < static_cast<float>(H))) {
    for (int64_t k = 0; k < K; ++k) o[k * HW] = store<scalar_t>(acc_t(0));
    return;
  }
  const float x0f = floorf(ix), y0f = floorf(iy);
  const int x0 = static_cast<int>(x0f), y0 = static_cast<int>(y0f), x1 = x0 + 1, y1 = y0 + 1;
  const acc_t ex = static_cast<acc_t>(ix - x0f), ey = static_cast<acc_t>(iy - y0f);
  const acc_t wnw = (acc_t(1) - ex) * (acc_t(1) - ey), wne = ex * (acc_t(1) - ey);
  const acc_t wsw = (acc_t(1) - ex) * ey, wse = ex * ey;
  const bool vx0 = x0 >= 0, vx1 = x1 < W, vy0 = y0 >= 0, vy1 = y1 < H;
  const scalar_t* m = mask + b * K * HW;
  for (int64_t k = 0; k < K; ++k, m += HW) {
    acc_t v = 0;
    if (vy0 && vx0) v += wnw * static_cast<acc_t>(m[static_cast<int64_t>(y0) * W + x0]);
    if (vy0 && vx1) v += wne * static_cast<acc_t>(m[static_cast<int64_t>(y0) * W + x1]);
    if (vy1 && vx0) v += wsw * static_cast<acc_t>(m[static_cast<int64_t>(y1) * W + x0]);
    if (vy1 && vx1) v += wse * static_cast<acc_t>(m[static_cast<int64_t>(y1) * W + x1]);
    o[k * HW] = store<scalar_t>(v);
  }
}

at::Tensor warp_cuda(const at::Tensor& mask_in, const at::Tensor& field_in, const at::Tensor* scale) {
  TORCH_CHECK(mask_in.dim() == 4, "fae_fast::elastic_warp: mask must be (B, K, H, W), got ", mask_in.sizes());
  const int64_t B = mask_in.size(0), K = mask_in.size(1), H = mask_in.size(2), W = mask_in.size(3);
  TORCH_CHECK(field_in.dim() == 4 && field_in.size(0) == B && field_in.size(1) == 2 && field_in.size(2) == H &&
                  field_in.size(3) == W,
              "fae_fast::elastic_warp: field must be (", B, ", 2, ", H, ", ", W, "), got ", field_in.sizes());
  TORCH_CHECK(mask_in.is_cuda() && field_in.is_cuda() && mask_in.device() == field_in.device(),
              "fae_fast::elastic_warp: mask and field must be on the same CUDA device");
  TORCH_CHECK(H < (1 << 30) && W < (1 << 30), "fae_fast::elastic_warp: image too large");
  const c10::cuda::CUDAGuard guard(mask_in.device());
  const at::Tensor mask = mask_in.contiguous();
  const at::Tensor field = field_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(mask.sizes(), mask.options().memory_format(at::MemoryFormat::Contiguous));
  if (mask.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, mask.scalar_type(), "elastic_warp_cuda", [&] {
    warp_kernel<scalar_t><<<blocks_for(B * H * W), kThreads, 0, stream>>>(
        mask.data_ptr<scalar_t>(), field.data_ptr<float>(), scale ? scale->data_ptr<float>() : nullptr,
        out.data_ptr<scalar_t>(), B, K, static_cast<int>(H), static_cast<int>(W));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor elastic_field_cuda(const at::Tensor& alpha, const at::Tensor& smoothness, int64_t seed, int64_t height,
                              int64_t width) {
  auto [field, scale] = blurred_noise_cuda(alpha, smoothness, seed, height, width);
  const int64_t B = field.size(0), nps = 2 * height * width;
  if (field.numel() == 0) return field;
  apply_scale_kernel<<<blocks_for(B * nps), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      field.data_ptr<float>(), scale.data_ptr<float>(), B, nps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return field;
}

at::Tensor elastic_warp_cuda(const at::Tensor& mask, const at::Tensor& alpha, const at::Tensor& smoothness,
                             int64_t seed) {
  TORCH_CHECK(mask.dim() == 4, "fae_fast::elastic_warp: mask must be (B, K, H, W), got ", mask.sizes());
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == mask.size(0), "fae_fast::elastic_warp: alpha must be (",
              mask.size(0), ",), got ", alpha.sizes());
  auto [field, scale] = blurred_noise_cuda(alpha, smoothness, seed, mask.size(2), mask.size(3));
  return warp_cuda(mask, field, &scale);
}

at::Tensor elastic_warp_field_cuda(const at::Tensor& mask, const at::Tensor& field) {
  return warp_cuda(mask, field, nullptr);
}

}  // namespace
}  // namespace fae_fast

TORCH_LIBRARY_IMPL(fae_fast, CUDA, m) {
  m.impl("elastic_field", &fae_fast::elastic_field_cuda);
  m.impl("elastic_warp", &fae_fast::elastic_warp_cuda);
  m.impl("elastic_warp_field", &fae_fast::elastic_warp_field_cuda);
}
