// The decode op's launch plan and dispatcher. One token: the one-pass fused kernel on sm_90
// (moe_decode_fused.cuh) where it is switched on and takes the shape, else the TMA kernel
// (moe_decode_tma.cuh) on long K and the register-ring kernel (moe_decode_gemv.cuh) elsewhere; 2-8 tokens:
// the TMA kernel; the rest: the tiled kernels (moe_decode_kernels.cuh). Torch-free: the extension and the
// standalone tests include it.
#pragma once
#include <algorithm>
#include <cstdio>
#include <cstdlib>

#include "moe_decode_fused.cuh"

namespace moequant {
namespace cuda {

// The launch plan of a call: the kernels, the K splits of both GEMMs and the workspace rows (h is
// [rows, I], the fp32 workspaces [split][rows][2I] and [split][rows][H]). The gemv paths fill the warps
// that fit on the GPU at once: register kernel, 2 blocks of 8 warps per SM and at least 4 chunks (128 K)
// per warp; TMA kernel, TmaConfig's blocks of 4 warps per SM and at least one stage per warp.
//   one token: the fused kernel where it is on and decode_fused_ok takes the shape (its grid in split2;
//     out2 holds the blocks' partial outputs [grid][H]); else the TMA kernel where its gate_up warps get 4
//     stages or more (its pipeline pays off on long K slices; on short ones, DeepSeek-V2-Lite and
//     Qwen3-30B-A3B at 1-2 stages per warp, the register kernel measured faster: BENCHMARKS.md "Decode
//     fused MoE, v5"), else the register kernel;
//   2-8 tokens: the TMA kernel (one slot per distinct expert, its tokens in the mma's B columns), else
//     the tiled kernels.
// MOEQUANT_DECODE_FUSED=1 / =0 turns the fused kernel on / off (decode_fused_available; unset:
// kFusedByDefault); MOEQUANT_DECODE_TMA=0 / =2 turn the TMA kernel off / on for every shape it takes
// (decode_tma_available); MOEQUANT_DECODE_SPLITS="a,b" sets the gemv splits. All for measuring.
struct DecodePlan {
  int split13 = 1, split2 = 1;
  int path = kDecodeTiles;
  int rows = 0;
};
inline int gemv_split(int pairs_x_tiles, int chunks, int num_sms) {
  const int fit = 2 * num_sms * kGemvWarps / pairs_x_tiles;
  return std::max(1, std::min(fit, chunks / 4));
}
inline DecodePlan decode_plan(int M, int top_k, int E, int H, int I, int rpg13, int rpg2, int num_sms, bool tma,
                              bool fused) {
  DecodePlan plan;
  plan.rows = M * top_k;
  if (fused && decode_fused_ok(M, H, I, rpg13, rpg2)) {
    plan.path = kDecodeFused;
    plan.split2 = fused_grid(top_k, I, num_sms);
    plan.rows = 1;
    return plan;
  }
  const int tiles13 = I / kDecodeTile, tiles2 = H / kDecodeTile;
  const int st13 = (H / 8 + kTmaStageRows - 1) / kTmaStageRows, st2 = (I / 8 + kTmaStageRows - 1) / kTmaStageRows;
  const int slots = decode_slots(M, top_k, E);
  if (tma && decode_tma_ok(M, top_k, H, I, rpg13, rpg2)) {
    const int s13 = tma_split(slots * tiles13, st13, tma_blocks_per_sm(true, M), num_sms);
    const char* force = std::getenv("MOEQUANT_DECODE_TMA");
    if (M > 1 || st13 >= 4 * s13 || (force && force[0] == '2')) {
      plan.path = kDecodeGemvTma;
      plan.split13 = s13;
      plan.split2 = tma_split(slots * tiles2 / 2, st2, tma_blocks_per_sm(false, M), num_sms);
      plan.rows = slots * M;
    }
  }
  if (plan.path == kDecodeTiles && decode_gemv_ok(M, H, I, rpg13, rpg2)) {
    plan.path = kDecodeGemv;
    plan.split13 = gemv_split(top_k * tiles13, H / 32, num_sms);
    plan.split2 = gemv_split(top_k * tiles2, I / 32, num_sms);
  }
  if (plan.path == kDecodeTiles) {
    decode_splits(M, top_k, E, H, I, num_sms, plan.split13, plan.split2);
    return plan;
  }
  const char* env = std::getenv("MOEQUANT_DECODE_SPLITS");
  int a = 0, b = 0;
  if (env && std::sscanf(env, "%d,%d", &a, &b) == 2 && a >= 1 && b >= 1) {
    plan.split13 = std::min(a, H / 32);
    plan.split2 = std::min(b, I / 32);
  }
  return plan;
}

// The decode op: requirements as for launch_decode_tiles (checked by the caller); kernels, splits and
// grid sizes from decode_plan.
template <typename T>
cudaError_t launch_decode(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.path == kDecodeTiles) return launch_decode_tiles(a, stream);
  if (a.split13 < 1 || a.split2 < 1) return cudaErrorInvalidValue;
  if (a.path == kDecodeFused) {
    if (a.z13) return a.z2 ? launch_decode_fused<T, true, true>(a, stream) : launch_decode_fused<T, true, false>(a, stream);
    return a.z2 ? launch_decode_fused<T, false, true>(a, stream) : launch_decode_fused<T, false, false>(a, stream);
  }
  if (a.path == kDecodeGemvTma) {
    if (a.M > kTmaMaxTokens || a.M * a.top_k > kTmaMaxPairs) return cudaErrorInvalidValue;
    if (a.z13) return a.z2 ? launch_decode_tma<T, true, true>(a, stream) : launch_decode_tma<T, true, false>(a, stream);
    return a.z2 ? launch_decode_tma<T, false, true>(a, stream) : launch_decode_tma<T, false, false>(a, stream);
  }
  if (a.M != 1 || a.top_k > kDecodeMaxPairs) return cudaErrorInvalidValue;
  if (a.z13) return a.z2 ? launch_decode_gemv<T, true, true>(a, stream) : launch_decode_gemv<T, true, false>(a, stream);
  return a.z2 ? launch_decode_gemv<T, false, true>(a, stream) : launch_decode_gemv<T, false, false>(a, stream);
}

}  // namespace cuda
}  // namespace moequant
