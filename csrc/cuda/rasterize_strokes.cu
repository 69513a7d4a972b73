// CUDA kernel of fae_fast::rasterize_strokes: 16x16 pixel tiles with per-tile segment culling.
//
// Same float expressions as the reference and the CPU kernel (fae_common.h, --fmad=false). A first kernel
// flattens the curves (one thread per point); the raster kernel gives each block one 16x16 tile of one sample:
// the block streams the sample's segments through shared memory 256 at a time, keeps those whose bounding box
// (inflated by w/2 + 1) touches the tile (shared-memory compaction), and each thread then takes the max
// coverage over the kept ones only. The order of the kept list depends on atomics, but a max is exact in any
// order, so the output is deterministic. Traffic: the (B, 1, H, W) float32 output is written once.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "fae_common.h"

namespace fae_fast {
namespace {

constexpr int kTile = 16;
constexpr int kBlock = kTile * kTile;

// pts[b, s, i] = Bezier(ctrl[b, s], linspace(0, 1, T)[i]), (x, y).
__global__ void bezier_kernel(const float* __restrict__ ctrl, int64_t BS, int T, float* __restrict__ pts) {
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= BS * T) return;
  const int64_t bs = j / T;
  const int i = static_cast<int>(j % T);
  const float* c = ctrl + bs * 8;
  const float t = linspace01(i, T);
  pts[j * 2] = bezier(t, c[0], c[2], c[4], c[6]);
  pts[j * 2 + 1] = bezier(t, c[1], c[3], c[5], c[7]);
}

__global__ void raster_kernel(const float* __restrict__ pts, const float* __restrict__ width, int64_t S, int T,
                              int H, int W, float* __restrict__ out) {
  __shared__ float4 seg_ab[kBlock];  // ax, ay, bx, by of the kept segments
  __shared__ float seg_c[kBlock];    // w/2 + 0.5
  __shared__ int n_kept;
  const int64_t b = blockIdx.z;
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int x = blockIdx.x * kTile + tx, y = blockIdx.y * kTile + ty;
  // tile bounds in pixel-centre coordinates
  const float tx0 = static_cast<float>(blockIdx.x * kTile), tx1 = tx0 + (kTile - 1);
  const float ty0 = static_cast<float>(blockIdx.y * kTile), ty1 = ty0 + (kTile - 1);
  const int64_t n_seg = S * (T - 1);
  const float fx = static_cast<float>(x), fy = static_cast<float>(y);
  float cov = 0.f;
  for (int64_t base = 0; base < n_seg; base += kBlock) {
    if (threadIdx.x == 0) n_kept = 0;
    __syncthreads();
    const int64_t j = base + threadIdx.x;
    if (j < n_seg) {
      const int64_t s = j / (T - 1);
      const int i = static_cast<int>(j % (T - 1));
      const float w = width[b * S + s];
      if (w > 0.f) {  // also skips NaN widths
        const float* p = pts + ((b * S + s) * T + i) * 2;
        const float ax = p[0], ay = p[1], bx = p[2], by = p[3];
        const float m = w * 0.5f + 1.0f;
        if (fminf(ax, bx) - m <= tx1 && fmaxf(ax, bx) + m >= tx0 && fminf(ay, by) - m <= ty1 &&
            fmaxf(ay, by) + m >= ty0) {
          const int slot = atomicAdd(&n_kept, 1);
          seg_ab[slot] = make_float4(ax, ay, bx, by);
          seg_c[slot] = w * 0.5f + 0.5f;
        }
      }
    }
    __syncthreads();
    const int n = n_kept;
    for (int k = 0; k < n; ++k) {
      const float4 g = seg_ab[k];
      float v = seg_c[k] - segment_distance(fx, fy, g.x, g.y, g.z, g.w);
      v = v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
      cov = fmaxf(cov, v);
    }
    __syncthreads();  // before the next chunk overwrites the list
  }
  if (x < W && y < H) out[(b * H + y) * static_cast<int64_t>(W) + x] = cov;
}

at::Tensor rasterize_strokes_cuda(const at::Tensor& ctrl_in, const at::Tensor& width_in, int64_t H, int64_t W,
                                  int64_t samples) {
  TORCH_CHECK(ctrl_in.dim() == 4 && ctrl_in.size(2) == 4 && ctrl_in.size(3) == 2,
              "fae_fast::rasterize_strokes: ctrl must be (B, S, 4, 2), got ", ctrl_in.sizes());
  TORCH_CHECK(width_in.dim() == 2 && width_in.size(0) == ctrl_in.size(0) && width_in.size(1) == ctrl_in.size(1),
              "fae_fast::rasterize_strokes: width must be (B, S), got ", width_in.sizes());
  TORCH_CHECK(ctrl_in.is_cuda() && width_in.is_cuda() && ctrl_in.device() == width_in.device(),
              "fae_fast::rasterize_strokes: ctrl and width must be on the same CUDA device");
  TORCH_CHECK(H >= 1 && W >= 1 && H < (1 << 30) && W < (1 << 30), "fae_fast::rasterize_strokes: bad size ", H, "x",
              W);
  TORCH_CHECK(samples >= 2 && samples < (1 << 30), "fae_fast::rasterize_strokes: samples must be >= 2, got ",
              samples);
  TORCH_CHECK(ctrl_in.size(0) < 65536, "fae_fast::rasterize_strokes: batch must be < 65536 (grid z limit)");
  const c10::cuda::CUDAGuard guard(ctrl_in.device());
  const at::Tensor ctrl = ctrl_in.to(at::kFloat).contiguous();
  const at::Tensor width = width_in.to(at::kFloat).contiguous();
  const int64_t B = ctrl.size(0), S = ctrl.size(1);
  const int T = static_cast<int>(samples);
  if (B == 0 || S == 0) return at::zeros({B, 1, H, W}, ctrl.options());
  at::Tensor out = at::empty({B, 1, H, W}, ctrl.options());
  at::Tensor pts = at::empty({B, S, T, 2}, ctrl.options());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t n_pts = B * S * T;
  bezier_kernel<<<static_cast<unsigned>((n_pts + 255) / 256), 256, 0, stream>>>(ctrl.data_ptr<float>(), B * S, T,
                                                                                 pts.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>((W + kTile - 1) / kTile), static_cast<unsigned>((H + kTile - 1) / kTile),
                  static_cast<unsigned>(B));
  TORCH_CHECK(grid.y < 65536, "fae_fast::rasterize_strokes: height too large for the tile grid");
  raster_kernel<<<grid, kBlock, 0, stream>>>(pts.data_ptr<float>(), width.data_ptr<float>(), S, T,
                                             static_cast<int>(H), static_cast<int>(W), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace fae_fast

TORCH_LIBRARY_IMPL(fae_fast, CUDA, m) { m.impl("rasterize_strokes", &fae_fast::rasterize_strokes_cuda); }
