// CPU (OpenMP through at::parallel_for) kernel of fae_fast::rasterize_strokes.
//
// Semantics: fae_fast.reference.rasterize_strokes (cubic Bezier flattened into samples - 1 segments, coverage
// clamp(w/2 + 0.5 - d, 0, 1), max over strokes, widths <= 0 draw nothing), with the reference's float
// operation order so the result matches it to the last bits. Unlike the reference, which evaluates every
// segment at every pixel (S * (samples - 1) * H * W distance evaluations), each row only visits the segments
// whose bounding box, inflated by w/2 + 1, contains it, and only the columns inside that box: the cost is
// proportional to the stroke area, not the image area. Max over segments is exact (monotone clamp), so the
// culling changes nothing in the result.
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "fae_common.h"

namespace fae_fast {
namespace {

struct Segment {
  float ax, ay, bx, by;  // end points
  float c;               // w/2 + 0.5: coverage = clamp(c - d, 0, 1)
  float x0, x1, y0, y1;  // bounding box inflated by w/2 + 1
};

at::Tensor rasterize_strokes_cpu(const at::Tensor& ctrl_in, const at::Tensor& width_in, int64_t H, int64_t W,
                                 int64_t samples) {
  TORCH_CHECK(ctrl_in.dim() == 4 && ctrl_in.size(2) == 4 && ctrl_in.size(3) == 2,
              "fae_fast::rasterize_strokes: ctrl must be (B, S, 4, 2), got ", ctrl_in.sizes());
  TORCH_CHECK(width_in.dim() == 2 && width_in.size(0) == ctrl_in.size(0) && width_in.size(1) == ctrl_in.size(1),
              "fae_fast::rasterize_strokes: width must be (B, S), got ", width_in.sizes());
  TORCH_CHECK(H >= 1 && W >= 1, "fae_fast::rasterize_strokes: height and width_px must be >= 1");
  TORCH_CHECK(samples >= 2, "fae_fast::rasterize_strokes: samples must be >= 2, got ", samples);
  const at::Tensor ctrl = ctrl_in.to(at::kFloat).contiguous();
  const at::Tensor width = width_in.to(at::kFloat).contiguous();
  const int64_t B = ctrl.size(0), S = ctrl.size(1), T = samples, NS = T - 1;
  at::Tensor out = at::zeros({B, 1, H, W}, ctrl.options());
  if (B == 0 || S == 0) return out;

  // Flatten all curves once (B * S * T points, tiny), keeping only strokes that draw.
  const float* cp = ctrl.data_ptr<float>();
  const float* wp = width.data_ptr<float>();
  std::vector<Segment> segs(B * S * NS);
  std::vector<int64_t> count(B, 0);  // segments kept per sample, packed at the front of its range
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> px(T), py(T);
    for (int64_t b = begin; b < end; ++b) {
      Segment* dst = segs.data() + b * S * NS;
      int64_t n = 0;
      for (int64_t s = 0; s < S; ++s) {
        const float w = wp[b * S + s];
        if (!(w > 0.f)) continue;  // also skips NaN widths
        const float* c = cp + (b * S + s) * 8;
        for (int64_t i = 0; i < T; ++i) {
          const float t = linspace01(static_cast<int>(i), static_cast<int>(T));
          px[i] = bezier(t, c[0], c[2], c[4], c[6]);
          py[i] = bezier(t, c[1], c[3], c[5], c[7]);
        }
        const float cov0 = w * 0.5f + 0.5f, m = w * 0.5f + 1.0f;
        for (int64_t i = 0; i < NS; ++i) {
          Segment g{px[i], py[i], px[i + 1], py[i + 1], cov0,
                    std::min(px[i], px[i + 1]) - m, std::max(px[i], px[i + 1]) + m,
                    std::min(py[i], py[i + 1]) - m, std::max(py[i], py[i + 1]) + m};
          dst[n++] = g;
        }
      }
      count[b] = n;
    }
  });

  float* op = out.data_ptr<float>();
  const float fW = static_cast<float>(W - 1);
  at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / H, y = row % H;
      const float fy = static_cast<float>(y);
      float* dst = op + row * W;
      const Segment* sg = segs.data() + b * S * NS;
      for (int64_t j = 0; j < count[b]; ++j) {
        const Segment& g = sg[j];
        if (!(fy >= g.y0 && fy <= g.y1)) continue;
        const float lo = std::max(g.x0, 0.f), hi = std::min(g.x1, fW);
        if (!(lo <= hi)) continue;
        const int64_t xa = static_cast<int64_t>(std::ceil(lo)), xb = static_cast<int64_t>(std::floor(hi));
        for (int64_t x = xa; x <= xb; ++x) {
          const float d = segment_distance(static_cast<float>(x), fy, g.ax, g.ay, g.bx, g.by);
          float v = g.c - d;
          v = v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
          dst[x] = std::max(dst[x], v);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace fae_fast

TORCH_LIBRARY_IMPL(fae_fast, CPU, m) { m.impl("rasterize_strokes", &fae_fast::rasterize_strokes_cpu); }
