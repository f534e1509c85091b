// Patchify-projection forward: an implicit GEMM that gathers each patch straight from the image
// (no unfolded tensor), accumulates in fp32 and adds bias, CLS row and position embedding in its
// epilogue, writing the (B, T+N, D) token layout directly. Rows of the GEMM are output tokens
// b*(T+N)+t, so CLS rows (t < T) load no pixels and take the CLS token instead of the bias.
//
// This first version runs on the SIMT cores (64x64 tiles, 4x4 outputs per thread); the
// tensor-core version is the next step once it can be measured on a GPU.
#include "common.cuh"
#include "patch_embed.cuh"

namespace vitkern {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // 16 x 16, each owning a 4 x 4 block of outputs (strided by 16)

struct Geometry {
  std::int64_t M, K, D, tokens, prefix, grid_w, PH, PW;
};

template <typename T>
__global__ void __launch_bounds__(kThreads) patch_embed_fwd_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias, const T* __restrict__ cls,
    const T* __restrict__ pos, T* __restrict__ out, Geometry g, PatchEmbedArgs a) {
  __shared__ float tile_a[kTileK][kTileM + 1];
  __shared__ float tile_b[kTileK][kTileN + 1];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;
  const std::int64_t m0 = static_cast<std::int64_t>(blockIdx.x) * kTileM;
  const std::int64_t n0 = static_cast<std::int64_t>(blockIdx.y) * kTileN;
  const std::int64_t patch_area = g.PH * g.PW;

  float acc[4][4] = {};
  for (std::int64_t k0 = 0; k0 < g.K; k0 += kTileK) {
    // k is the fastest index of each load: consecutive threads read along a patch row.
    for (int e = tid; e < kTileK * kTileM; e += kThreads) {
      const int kl = e % kTileK, ml = e / kTileK;
      const std::int64_t m = m0 + ml, k = k0 + kl;
      float v = 0.f;
      if (m < g.M && k < g.K) {
        const std::int64_t b = m / g.tokens, t = m % g.tokens;
        if (t >= g.prefix) {
          const std::int64_t n = t - g.prefix, ph = n / g.grid_w, pw = n % g.grid_w;
          const std::int64_t c = k / patch_area, r = k % patch_area, i = r / g.PW, j = r % g.PW;
          v = to_float(x[b * a.sx[0] + c * a.sx[1] + (ph * g.PH + i) * a.sx[2] + (pw * g.PW + j) * a.sx[3]]);
        }
      }
      tile_a[kl][ml] = v;
    }
    for (int e = tid; e < kTileK * kTileN; e += kThreads) {
      const int kl = e % kTileK, nl = e / kTileK;
      const std::int64_t n = n0 + nl, k = k0 + kl;
      float v = 0.f;
      if (n < g.D && k < g.K) {
        const std::int64_t c = k / patch_area, r = k % patch_area, i = r / g.PW, j = r % g.PW;
        v = to_float(w[n * a.sw[0] + c * a.sw[1] + i * a.sw[2] + j * a.sw[3]]);
      }
      tile_b[kl][nl] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = tile_a[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = tile_b[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const std::int64_t m = m0 + ty + 16 * i;
    if (m >= g.M) continue;
    const std::int64_t t = m % g.tokens;
    const bool is_patch = t >= g.prefix;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const std::int64_t n = n0 + tx + 16 * j;
      if (n >= g.D) continue;
      float v = acc[i][j];
      if (a.has_bias && is_patch) v += to_float(bias[n]);
      if (a.has_cls && !is_patch) v += to_float(cls[n]);
      if (a.has_pos) v += to_float(pos[t * a.spos[0] + n * a.spos[1]]);
      out[m * g.D + n] = from_float<T>(v);
    }
  }
}

void validate(const PatchEmbedArgs& a) {
  auto positive = [](std::int64_t v, const char* name) {
    if (v <= 0) throw ArgumentError(std::string("vitkern._C.patch_embed_forward: ") + name + " must be >= 1, got " +
                                    std::to_string(v));
  };
  positive(a.batch, "batch");
  positive(a.channels, "channels");
  positive(a.height, "height");
  positive(a.width, "width");
  positive(a.dim, "dim");
  positive(a.patch_h, "patch_h");
  positive(a.patch_w, "patch_w");
  if (a.height % a.patch_h || a.width % a.patch_w) {
    throw ArgumentError("vitkern._C.patch_embed_forward: image (" + std::to_string(a.height) + ", " +
                        std::to_string(a.width) + ") is not divisible by the patch (" + std::to_string(a.patch_h) +
                        ", " + std::to_string(a.patch_w) + ")");
  }
  if (a.prefix != (a.has_cls ? 1 : 0)) {
    throw ArgumentError("vitkern._C.patch_embed_forward: prefix must be 1 with a CLS token and 0 without, got " +
                        std::to_string(a.prefix));
  }
}

}  // namespace

void patch_embed_forward(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t cls,
                         std::uintptr_t pos, std::uintptr_t out, int dtype, const PatchEmbedArgs& a,
                         std::uintptr_t stream) {
  validate(a);
  const DType kind = to_dtype(dtype);
  require_device();
  require_device_pointer(x, "x");
  require_device_pointer(weight, "weight");
  require_device_pointer(out, "out");
  if (a.has_bias) require_device_pointer(bias, "bias");
  if (a.has_cls) require_device_pointer(cls, "cls_token");
  if (a.has_pos) require_device_pointer(pos, "pos_embed");

  const std::int64_t grid_w = a.width / a.patch_w;
  const std::int64_t tokens = a.prefix + (a.height / a.patch_h) * grid_w;
  const Geometry g{a.batch * tokens, a.channels * a.patch_h * a.patch_w, a.dim, tokens, a.prefix, grid_w,
                   a.patch_h, a.patch_w};
  const std::int64_t blocks_m = (g.M + kTileM - 1) / kTileM, blocks_n = (g.D + kTileN - 1) / kTileN;
  if (blocks_m > 0x7fffffff || blocks_n > 65535) {
    throw ArgumentError("vitkern._C.patch_embed_forward: problem too large for one launch (" +
                        std::to_string(blocks_m) + " x " + std::to_string(blocks_n) + " tiles)");
  }
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_n));
  auto s = reinterpret_cast<cudaStream_t>(stream);
  switch (kind) {
#define VITKERN_LAUNCH(CODE, T)                                                                              \
  case CODE:                                                                                                 \
    patch_embed_fwd_kernel<T><<<grid, kThreads, 0, s>>>(                                                     \
        reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(weight), reinterpret_cast<const T*>(bias), \
        reinterpret_cast<const T*>(cls), reinterpret_cast<const T*>(pos), reinterpret_cast<T*>(out), g, a);  \
    break;
    VITKERN_LAUNCH(DType::kFloat32, float)
    VITKERN_LAUNCH(DType::kFloat16, __half)
    VITKERN_LAUNCH(DType::kBFloat16, __nv_bfloat16)
#undef VITKERN_LAUNCH
  }
  check_launch("patch_embed_fwd_kernel launch");
}

}  // namespace vitkern
