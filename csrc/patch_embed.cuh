#pragma once
#include <cstdint>

namespace vitkern {

// Sizes and strides (in elements) of one patchify-projection call.
struct PatchEmbedArgs {
  std::int64_t batch, channels, height, width;   // x (B, C, H, W)
  std::int64_t dim, patch_h, patch_w;            // weight (D, C, Ph, Pw)
  std::int64_t prefix;                           // 1 with a CLS row, else 0
  std::int64_t sx[4], sw[4], spos[2];            // strides of x, weight, pos (T+N, D)
  bool has_bias, has_cls, has_pos;
};

// out (B, T+N, D) contiguous = patches @ W^T + bias, CLS row = cls + pos[0], + pos.
void patch_embed_forward(std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t cls,
                         std::uintptr_t pos, std::uintptr_t out, int dtype, const PatchEmbedArgs& args,
                         std::uintptr_t stream);

}  // namespace vitkern
