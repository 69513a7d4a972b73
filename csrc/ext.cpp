// fae_fast._C: operator schemas (TORCH_LIBRARY) and the build metadata (pybind11, nothing else).
//
// The kernels live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL CPU) and csrc/cuda/*.cu (TORCH_LIBRARY_IMPL CUDA); the
// fake (meta) kernels that let torch.compile trace the ops are registered from Python in fae_fast/_ext.py.
#include <torch/extension.h>

#ifndef FAE_FAST_TORCH_VERSION
#error "FAE_FAST_TORCH_VERSION must be defined by setup.py"
#endif
#ifndef FAE_FAST_CUDA_VERSION
#define FAE_FAST_CUDA_VERSION ""
#endif
#ifdef FAE_FAST_WITH_CUDA
#define FAE_FAST_BUILD_CUDA_FLAG "1"
#else
#define FAE_FAST_BUILD_CUDA_FLAG "0"
#endif

// Plain bytes in the binary so that fae_fast/_ext_status.py can name what the .so was built against even when
// the .so cannot be loaded (undefined symbols after a torch upgrade): it greps the file for this marker.
extern "C" __attribute__((used, visibility("default"))) const char fae_fast_build_info[] =
    "FAE_FAST_BUILD_INFO{torch=" FAE_FAST_TORCH_VERSION ";cuda=" FAE_FAST_CUDA_VERSION
    ";with_cuda=" FAE_FAST_BUILD_CUDA_FLAG "}";

TORCH_LIBRARY(fae_fast, m) {
  // Smooth random displacement field (B, 2, H, W) float32 (dx, dy) in pixels: Gaussian-blurred counter-hash
  // noise with std smoothness[b], normalised to RMS alpha[b]. alpha, smoothness: (B,) float.
  m.def("elastic_field(Tensor alpha, Tensor smoothness, int seed, SymInt height, SymInt width) -> Tensor");
  // Masks (B, K, H, W) warped by the field of (alpha, smoothness, seed): bilinear, zeros outside.
  m.def("elastic_warp(Tensor mask, Tensor alpha, Tensor smoothness, int seed) -> Tensor");
  // Masks (B, K, H, W) warped by an explicit field (B, 2, H, W) in pixels.
  m.def("elastic_warp_field(Tensor mask, Tensor field) -> Tensor");
  // Anti-aliased cubic Bezier strokes: ctrl (B, S, 4, 2), width (B, S) -> (B, 1, height, width_px) float32.
  m.def("rasterize_strokes(Tensor ctrl, Tensor width, SymInt height, SymInt width_px, int samples) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fae_fast C++/CUDA ops (registered as torch.ops.fae_fast.*); this module only carries build metadata";
  m.attr("torch_version") = FAE_FAST_TORCH_VERSION;
  m.attr("cuda_version") = FAE_FAST_CUDA_VERSION;
#ifdef FAE_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
#ifdef _OPENMP
  m.attr("with_openmp") = true;
#else
  m.attr("with_openmp") = false;
#endif
  m.attr("build_info") = fae_fast_build_info;
}
