// Python bindings of vitkern's CUDA backend. Kernels take raw device pointers, sizes, strides and
// the CUDA stream as integers, so this module needs neither PyTorch's headers nor its ABI.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <vector>

#include "patch_embed.cuh"

namespace py = pybind11;

namespace {

template <std::size_t N>
void copy_strides(const std::vector<std::int64_t>& from, std::int64_t (&to)[N], const char* name) {
  if (from.size() != N) {
    throw std::invalid_argument(std::string("vitkern._C: ") + name + " must have " + std::to_string(N) +
                                " strides, got " + std::to_string(from.size()));
  }
  for (std::size_t i = 0; i < N; ++i) to[i] = from[i];
}

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vitkern's CUDA kernels (raw pointers, sizes, strides and streams from Python)";
  m.def("device_count", &device_count, "Number of CUDA devices the runtime sees (0 when none or no driver).");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def(
      "patch_embed_forward",
      [](std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t cls, std::uintptr_t pos,
         std::uintptr_t out, int dtype, std::vector<std::int64_t> x_shape, std::vector<std::int64_t> x_strides,
         std::vector<std::int64_t> w_shape, std::vector<std::int64_t> w_strides,
         std::vector<std::int64_t> pos_strides, bool has_bias, bool has_cls, bool has_pos, std::uintptr_t stream) {
        if (x_shape.size() != 4 || w_shape.size() != 4) {
          throw std::invalid_argument("vitkern._C.patch_embed_forward: x_shape and w_shape must have 4 entries");
        }
        vitkern::PatchEmbedArgs a{};
        a.batch = x_shape[0];
        a.channels = x_shape[1];
        a.height = x_shape[2];
        a.width = x_shape[3];
        a.dim = w_shape[0];
        a.patch_h = w_shape[2];
        a.patch_w = w_shape[3];
        if (w_shape[1] != a.channels) {
          throw std::invalid_argument("vitkern._C.patch_embed_forward: weight has " + std::to_string(w_shape[1]) +
                                      " input channels but x has " + std::to_string(a.channels));
        }
        a.prefix = has_cls ? 1 : 0;
        copy_strides(x_strides, a.sx, "x_strides");
        copy_strides(w_strides, a.sw, "w_strides");
        copy_strides(pos_strides, a.spos, "pos_strides");
        a.has_bias = has_bias;
        a.has_cls = has_cls;
        a.has_pos = has_pos;
        py::gil_scoped_release release;
        vitkern::patch_embed_forward(x, weight, bias, cls, pos, out, dtype, a, stream);
      },
      py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("cls_token"), py::arg("pos_embed"), py::arg("out"),
      py::arg("dtype"), py::arg("x_shape"), py::arg("x_strides"), py::arg("w_shape"), py::arg("w_strides"),
      py::arg("pos_strides"), py::arg("has_bias"), py::arg("has_cls"), py::arg("has_pos"), py::arg("stream"),
      "Patchify-projection forward into a contiguous (B, T+N, D) output (see csrc/patch_embed.cu).");
}
