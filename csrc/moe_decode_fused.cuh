// One-token decode in one streaming pass (sm_90): gate_up, SiLU * up and down of every routed expert in a
// single persistent grid, with no dependency between the two GEMMs. Torch-free: the extension and the
// standalone tests include it.
// The library's one-token path on sm_90 where the shape fits (decode_fused_ok): on the H100 it took 78.4 /
// 17.4 / 15.9 us per layer on Mixtral-8x7B / DeepSeek-V2-Lite / Qwen3-30B-A3B, against 80.3 / 26.1 / 23.5
// for the two-launch kernels in the same run (BENCHMARKS.md "Decode fused MoE, v6").
//
// Why: the two-launch kernels (moe_decode_tma.cuh, moe_decode_gemv.cuh) compute all of h before any
// down weight is read. With one token that is two short dependent streams, each with its own ramp,
// tail and cross-block reduction; on the small shapes (DeepSeek-V2-Lite, Qwen3-30B-A3B: 1-2 stages per
// warp) the time is those latencies, not the bytes (BENCHMARKS.md "Decode fused MoE, v5").
// Here the work is cut along I instead of K. An item is (pair p, tile t of 32 intermediate columns):
//   1. gate and up columns [32t, 32t + 32) over all of K = H  -> act[32] = SiLU(gate) * up (x's dtype)
//   2. down rows [32t, 32t + 32) of K = I for all H outputs    -> y += w_p * down[:, 32t:32t+32] @ act
// Step 2 needs only the item's own 32 activations, so every item is independent: a block streams its
// items' gate_up and down weights back to back through one TMA ring, and the only reduction left is
// the sum of the blocks' fp32 partial outputs [G][H], done by a second small kernel (a programmatic
// dependent launch) in a fixed order. Deterministic, no atomics on data.
//
// Block: 8 consumer warps and 1 producer warp. The producer's lane 0 walks the block's items and
// issues every stage's TMA boxes into a ring of NS slots (full/empty mbarriers per slot), so up to
// ~190 KB per SM are in flight from the first cycle. Items: i = b, b + G, b + 2G, ... (item index
// p * T + t, t fastest), so the blocks running together read neighbouring 128-byte pieces of the same
// packed rows.
//   gate_up stage: 64 packed rows (512 K) x (32 gate + 32 up columns) = 16 KB, 128-byte swizzled boxes
//     as in moe_decode_tma.cuh; warp w takes chunks 2w, 2w+1 (the gemv kernels' mma on (magic + q),
//     the group's scale and zero folded into fp32 sums), the 8 warps' sums are added in warp order
//     through shared memory.
//   down stage: 1024 output columns x the item's 4 packed rows (32 K), 16 KB: one box per warp of
//     4 rows x 132 int32 (4 column tiles + 4 columns of padding; unswizzled). The padding makes the row
//     pitch 528 bytes = 33 16-byte units, so lane (r, c) reading row c, unit u(r) hits bank group
//     (c + u) mod 8: the 8 lanes of a quarter-warp are conflict-free. The extra 4 columns are the
//     next box's first ones (L2 hits) or past H (zero-filled by TMA).
//   The block's partial y [H] lives in shared memory (fp32); each warp owns its 128 columns of a down
//   stage, so the updates need no synchronisation.
#pragma once
#include "moe_decode_tma.cuh"

namespace moequant {
namespace cuda {

constexpr int kFusedConsumers = 8;                              // consumer warps
constexpr int kFusedThreads = 32 * (kFusedConsumers + 1);       // + the producer warp
constexpr int kFusedRows13 = 64;                                // packed rows of a gate_up stage
constexpr int kFusedBox13 = kFusedRows13 * 128;                 // one matrix's box: 64 rows x 32 int32
constexpr int kFusedCols2 = 1024;                               // output columns of a down stage
constexpr int kFusedBox2Cols = 132;                             // 128 columns + 4 of padding (see above)
constexpr int kFusedPitch2 = kFusedBox2Cols * 4;                // 528 bytes
constexpr int kFusedBox2 = 2176;                                // 4 x 528 rounded up to 128 (TMA alignment)
constexpr int kFusedWeightBytes = kFusedConsumers * kFusedBox2;  // 17408 (>= 2 gate_up boxes; 17 x 1024)
constexpr int kFusedSmallBytes = 3072;  // scales at 0 (2 x 1 KB or 4 x 512 B), zero points at 2048
constexpr int kFusedSlotBytes = kFusedWeightBytes + kFusedSmallBytes;
constexpr int kFusedMaxSlots = 12;
constexpr int kFusedSmemLimit = 232448;  // 227 KB: the opt-in maximum per block on sm_90
constexpr int kFusedMaxGrid = 256;       // the reduce kernel's lanes read at most 8 partial rows each

// Shared memory: the slots (weights 1024-aligned for the swizzle, then the small parts), x [H] in x's
// dtype, the partial y [H] fp32, the cross-warp sums [8][64], act [32] and the mbarriers.
__host__ __device__ constexpr int fused_fixed_bytes(int H) { return 1024 + 6 * H + 8 * 64 * 4 + 128; }
__host__ __device__ constexpr int fused_slots(int H) {
  const int fit = (kFusedSmemLimit - fused_fixed_bytes(H)) / (kFusedSlotBytes + 16);  // + 16: its two mbarriers
  return fit < kFusedMaxSlots ? fit : kFusedMaxSlots;
}
__host__ __device__ constexpr int fused_smem_bytes(int H) {
  return fused_fixed_bytes(H) + fused_slots(H) * (kFusedSlotBytes + 16);
}
// Scale rows a gate_up stage covers (groups of 32 K -> 16, ... ; a group of 512 K or more -> 1).
__host__ __device__ inline int fused_group_rows13(int rpg) { return rpg >= kFusedRows13 ? 1 : kFusedRows13 / rpg; }

// One token; H a multiple of 1024 (whole stages of both GEMMs) and at most 8192 (shared memory); I a
// multiple of 32; gate_up groups of 32 K or more that divide a stage or are whole stages (per channel
// included, since H / 8 is then a multiple of 64); down groups of 32 K or more (an item's 32 K in one
// group).
inline bool decode_fused_ok(int M, int H, int I, int rpg13, int rpg2) {
  return M == 1 && H % kFusedCols2 == 0 && H <= 8192 && I % kDecodeTile == 0 && rpg13 % 4 == 0 &&
         (kFusedRows13 % rpg13 == 0 || rpg13 % kFusedRows13 == 0) && rpg2 % 4 == 0 && fused_slots(H) >= 2;
}
// Blocks of the fused grid: one per SM (the ring takes the SM's shared memory), at most one per item; but
// when the last round of items is at most half full, the fewest blocks that give no block more items:
// there a small tail would run on few SMs at the per-SM rate, while elsewhere every extra block is more
// bytes in flight in every round. Measured on the H100 (2026-12-07, BENCHMARKS.md "Decode fused MoE, v6"):
// Qwen3-30B-A3B, 192 items = 132 + 60: 96 blocks 16.1 us, 132 blocks 16.6; Mixtral, 896 = 6 x 132 + 104:
// 132 blocks 76.7 us, 128 blocks 78.0 (same run); DeepSeek-V2-Lite, 264 = 2 x 132: 132 blocks.
// MOEQUANT_DECODE_FUSED_GRID=n overrides (for measuring; read once, as the plan runs on every call).
inline int fused_grid(int top_k, int I, int num_sms) {
  static const int forced = [] {
    const char* env = std::getenv("MOEQUANT_DECODE_FUSED_GRID");
    return env ? std::atoi(env) : 0;
  }();
  const int items = top_k * (I / kDecodeTile);
  int g = std::max(1, std::min(items, forced > 0 ? forced : num_sms));
  const int tail = items % g;
  if (forced <= 0 && tail != 0 && 2 * tail <= g) {
    const int per_block = (items + g - 1) / g;
    g = (items + per_block - 1) / per_block;
  }
  return std::min(g, kFusedMaxGrid);
}

__device__ __forceinline__ void mbar_init_count(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;\n" ::"n"(32 * kFusedConsumers) : "memory"); }
__device__ __forceinline__ uint4 lds128(uint32_t addr) {
  uint4 v;
  asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "r"(addr));
  return v;
}

// The tensor maps of the fused kernel: gate_up weights in 64-row swizzled boxes, down weights in
// 4 x 132 boxes, scales and zero points in stage-sized boxes.
struct FusedMaps {
  CUtensorMap q13, s13, z13, q2, s2, z2;
};

template <typename T, bool Z13, bool Z2>
__global__ void __launch_bounds__(kFusedThreads, 1)
    moe_decode_fused_kernel(const __grid_constant__ FusedMaps maps, DecodeArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  pdl_launch_dependents();  // the reduce grid may be scheduled; it waits for this grid's results
  extern __shared__ uint8_t smem_raw[];
  uint8_t* smem = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
  const int H = a.H, I = a.I, NS = fused_slots(H);
  const int R13 = H / 8, R2 = I / 8, rpg13 = a.rows_per_group13, rpg2 = a.rows_per_group2;
  const int G13 = (R13 + rpg13 - 1) / rpg13, G2 = (R2 + rpg2 - 1) / rpg2, sr13 = fused_group_rows13(rpg13);
  const int T13 = I / kDecodeTile, items = a.top_k * T13, S13 = R13 / kFusedRows13, S2 = H / kFusedCols2;
  const int G = gridDim.x;
  const uint32_t weights0 = smem_u32(smem), small0 = weights0 + NS * kFusedWeightBytes;
  const uint32_t xs = small0 + NS * kFusedSmallBytes;  // x [H], T
  float* yacc = reinterpret_cast<float*>(smem + (xs - weights0) + 2 * H);  // [H]
  float* red = yacc + H;                                                     // [8][64]
  const uint32_t act = smem_u32(red + 8 * 64);                               // [32], T
  const uint32_t bars = act + 128;  // full[NS], then empty[NS]
  auto weights = [&](int slot) { return weights0 + slot * kFusedWeightBytes; };
  auto small = [&](int slot) { return small0 + slot * kFusedSmallBytes; };
  auto small_ptr = [&](int slot) { return smem + (small(slot) - weights0); };  // the same, as a pointer
  auto full = [&](int slot) { return bars + 8 * slot; };
  auto empty = [&](int slot) { return bars + 8 * (NS + slot); };
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;

  if (threadIdx.x == 32 * kFusedConsumers) {
    for (int s = 0; s < NS; ++s) {
      mbar_init_count(full(s), 1);
      mbar_init_count(empty(s), kFusedConsumers);
    }
    mbar_init_fence();
  }
  __syncthreads();

  if (warp == kFusedConsumers) {  // ---- producer: lane 0 issues every stage of the block's items ----
    if (lane != 0) return;
    const uint32_t bytes13 = 2 * kFusedBox13 + 2 * sr13 * 64 + (Z13 ? 2 * sr13 * 32 : 0);
    const uint32_t bytes2 = kFusedConsumers * kFusedPitch2 * 4 + 4 * 512 + (Z2 ? 4 * 256 : 0);
    int k = 0;
    for (int item = blockIdx.x; item < items; item += G) {
      const int p = item / T13, t = item % T13;
      const int e = load_expert(a.topk_ids, a.ids64, p, a.E);
      if (e < 0) continue;  // an id out of range: the pair contributes nothing
      for (int st = 0; st < S13; ++st, ++k) {
        const int slot = k % NS;
        mbar_wait(empty(slot), ((k / NS) & 1) ^ 1);
        mbar_expect_tx(full(slot), bytes13);
        const int row = e * R13 + st * kFusedRows13, grow = e * G13 + st * kFusedRows13 / rpg13;
#pragma unroll
        for (int m = 0; m < 2; ++m) {  // gate columns [32t, 32t + 32), up columns I + the same
          const int col = m * I + t * kDecodeTile;
          tma_load_2d(weights(slot) + m * kFusedBox13, &maps.q13, col, row, full(slot));
          tma_load_2d(small(slot) + m * 1024, &maps.s13, col, grow, full(slot));
          if (Z13) tma_load_2d(small(slot) + 2048 + m * 512, &maps.z13, col, grow, full(slot));
        }
      }
      const int row2 = e * R2 + t * 4, grow2 = e * G2 + t * 4 / rpg2;
      for (int ds = 0; ds < S2; ++ds, ++k) {
        const int slot = k % NS;
        mbar_wait(empty(slot), ((k / NS) & 1) ^ 1);
        mbar_expect_tx(full(slot), bytes2);
#pragma unroll
        for (int w = 0; w < kFusedConsumers; ++w)
          tma_load_2d(weights(slot) + w * kFusedBox2, &maps.q2, ds * kFusedCols2 + w * 128, row2, full(slot));
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          tma_load_2d(small(slot) + b * 512, &maps.s2, ds * kFusedCols2 + b * 256, grow2, full(slot));
          if (Z2) tma_load_2d(small(slot) + 2048 + b * 256, &maps.z2, ds * kFusedCols2 + b * 256, grow2, full(slot));
        }
      }
    }
    return;
  }

  // ---- consumers ----
  const int tid = threadIdx.x, c = lane & 3, r = lane >> 2;
  const int u = (r >> 1) | ((r & 1) << 2);  // the lane group's 16-byte column unit (moe_decode_tma.cuh)
  for (int i = tid; i < H / 8; i += 32 * kFusedConsumers) {
    const uint4 v = reinterpret_cast<const uint4*>(a.x)[i];
    asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};\n" ::"r"(xs + 16 * i), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
  }
  for (int i = tid; i < H / 4; i += 32 * kFusedConsumers)
    reinterpret_cast<float4*>(yacc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  consumers_sync();

  const uint32_t ones[4] = {Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes};
  int k = 0;
  for (int item = blockIdx.x; item < items; item += G) {
    const int p = item / T13;
    if (load_expert(a.topk_ids, a.ids64, p, a.E) < 0) continue;
    const float wp = routing_weight(a.topk_weights, a.weights_kind, p);

    // 1. gate and up of the item's 32 columns over all of K: this warp's chunks 2w, 2w + 1 of each stage
    float acc[2][2][4] = {}, part[2][2][4], sx[4];
    clear_sums(part, sx);
    for (int st = 0; st < S13; ++st, ++k) {
      const int slot = k % NS;
      mbar_wait(full(slot), (k / NS) & 1);
      const uint8_t* sp = small_ptr(slot);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int y = 4 * (2 * warp + jj) + c;  // the lane's packed row in the stage
        uint32_t b[2][2];
        act_fragments(lds128(xs + 16 * (st * kFusedRows13 + y)), b);
#pragma unroll
        for (int h = 0; h < 2; ++h) Half2Math<T>::mma(sx, ones, b[h][0], b[h][1]);
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          uint32_t af[2][2][4];
          chunk_fragments<T, true>(lds128(weights(slot) + m * kFusedBox13 + y * 128 + 16 * (u ^ (y & 7))),
                                   make_uint2(0u, 0u), 0u, af);
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int h = 0; h < 2; ++h) Half2Math<T>::mma(part[m][t], af[t][h], b[h][0], b[h][1]);
        }
        // groups of 32 K change every chunk; larger ones hold both of the warp's chunks
        if (jj == 1 || rpg13 == 4) {
          const int gr = rpg13 >= kFusedRows13 ? 0 : (y - c) / rpg13;  // the chunk's scale row in the stage
          uint2 sc[2];
          uint32_t zb[2];
#pragma unroll
          for (int m = 0; m < 2; ++m) {
            sc[m] = *reinterpret_cast<const uint2*>(sp + m * 1024 + gr * 64 + 8 * u);
            zb[m] = Z13 ? *reinterpret_cast<const uint32_t*>(sp + 2048 + m * 512 + gr * 32 + 4 * u) : 0x08080808u;
          }
          fold_group<T, 2, 1>(acc, part, sx, sc, zb);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(slot));
    }
    // the 8 warps' sums in warp order, then act = SiLU(gate) * up rounded to x's dtype (as h elsewhere)
    if (c == 0) {
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int v = 0; v < 4; ++v) red[warp * 64 + m * 32 + 4 * u + v] = acc[m][v >> 1][2 * (v & 1)];
    }
    consumers_sync();
    if (warp == 0) {
      float g = 0.f, up = 0.f;
#pragma unroll
      for (int w = 0; w < kFusedConsumers; ++w) {
        g += red[w * 64 + lane];
        up += red[w * 64 + 32 + lane];
      }
      const T h = from_float<T>(g / (1.f + __expf(-g)) * up);
      asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(act + 2 * lane), "h"(*reinterpret_cast<const uint16_t*>(&h)));
    }
    consumers_sync();

    // 2. down: y[cols] += w_p * sum over the item's 32 K, this warp's 128 columns of each stage
    uint32_t b[2][2];
    act_fragments(lds128(act + 16 * c), b);
    float sa[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int h = 0; h < 2; ++h) Half2Math<T>::mma(sa, ones, b[h][0], b[h][1]);
    for (int ds = 0; ds < S2; ++ds, ++k) {
      const int slot = k % NS;
      mbar_wait(full(slot), (k / NS) & 1);
      const uint32_t box = weights(slot) + warp * kFusedBox2;
      const uint8_t* sp = small_ptr(slot);
#pragma unroll
      for (int tt = 0; tt < 4; ++tt) {
        uint32_t af[2][2][4];
        chunk_fragments<T, true>(lds128(box + c * kFusedPitch2 + tt * 128 + 16 * u), make_uint2(0u, 0u), 0u, af);
        float pd[2][4] = {};
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int h = 0; h < 2; ++h) Half2Math<T>::mma(pd[t], af[t][h], b[h][0], b[h][1]);
        const int cs = (warp & 1) * 128 + tt * 32 + 4 * u;  // column in the stage's scale box warp / 2
        const uint2 sc = *reinterpret_cast<const uint2*>(sp + (warp >> 1) * 512 + 2 * cs);
        const uint32_t zb = Z2 ? *reinterpret_cast<const uint32_t*>(sp + 2048 + (warp >> 1) * 256 + cs) : 0x08080808u;
        if (c == 0) {
          float4* yp = reinterpret_cast<float4*>(yacc + ds * kFusedCols2 + warp * 128 + tt * 32 + 4 * u);
          float4 yv = *yp;
          float* yf = reinterpret_cast<float*>(&yv);
#pragma unroll
          for (int v = 0; v < 4; ++v) {
            const float s = wp * scale_at<T>(sc, v), z = magic_plus_zero<T>(zb, v);
            yf[v] = fmaf(s, fmaf(-z, sa[0], pd[v >> 1][2 * (v & 1)]), yf[v]);
          }
          *yp = yv;
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(slot));
    }
  }
  // the block's partial y -> out2[block] (read by moe_decode_fused_reduce after this grid completes)
  consumers_sync();
  float4* dst = reinterpret_cast<float4*>(a.out2 + static_cast<int64_t>(blockIdx.x) * H);
  for (int i = tid; i < H / 4; i += 32 * kFusedConsumers) __stcg(dst + i, reinterpret_cast<const float4*>(yacc)[i]);
#else
  __trap();  // launched only where decode_fused_available() found sm_90 code
#endif
}

// y[:, 4j .. 4j + 3] = sum of the G partial rows, one warp per 4 columns: lane l adds rows l, l + 32, ...
// in order, then a butterfly over the lanes (a fixed order: deterministic).
template <typename T>
__global__ void __launch_bounds__(256) moe_decode_fused_reduce(const float* part, int G, int H, T* y) {
  pdl_wait();  // the fused grid's partial sums are complete and visible
  const int unit = blockIdx.x * 8 + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (4 * unit >= H) return;
  float4 v[kFusedMaxGrid / 32];
#pragma unroll
  for (int i = 0; i < kFusedMaxGrid / 32; ++i) {
    const int row = lane + 32 * i;
    v[i] = row < G ? __ldcg(reinterpret_cast<const float4*>(part + static_cast<int64_t>(row) * H) + unit)
                   : make_float4(0.f, 0.f, 0.f, 0.f);
  }
  float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kFusedMaxGrid / 32; ++i) {
    s[0] += v[i].x;
    s[1] += v[i].y;
    s[2] += v[i].z;
    s[3] += v[i].w;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j] += __shfl_xor_sync(0xffffffffu, s[j], off);
  if (lane < 4) y[4 * unit + lane] = from_float<T>(s[lane]);
}

// ---- host ----
template <typename T>
bool encode_fused_maps(const DecodeArgs<T>& a, FusedMaps& maps) {
  maps = FusedMaps{};
  const int R13 = a.H / 8, R2 = a.I / 8;
  const int64_t G13 = (R13 + a.rows_per_group13 - 1) / a.rows_per_group13;
  const int64_t G2 = (R2 + a.rows_per_group2 - 1) / a.rows_per_group2;
  const int sr13 = fused_group_rows13(a.rows_per_group13);
  return encode_map(&maps.q13, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, a.w13, int64_t{a.E} * R13, 2 * a.I, 32, kFusedRows13,
                    true) &&
         encode_map(&maps.s13, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.s13, a.E * G13, 2 * a.I, 32, sr13, false) &&
         (!a.z13 || encode_map(&maps.z13, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, a.z13, a.E * G13, 2 * a.I, 32, sr13, false)) &&
         encode_map(&maps.q2, CU_TENSOR_MAP_DATA_TYPE_INT32, 4, a.w2, int64_t{a.E} * R2, a.H, kFusedBox2Cols, 4, false) &&
         encode_map(&maps.s2, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, a.s2, a.E * G2, a.H, 256, 1, false) &&
         (!a.z2 || encode_map(&maps.z2, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, a.z2, a.E * G2, a.H, 256, 1, false));
}

// Whether decode_plan takes the fused kernel when MOEQUANT_DECODE_FUSED is not set: on, as it measured
// faster than the two-launch kernels on every shape (BENCHMARKS.md "Decode fused MoE, v6").
constexpr bool kFusedByDefault = true;

// The current device runs sm_90 code of the fused kernel and the driver encodes tensor maps, and the path
// is wanted: MOEQUANT_DECODE_FUSED=1 / =0 turns it on / off, unset: kFusedByDefault.
inline bool decode_fused_available() {
  static const bool ok = [] {
    const char* env = std::getenv("MOEQUANT_DECODE_FUSED");
    if (env ? env[0] != '1' : !kFusedByDefault) return false;
    int dev = 0, major = 0;
    cudaFuncAttributes attr{};
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9 ||
        cudaFuncGetAttributes(&attr, moe_decode_fused_kernel<__nv_bfloat16, false, false>) != cudaSuccess)
      return false;
    return attr.ptxVersion >= 90 && tensor_map_encoder() != nullptr;
  }();
  return ok;
}

// Needs a.split2 = the grid (fused_grid) and a.out2 with room for [grid][H] floats.
template <typename T, bool Z13, bool Z2>
cudaError_t launch_decode_fused(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.split2 < 1 || a.split2 > kFusedMaxGrid || !decode_fused_ok(a.M, a.H, a.I, a.rows_per_group13, a.rows_per_group2))
    return cudaErrorInvalidValue;
  FusedMaps maps;
  if (!encode_fused_maps(a, maps)) return cudaErrorInvalidValue;
  auto kernel = moe_decode_fused_kernel<T, Z13, Z2>;
  static const cudaError_t attr =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFusedSmemLimit);
  if (attr != cudaSuccess) return attr;
  kernel<<<a.split2, kFusedThreads, fused_smem_bytes(a.H), stream>>>(maps, a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_maybe_pdl(moe_decode_fused_reduce<T>, dim3((a.H / 4 + 7) / 8), dim3(256), 0, stream, decode_use_pdl(),
                          static_cast<const float*>(a.out2), a.split2, a.H, a.y);
}

}  // namespace cuda
}  // namespace moequant
