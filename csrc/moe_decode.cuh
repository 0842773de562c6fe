// The decode op's launch plan and dispatcher: one token goes to a gemv kernel (TMA on sm_90,
// moe_decode_tma.cuh; the register-ring kernel elsewhere, moe_decode_gemv.cuh), more tokens to the
// tiled kernels (moe_decode_kernels.cuh). Torch-free: the extension and the standalone tests include it.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "moe_decode_tma.cuh"

namespace moequant {
namespace cuda {

// The launch plan of a call: the kernels and the K splits of both GEMMs (the workspaces are
// [split][M*top_k][2I] and [split][M*top_k][H] floats). The one-token paths fill the warps that fit on
// the GPU at once: register kernel, 2 blocks of 8 warps per SM and at least 4 chunks (128 K) per warp;
// TMA kernel, TmaConfig's blocks of 4 warps per SM and at least one stage per warp.
// MOEQUANT_DECODE_SPLITS="a,b" sets the one-token splits, MOEQUANT_DECODE_STAGES="a,b" the TMA stages
// (for measuring them).
struct DecodePlan {
  int split13 = 1, split2 = 1;
  int path = kDecodeTiles;
  int stages13 = kTmaStages13[0], stages2 = kTmaStages2[0];  // TMA path
};
inline int gemv_split(int pairs_x_tiles, int chunks, int num_sms) {
  const int fit = 2 * num_sms * kGemvWarps / pairs_x_tiles;
  return std::max(1, std::min(fit, chunks / 4));
}
inline DecodePlan decode_plan(int M, int top_k, int E, int H, int I, int rpg13, int rpg2, int num_sms, bool tma) {
  DecodePlan plan;
  if (!decode_gemv_ok(M, H, I, rpg13, rpg2)) {
    decode_splits(M, top_k, E, H, I, num_sms, plan.split13, plan.split2);
    return plan;
  }
  const int gu = top_k * (I / kDecodeTile), dn = top_k * (H / kDecodeTile);
  // TMA where the gate_up warps get 4 stages or more: its pipeline pays off on long K slices, and on
  // short ones (DeepSeek-V2-Lite, Qwen3-30B-A3B: 1-2 stages per warp) the register kernel measured faster
  // (BENCHMARKS.md, "Decode fused MoE, v5").
  const int st13 = (H / 8 + kTmaStageRows - 1) / kTmaStageRows;
  const bool long_k = st13 >= 4 * tma_split(gu, st13, tma_blocks_per_sm(true, kTmaStages13[0]), num_sms);
  const char* force = std::getenv("MOEQUANT_DECODE_TMA");
  if (tma && decode_tma_ok(M, H, I, rpg13, rpg2) && (long_k || (force && force[0] == '2'))) {
    plan.path = kDecodeGemvTma;
    const char* st = std::getenv("MOEQUANT_DECODE_STAGES");
    int a = 0, b = 0;
    if (st && std::sscanf(st, "%d,%d", &a, &b) == 2) {
      plan.stages13 = a == kTmaStages13[1] ? a : kTmaStages13[0];
      plan.stages2 = b == kTmaStages2[1] ? b : kTmaStages2[0];
    }
    plan.split13 = tma_split(gu, (H / 8 + kTmaStageRows - 1) / kTmaStageRows, tma_blocks_per_sm(true, plan.stages13),
                             num_sms);
    plan.split2 = tma_split(dn, (I / 8 + kTmaStageRows - 1) / kTmaStageRows, tma_blocks_per_sm(false, plan.stages2),
                            num_sms);
  } else {
    plan.path = kDecodeGemv;
    plan.split13 = gemv_split(gu, H / 32, num_sms);
    plan.split2 = gemv_split(dn, I / 32, num_sms);
  }
  const char* env = std::getenv("MOEQUANT_DECODE_SPLITS");
  int s13 = 0, s2 = 0;
  if (env && std::sscanf(env, "%d,%d", &s13, &s2) == 2 && s13 >= 1 && s2 >= 1) {
    plan.split13 = std::min(s13, H / 32);
    plan.split2 = std::min(s2, I / 32);
  }
  return plan;
}

// The decode op: requirements as for launch_decode_tiles (checked by the caller); kernels, splits and
// grid sizes from decode_plan.
template <typename T>
cudaError_t launch_decode(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.path == kDecodeTiles) return launch_decode_tiles(a, stream);
  if (a.M != 1 || a.top_k > kDecodeMaxPairs || a.split13 < 1 || a.split2 < 1) return cudaErrorInvalidValue;
  if (a.path == kDecodeGemvTma) {
    if (a.z13) return a.z2 ? launch_decode_tma<T, true, true>(a, stream) : launch_decode_tma<T, true, false>(a, stream);
    return a.z2 ? launch_decode_tma<T, false, true>(a, stream) : launch_decode_tma<T, false, false>(a, stream);
  }
  if (a.z13) return a.z2 ? launch_decode_gemv<T, true, true>(a, stream) : launch_decode_gemv<T, true, false>(a, stream);
  return a.z2 ? launch_decode_gemv<T, false, true>(a, stream) : launch_decode_gemv<T, false, false>(a, stream);
}

}  // namespace cuda
}  // namespace moequant
