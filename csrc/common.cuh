// Shared helpers of vitkern's CUDA backend: error checks that become Python exceptions,
// dtype dispatch, and the device/pointer checks every entry point runs before launching.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace vitkern {

// Invalid arguments surface in Python as ValueError, CUDA failures as RuntimeError.
struct ArgumentError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("vitkern._C: ") + what + " failed: " + cudaGetErrorName(status) +
                             " (" + cudaGetErrorString(status) + ")");
  }
}

// Every launch is followed by this: a bad configuration must not pass silently.
inline void check_launch(const char* kernel) {
  check_cuda(cudaGetLastError(), kernel);
}

// Called first by every entry point, so a machine without a usable GPU gets a clear error.
inline void require_device() {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error for later calls
    throw std::runtime_error(std::string("vitkern._C: no CUDA device is available (cudaGetDeviceCount: ") +
                             (status == cudaSuccess ? "0 devices" : cudaGetErrorString(status)) + ")");
  }
}

// A host pointer handed to a kernel would fault; catch it before the launch.
inline void require_device_pointer(std::uintptr_t ptr, const char* name) {
  if (ptr == 0) throw ArgumentError(std::string("vitkern._C: ") + name + " is a null pointer");
  cudaPointerAttributes attr{};
  cudaError_t status = cudaPointerGetAttributes(&attr, reinterpret_cast<const void*>(ptr));
  if (status != cudaSuccess || attr.type != cudaMemoryTypeDevice) {
    cudaGetLastError();
    throw ArgumentError(std::string("vitkern._C: ") + name + " is not CUDA device memory");
  }
}

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline DType to_dtype(int code) {
  if (code < 0 || code > 2) {
    throw ArgumentError("vitkern._C: dtype code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                        std::to_string(code));
  }
  return static_cast<DType>(code);
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace vitkern
