// Decode of 1-8 tokens on Hopper: the gemv kernel of moe_decode_gemv.cuh with the weights streamed into
// shared memory by the tensor memory accelerator (TMA) instead of register loads, and every expert's
// weights read once for all the tokens routed to it. Torch-free: the extension and the standalone tests
// include it.
//
// Why TMA: in the register-ring kernel ptxas tracks every weight load on one scoreboard and each step
// waits for all of them, so a warp keeps about one chunk in flight (58% of HBM on Mixtral, BENCHMARKS.md
// "Decode fused MoE, v4"). Here a warp owns a ring of 2 shared-memory stages, each with an mbarrier:
// lane 0 issues one 2D TMA box per matrix and stage (16 packed rows x 32 int32 columns, 2 KB: 4 chunks of
// 32 K), the stage's scale and zero-point rows and its inputs (128 K of each token), and the warp waits on
// exactly the stage it needs (mbarrier parity), so every issued stage is in flight until it is used.
//
// Work split: one warp per (slot, K slice, pair of 32-column tiles), the tile fastest. A slot is an
// expert (pair_slots: one token, its top-k pairs; more, the distinct experts of the call), and the warp
// serves all the call's tokens in the mma's 8 B columns (rows of the input box; a token not routed to the
// expert costs nothing and its sums are dropped). gate_up's two tiles are gate and up; down's are columns
// t and t + H/2 (one warp, two boxes per stage, as for gate_up). Arithmetic and reductions are the gemv
// kernel's: mma on (magic + q), scale and zero point folded into the fp32 sums per group, last-arriver
// reductions (gemv_epilogue). K slices are whole stages.
//
// Shared-memory reads: lane 4r + c reads 16 bytes, packed row c of a chunk and 4 columns. The box rows are
// 128 bytes (all 32 banks), so 8 lanes of a quarter-warp reading rows c = 0..3 of the same columns hit
// the same banks. Two things remove that: the box is written with the 128-byte swizzle (16-byte unit j of
// row y is stored at unit j ^ (y & 7)), and lane group r reads column unit u(r) = (r >> 1) | (r & 1) << 2,
// so the quarter-warp of groups 2q, 2q+1 reads units {q, q+4} ^ {0..3}: all 8 distinct. Which columns a
// lane group owns is free: it only decides where the sums are written.
#pragma once
#include <cuda.h>          // CUtensorMap
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <cstdlib>

#include "moe_decode_gemv.cuh"

namespace moequant {
namespace cuda {

constexpr int kTmaWarps = 4;
constexpr int kTmaThreads = 32 * kTmaWarps;
constexpr int kTmaStageRows = 16;                 // packed rows (8 K each) per stage: 4 chunks
constexpr int kTmaBoxBytes = kTmaStageRows * 128;  // one matrix's box: 16 rows x 32 int32 columns
constexpr int kTmaMaxGroupRows = 4;               // scale rows per stage: groups of 32 -> 4

// The tensor maps of one call: packed weights [E * K/8, cols] int32, scales [E * G, cols] 16-bit and
// zero points [E * G, cols] uint8 of both GEMMs, and their inputs (x [M, H], h [M * top_k, I]), as 2D
// tensors.
struct DecodeMaps {
  CUtensorMap q13, s13, z13, x13, q2, s2, z2, x2;
};

// Shared memory of a block: the weight boxes of every warp (1024-aligned for the swizzle), then per warp its
// scale rows, zero rows, input slices (MT tokens x 128 K) and mbarriers. Both GEMMs stream two 32-column
// tiles per warp and 2 stages (3 stages measured the same on Mixtral, BENCHMARKS.md "Decode fused MoE,
// v5"). The blocks per SM follow from it (228 KB per SM, 1 KB reserved per block): 5 for one token, 4 for 8.
template <bool GATED, int MT> struct TmaConfig {
  static constexpr int kMatrices = 2;  // gate_up: gate and up; down: column tiles t and t + H / 64
  static constexpr int kStages = 2;
  static constexpr int kScaleBytes = kTmaMaxGroupRows * 32 * 2;  // per matrix and stage
  static constexpr int kZeroBytes = kTmaMaxGroupRows * 32;
  static constexpr int kInBytes = MT * kTmaStageRows * 8 * 2;    // the stage's 128 inputs of MT tokens
  static constexpr int kBoxes = kTmaWarps * kStages * kMatrices * kTmaBoxBytes;
  static constexpr int kScales = kStages * kMatrices * kScaleBytes;  // per warp, from here on
  static constexpr int kZeros = kStages * kMatrices * kZeroBytes;
  static constexpr int kIn = kStages * kInBytes;
  static constexpr int kWarpSmall = (kScales + kZeros + kIn + 8 * kStages + 127) / 128 * 128;
  static constexpr int kSmem = kBoxes + kTmaWarps * kWarpSmall + 1024;  // + room to align the base to 1024
  static constexpr int kBlocksPerSm = 233472 / (kSmem + 1024);
};
// Tokens per call on this path, and pairs (M * top_k, for the slot map of pair_slots).
constexpr int kTmaMaxTokens = 8;
constexpr int kTmaMaxPairs = 64;

// Scale rows per stage (the box height of the scale and zero maps): groups of 32 or 64 -> 4 or 2; a
// group of 128 K or more, or one group for all K -> 1. Other group sizes cross stages unevenly: the
// register kernel takes them.
__host__ __device__ inline int tma_group_rows(int R, int rpg) { return rpg >= R ? 1 : (rpg < kTmaStageRows ? kTmaStageRows / rpg : 1); }
inline bool tma_groups_ok(int R, int rpg) {
  return rpg >= R || (rpg >= 4 && kTmaStageRows % rpg == 0) || rpg % kTmaStageRows == 0;
}

// ---- PTX: mbarriers and TMA (sm_90) ----
__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n .reg .pred done;\n"
      "WAIT:\n mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n @!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// The barriers' initialisation is visible to the copy engine (the async proxy) before the first copy.
__device__ __forceinline__ void mbar_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int col, int row, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}

// One warp's stages [st_begin, st_end) of NW column tiles (gate_up: gate at col0, up at col0 + N) of the
// expert, for the MT input rows from `in_row` of the input map (tokens in the mma's B columns; MT = 1: the
// token in every column); acc in gemv_epilogue's layout. boxes: the warp's weight boxes
// (1024-aligned), small: its scale, zero and input slots and mbarriers (TmaConfig layout).
// wait: the input is written by the previous grid: pdl_wait() after the first weight copies, before
// copying the input.
template <typename T, bool GATED, bool ZEROS, int MT>
__device__ __forceinline__ void tma_tile(const DecodeMaps& maps, int in_row, uint8_t* boxes, uint8_t* small, int expert,
                                         int R, int rpg, int N, int col0, int u, int st_begin, int st_end, bool wait,
                                         float (&acc)[2][2][4]) {
  using C = TmaConfig<GATED, MT>;
  constexpr int NW = C::kMatrices, NS = C::kStages;
  const CUtensorMap* qmap = GATED ? &maps.q13 : &maps.q2;
  const CUtensorMap* smap = GATED ? &maps.s13 : &maps.s2;
  const CUtensorMap* zmap = GATED ? &maps.z13 : &maps.z2;
  const CUtensorMap* xmap = GATED ? &maps.x13 : &maps.x2;
  const int lane = threadIdx.x & 31, c = lane & 3, r = lane >> 2;
  const int G = (R + rpg - 1) / rpg, sr = tma_group_rows(R, rpg);
  const uint32_t qbase = smem_u32(boxes), sbase = smem_u32(small);
  auto box = [&](int slot, int m) { return qbase + (slot * NW + m) * kTmaBoxBytes; };
  auto scales = [&](int slot, int m) { return small + (slot * NW + m) * C::kScaleBytes; };
  auto zeros = [&](int slot, int m) { return small + C::kScales + (slot * NW + m) * C::kZeroBytes; };
  auto input = [&](int slot) { return sbase + C::kScales + C::kZeros + slot * C::kInBytes; };
  auto bar = [&](int slot) { return sbase + C::kScales + C::kZeros + C::kIn + 8 * slot; };
  const uint32_t stage_bytes = NW * (kTmaBoxBytes + sr * 64 + (ZEROS ? sr * 32 : 0)) + C::kInBytes;

  // lane 0 copies stage st (absolute) into slot: the weights, scales and zeros, then the inputs
  auto issue_weights = [&](int st, int slot) {
    const int row = expert * R + st * kTmaStageRows, grow = expert * G + st * kTmaStageRows / rpg;
    mbar_expect_tx(bar(slot), stage_bytes);  // the input's bytes too: the phase ends when all have landed
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      tma_load_2d(box(slot, m), qmap, col0 + m * N, row, bar(slot));
      tma_load_2d(smem_u32(scales(slot, m)), smap, col0 + m * N, grow, bar(slot));
      if (ZEROS) tma_load_2d(smem_u32(zeros(slot, m)), zmap, col0 + m * N, grow, bar(slot));
    }
  };
  auto issue_input = [&](int st, int slot) {
    tma_load_2d(input(slot), xmap, st * kTmaStageRows * 8, in_row, bar(slot));
  };
  const int n = st_end - st_begin;
  if (lane == 0) {
#pragma unroll
    for (int s = 0; s < NS; ++s) mbar_init(bar(s));
    mbar_init_fence();
#pragma unroll
    for (int s = 0; s < NS; ++s)
      if (s < n) issue_weights(st_begin + s, s);
  }
  if (wait) pdl_wait();
  if (lane == 0) {
    // h was written by the gate_up grid through the generic proxy; the copies read it through the async one
    if (wait) asm volatile("fence.proxy.async.global;\n" ::: "memory");
#pragma unroll
    for (int s = 0; s < NS; ++s)
      if (s < n) issue_input(st_begin + s, s);
  }
  __syncwarp();

  float part[NW][2][4], sx[4];
  clear_sums(part, sx);
  auto fold = [&](int slot, int gi) {  // with scale row gi of the slot
    uint2 sc[NW];
    uint32_t zb[NW];
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      sc[m] = *reinterpret_cast<const uint2*>(scales(slot, m) + gi * 64 + 8 * u);
      zb[m] = ZEROS ? *reinterpret_cast<const uint32_t*>(zeros(slot, m) + gi * 32 + 4 * u) : 0x08080808u;
    }
    fold_group<T, NW, MT == 1 ? 1 : 2>(acc, part, sx, sc, zb);
  };

  const uint32_t ones[4] = {Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes};
  int g_end = (st_begin * kTmaStageRows / rpg + 1) * rpg;  // first packed row of the next group
  int slot = 0;
  uint32_t parity = 0;
  for (int i = 0; i < n; ++i) {
    const int row0 = (st_begin + i) * kTmaStageRows;  // the stage's first packed row in the expert
    const int nch = min(4, (R - row0) / 4);
    mbar_wait(bar(slot), parity);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < nch) {  // warp-uniform
        uint4 xv;     // chunk j's 8 inputs of packed row c, of token r (B column r; MT = 1: token 0)
        asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(xv.x), "=r"(xv.y), "=r"(xv.z), "=r"(xv.w)
                     : "r"(input(slot) + (MT == 1 ? 0 : r) * (kTmaStageRows * 16) + 16 * (4 * j + c)));
        uint32_t b[2][2];
        act_fragments(xv, b);
#pragma unroll
        for (int h = 0; h < 2; ++h) Half2Math<T>::mma(sx, ones, b[h][0], b[h][1]);
        const int y = 4 * j + c;  // box row; its 16-byte units are swizzled by y & 7
        const uint32_t off = y * 128 + 16 * (u ^ (y & 7));
#pragma unroll
        for (int m = 0; m < NW; ++m) {
          uint4 w;
          asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                       : "=r"(w.x), "=r"(w.y), "=r"(w.z), "=r"(w.w)
                       : "r"(box(slot, m) + off));
          uint32_t a[2][2][4];
          chunk_fragments<T, true>(w, make_uint2(0u, 0u), 0u, a);
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) Half2Math<T>::mma(part[m][t], a[t][h], b[h][0], b[h][1]);
        }
        const int row_next = row0 + 4 * j + 4;
        if (row_next == g_end || (i == n - 1 && j == nch - 1)) {  // a group or the slice ends here
          fold(slot, rpg < kTmaStageRows ? (4 * j) / rpg : 0);
          if (row_next == g_end) g_end += rpg;
        }
      }
    }
    __syncwarp();  // every lane is done reading the slot before it is refilled
    if (lane == 0 && i + NS < n) {
      issue_weights(st_begin + i + NS, slot);
      issue_input(st_begin + i + NS, slot);
    }
    if (++slot == NS) {
      slot = 0;
      parity ^= 1u;
    }
  }
}

// GATED (launch 1): h[slot][token] = SiLU(gate) * up; else (launch 2): y = sum_pairs w * down(h).
// One warp per (slot, K slice, 32-column tile), the tile fastest; slots as in pair_slots.
template <typename T, bool GATED, bool ZEROS, int MT>
__global__ void __launch_bounds__(kTmaThreads, TmaConfig<GATED, MT>::kBlocksPerSm)
    moe_decode_tma_kernel(const __grid_constant__ DecodeMaps maps, DecodeArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using C = TmaConfig<GATED, MT>;
  constexpr int NW = C::kMatrices;
  if (GATED) pdl_launch_dependents();
  extern __shared__ uint8_t smem[];
  const int slots = decode_slots(a.M, a.top_k, a.E);
  const int N = GATED ? a.I : a.H / 2, R = (GATED ? a.H : a.I) / 8;  // down: two halves of H, like gate and up
  const int tiles = N / kDecodeTile, n_stages = (R + kTmaStageRows - 1) / kTmaStageRows;
  const int S = GATED ? a.split13 : a.split2;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2;
  const int gw = blockIdx.x * kTmaWarps + warp;
  if (gw >= slots * S * tiles) return;
  const int tile = gw % tiles, s = (gw / tiles) % S, j = gw / (tiles * S);
  const PairSlots ps = pair_slots<T, MT>(a, j);
  if (j >= ps.n) {  // a slot no expert needs (MT > 1: fewer distinct experts than slots)
    return;
  }
  const int st_begin = n_stages * s / S, st_end = n_stages * (s + 1) / S;
  const int u = (r >> 1) | ((r & 1) << 2);  // the lane group's column unit (see the top of the file)
  const int col = tile * kDecodeTile + 4 * u;
  float acc[NW][2][4] = {};
  if (ps.expert >= 0 && st_begin < st_end) {
    uint8_t* base = smem + ((1024u - (smem_u32(smem) & 1023u)) & 1023u);
    tma_tile<T, GATED, ZEROS, MT>(maps, GATED ? 0 : j * a.M, base + warp * C::kStages * NW * kTmaBoxBytes,
                                  base + C::kBoxes + warp * C::kWarpSmall, ps.expert, R,
                                  GATED ? a.rows_per_group13 : a.rows_per_group2, N, tile * kDecodeTile, u, st_begin,
                                  st_end, !GATED, acc);
  } else if (!GATED) {
    pdl_wait();
  }
  gemv_epilogue<T, GATED, MT, NW>(a, ps, acc, j, s, tile, col);
#else
  __trap();  // launched only where decode_tma_available() found sm_90 code
#endif
}

// ---- host ----
// cuTensorMapEncodeTiled from the driver, through the runtime (no link against libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
    return err == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
               : nullptr;
  }();
  return fn;
}

// A 2D map over a row-major [rows, cols] tensor of elem-byte elements, box [box_rows, box_cols].
inline bool encode_map(CUtensorMap* map, CUtensorMapDataType type, int elem, const void* base, int64_t rows,
                       int64_t cols, int box_cols, int box_rows, bool swizzle) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * elem};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)}, one[2] = {1, 1};
  return tensor_map_encoder()(map, type, 2, const_cast<void*>(base), dims, strides, box, one,
                              CU_TENSOR_MAP_INTERLEAVE_NONE,
                              swizzle ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_NONE,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

template <typename T>
bool encode_decode_maps(const DecodeArgs<T>& a, DecodeMaps& maps) {
  maps = DecodeMaps{};
  auto gemm = [&](CUtensorMap& q, CUtensorMap& s, CUtensorMap& z, const int32_t* qw, const T* sc, const uint8_t* zp,
                  int K, int cols, int rpg) {
    const int R = K / 8, G = (R + rpg - 1) / rpg, sr = tma_group_rows(R, rpg);
    return encode_map(&q, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, qw, static_cast<int64_t>(a.E) * R, cols, 32,
                      kTmaStageRows, true) &&
           encode_map(&s, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, sc, static_cast<int64_t>(a.E) * G, cols, 32, sr, false) &&
           (!zp || encode_map(&z, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, zp, static_cast<int64_t>(a.E) * G, cols, 32, sr,
                              false));
  };
  const int mt = a.M == 1 ? 1 : kTmaMaxTokens;    // input box rows: the tokens of a slot
  const int64_t slots = decode_slots(a.M, a.top_k, a.E);
  constexpr int in_box = kTmaStageRows * 8;  // a stage's inputs
  return gemm(maps.q13, maps.s13, maps.z13, a.w13, a.s13, a.z13, a.H, 2 * a.I, a.rows_per_group13) &&
         gemm(maps.q2, maps.s2, maps.z2, a.w2, a.s2, a.z2, a.I, a.H, a.rows_per_group2) &&
         encode_map(&maps.x13, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.x, a.M, a.H, in_box, mt, false) &&
         encode_map(&maps.x2, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.h, slots * a.M, a.I, in_box, mt, false);
}

// This path: up to 8 tokens and 64 pairs, K (H and I) a multiple of 32, H of 64, groups of 32 or more
// that fit the stages.
inline bool decode_tma_ok(int M, int top_k, int H, int I, int rpg13, int rpg2) {
  return M >= 1 && M <= kTmaMaxTokens && M * top_k <= kTmaMaxPairs && decode_gemv_ok(1, H, I, rpg13, rpg2) &&
         H % (2 * kDecodeTile) == 0 &&  // down's two halves
         tma_groups_ok(H / 8, rpg13) && tma_groups_ok(I / 8, rpg2);
}

// The current device runs sm_90 code of these kernels and the driver encodes tensor maps.
// MOEQUANT_DECODE_TMA=0 turns the path off, =2 takes it for every shape it supports (decode_plan); for
// measuring it against the register kernel.
inline bool decode_tma_available() {
  static const bool ok = [] {
    const char* env = std::getenv("MOEQUANT_DECODE_TMA");
    if (env && env[0] == '0') return false;
    int dev = 0, major = 0;
    cudaFuncAttributes attr{};
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9 ||
        cudaFuncGetAttributes(&attr, moe_decode_tma_kernel<__nv_bfloat16, true, false, 1>) != cudaSuccess)
      return false;
    return attr.ptxVersion >= 90 && tensor_map_encoder() != nullptr;
  }();
  return ok;
}

// Blocks per SM of a GEMM's kernel for M tokens.
inline int tma_blocks_per_sm(bool gated, int M) {
  if (gated) return M == 1 ? TmaConfig<true, 1>::kBlocksPerSm : TmaConfig<true, kTmaMaxTokens>::kBlocksPerSm;
  return M == 1 ? TmaConfig<false, 1>::kBlocksPerSm : TmaConfig<false, kTmaMaxTokens>::kBlocksPerSm;
}

// K splits: as many warps as fit on the GPU at once, at most one slice per stage.
inline int tma_split(int pairs_x_tiles, int n_stages, int blocks_per_sm, int num_sms) {
  const int fit = blocks_per_sm * num_sms * kTmaWarps / pairs_x_tiles;
  return std::max(1, std::min(fit, n_stages));
}

template <typename T, bool GATED, bool ZEROS, int MT>
cudaError_t launch_tma_gemm(const DecodeMaps& maps, const DecodeArgs<T>& a, cudaStream_t stream, bool pdl) {
  auto kernel = moe_decode_tma_kernel<T, GATED, ZEROS, MT>;
  constexpr int smem = TmaConfig<GATED, MT>::kSmem;
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  const int slots = decode_slots(a.M, a.top_k, a.E);
  const int warps = slots * (GATED ? a.split13 * (a.I / kDecodeTile) : a.split2 * (a.H / (2 * kDecodeTile)));
  return launch_maybe_pdl(kernel, dim3((warps + kTmaWarps - 1) / kTmaWarps), dim3(kTmaThreads), smem, stream, pdl, maps, a);
}

template <typename T, bool ZEROS13, bool ZEROS2, int MT>
cudaError_t launch_decode_tma_mt(const DecodeArgs<T>& a, cudaStream_t stream) {
  DecodeMaps maps;
  if (!encode_decode_maps(a, maps)) return cudaErrorInvalidValue;
  const cudaError_t err = launch_tma_gemm<T, true, ZEROS13, MT>(maps, a, stream, false);
  if (err != cudaSuccess) return err;
  // the down grid is a programmatic dependent launch of the gate_up grid
  return launch_tma_gemm<T, false, ZEROS2, MT>(maps, a, stream, decode_use_pdl());
}

template <typename T, bool ZEROS13, bool ZEROS2>
cudaError_t launch_decode_tma(const DecodeArgs<T>& a, cudaStream_t stream) {
  return a.M == 1 ? launch_decode_tma_mt<T, ZEROS13, ZEROS2, 1>(a, stream)
                  : launch_decode_tma_mt<T, ZEROS13, ZEROS2, kTmaMaxTokens>(a, stream);
}

}  // namespace cuda
}  // namespace moequant
