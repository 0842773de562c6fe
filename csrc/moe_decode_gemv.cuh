// Single-token decode (M = 1): the fused MoE layer as two weight-streaming GEMVs with a register ring
// (every arch; on sm_90 moe_decode_tma.cuh streams through shared memory instead). Torch-free: the
// extension and the standalone tests include it.
//
// With one token every pair (token, slot) has its own expert, so there is nothing to share between
// pairs and no pair list. What the tiled kernel spends on serving up to 16 tokens (shared-memory
// staging, a cp.async ring, token slots, a cross-warp reduction) is gone; what is left per 32 K of a
// 32-column tile is the loads, one shift + one LOP3 per pair of weights and the mmas (~100
// instructions per KB of weights in SASS, against ~250 in the tiled kernel):
//   - each warp owns one (pair, K slice, column tile); each lane loads its 16 bytes of weights (4
//     columns x 8 K, as in the tiled kernel) straight into registers, GemvDepth chunks ahead (the loop
//     is unrolled by that depth, so the ring is in registers);
//   - mma.sync m16n8k16 on (magic + q) with the token's activations in every one of the 8 B columns,
//     so every lane ends with the sums of its own rows (no shuffles); the group's scale and zero point
//     are folded into the fp32 sums once per group (groups of 32 or more, or a single group);
//   - K slices are added by the last slice to arrive (a counter); the down warps of a column tile hand
//     their fp32 sums to the last one, which applies the routing weights and the top-k sum in slot
//     order. Deterministic, no atomics on data, no block barriers.
// The down launch is a programmatic dependent launch (sm_90): its warps start while the last gate_up
// warps run and prefetch their weights (which do not depend on gate_up), and wait for h only before
// the first activation load (griddepcontrol.wait).
// Measured limit (BENCHMARKS.md, "Decode fused MoE, v4"): ~58% of HBM on Mixtral. ptxas tracks every
// load of the register ring on one scoreboard, and each step's first use waits for the whole scoreboard
// (SASS wait masks), so a warp has about one chunk in flight per round trip, not GemvDepth. A cp.async
// ring (explicit waits) measured slower (LDGSTS path); TMA boxes with an mbarrier per stage are
// moe_decode_tma.cuh.
#pragma once
#include <algorithm>
#include <cstdlib>

#include "moe_decode_kernels.cuh"

namespace moequant {
namespace cuda {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;

// Chunks in flight per warp. gate_up (NW = 2): the ring holds 2 weight loads per chunk and x is read
// one chunk ahead (it is L1-resident: every warp reads the same token); down: 1 weight load and h
// (read through L2, see load_act_cg_if) per chunk. 48 registers of ring either way.
template <int NW> struct GemvDepth { static constexpr int value = 6; };

// 16-byte loads that leave v as it was when pred is false (predicated, no branch).
// Weights are read once: L1::no_allocate keeps them from evicting the activations.
__device__ __forceinline__ void load_weights_if(uint4& v, const int32_t* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n"
               " @q ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%5];\n}\n"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "r"(static_cast<int>(pred)), "l"(p));
}
__device__ __forceinline__ void load_act_if(uint4& v, const void* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n @q ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%5];\n}\n"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "r"(static_cast<int>(pred)), "l"(p));
}

// Activations: from L2 (ld.global.cg). The down grid starts before gate_up has written h (programmatic
// dependent launch), so h is not read-only over the reader's lifetime, which ld.global.nc requires.
__device__ __forceinline__ void load_act_cg_if(uint4& v, const void* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %4, 0;\n @q ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%5];\n}\n"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "r"(static_cast<int>(pred)), "l"(p));
}
// Release/acquire between the warps of a reduction (lighter than __threadfence's fence.sc).
__device__ __forceinline__ void fence_acq_rel_gpu() { asm volatile("fence.acq_rel.gpu;\n" ::: "memory"); }

// Programmatic dependent launch (no-ops when the kernel was launched without the attribute).
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::);
#endif
}

// The mma sums of one group: part (per matrix and tile, the D fragment) and sx (the D fragment of the
// activations against ones: sum x per token).
template <int NW> __device__ __forceinline__ void clear_sums(float (&part)[NW][2][4], float (&sx)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    sx[i] = 0.f;
#pragma unroll
    for (int m = 0; m < NW; ++m)
#pragma unroll
      for (int t = 0; t < 2; ++t) part[m][t][i] = 0.f;
  }
}
// acc += s * (sum (magic + q) x - (magic + z) * sum x) for the lane's 4 columns of each matrix (sc: their
// scales, zb: their zero codes, 0x08080808 when symmetric) and its tokens k < KT (D fragment entries
// 2i + k), once per group; then the group's sums start over.
template <typename T, int NW, int KT>
__device__ __forceinline__ void fold_group(float (&acc)[NW][2][4], float (&part)[NW][2][4], float (&sx)[4],
                                           const uint2 (&sc)[NW], const uint32_t (&zb)[NW]) {
#pragma unroll
  for (int m = 0; m < NW; ++m)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int v = 2 * t + i;  // the lane's column col + v
        const float sv = scale_at<T>(sc[m], v), z = magic_plus_zero<T>(zb[m], v);
#pragma unroll
        for (int k = 0; k < KT; ++k)
          acc[m][t][2 * i + k] = fmaf(sv, fmaf(-z, sx[k], part[m][t][2 * i + k]), acc[m][t][2 * i + k]);
      }
  clear_sums(part, sx);
}

// One warp's K range [c_begin, c_end) (chunks of 32 K) of NW column tiles (gate_up: gate at col,
// up at col + up_offset) for one token. in: the token's input row. Returns, per matrix m and mma
// tile t, the sums of columns col + 2t (acc[m][t][0]) and col + 2t + 1 (acc[m][t][2]): gemv_epilogue's
// layout for one token.
// wait: call pdl_wait() after the weight prefetch and before the first activation load.
// X_RING (down): the activations travel in the ring, read through L2 (load_act_cg_if); else (gate_up)
// one chunk ahead through L1.
template <typename T, int NW, bool ZEROS, bool X_RING>
__device__ __forceinline__ void gemv_tile(const T* in, const int32_t* qe, const uint16_t* se, const uint8_t* ze,
                                          int64_t wcols, int64_t up_offset, int rows_per_group, int col, bool col_ok,
                                          int c_begin, int c_end, bool wait, float (&acc)[NW][2][4]) {
  constexpr int D = GemvDepth<NW>::value;
  const int c = threadIdx.x & 3;
#pragma unroll
  for (int m = 0; m < NW; ++m)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][t][i] = 0.f;
  if (c_begin >= c_end) {
    if (wait) pdl_wait();
    return;
  }
  // A lane whose columns are out of range (N not a multiple of 32) streams column 0 instead and
  // discards the sums: no branch in the loop.
  const int colx = col_ok ? col : 0;
  const int64_t qstep = 4 * wcols;  // int32 words from one chunk to the next
  const int32_t* qp = qe + colx + static_cast<int64_t>(4 * c_begin + c) * wcols;
  const T* xp = in + 8 * (4 * c_begin + c);

  // The register ring: slot d holds chunk c_begin + i with i % D == d. Running pointers, one 64-bit
  // add per load (the stride is a runtime value).
  const int n_chunks = c_end - c_begin;
  constexpr int DX = X_RING ? D : 1;
  uint4 wq[D][NW], xq[DX];
  const int32_t* qload[NW];
#pragma unroll
  for (int m = 0; m < NW; ++m) qload[m] = qp + m * up_offset;
  const T* xload = xp;
#pragma unroll
  for (int d = 0; d < D; ++d)
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      load_weights_if(wq[d][m], qload[m], d < n_chunks);
      qload[m] += qstep;
    }
  if (wait) pdl_wait();
  if constexpr (X_RING) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      load_act_cg_if(xq[d], xload, d < n_chunks);
      xload += 32;
    }
  } else {
    load_act_if(xq[0], xload, true);
    xload += 32;
  }

  // the group of the current chunk, its scales (one 16-bit scale per column) and zero codes
  int64_t goff = colx + static_cast<int64_t>((4 * c_begin) / rows_per_group) * wcols;
  int g_end = ((4 * c_begin) / rows_per_group + 1) * rows_per_group;  // first packed row of the next group
  uint2 gsc[NW];
  uint32_t gz[NW];
  auto load_groups = [&]() {
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      gsc[m] = __ldg(reinterpret_cast<const uint2*>(se + m * up_offset + goff));
      gz[m] = ZEROS ? __ldg(reinterpret_cast<const uint32_t*>(ze + m * up_offset + goff)) : 0x08080808u;
    }
  };
  load_groups();
  // mma D fragments, kept whole: with the token in every B column, entries 1 and 3 repeat 0 and 2
  float part[NW][2][4], sx[4];
  clear_sums(part, sx);
  auto fold = [&]() { fold_group<T, NW, 1>(acc, part, sx, gsc, gz); };
  const uint32_t ones[4] = {Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes};
  int prow = 4 * c_begin;  // first packed row of the current chunk
  for (int base = 0; base < n_chunks; base += D) {
#pragma unroll
    for (int d = 0; d < D; ++d) {
      if (base + d < n_chunks) {  // warp-uniform
        if (prow >= g_end) {  // a new group: apply the finished one, fetch this one's scales
          fold();
          g_end += rows_per_group;
          goff += wcols;
          load_groups();
        }
        // compute on slot d, then refill it with chunk base + d + D: the loads are issued after the
        // last read of the slot, so the ring needs no register copies
        uint32_t b[2][2];
        if constexpr (X_RING) {
          act_fragments(xq[d], b);
        } else {  // this chunk's x, then the next one's load
          act_fragments(xq[0], b);
          load_act_if(xq[0], xload, base + d + 1 < n_chunks);
          xload += 32;
        }
#pragma unroll
        for (int j = 0; j < 2; ++j) Half2Math<T>::mma(sx, ones, b[j][0], b[j][1]);
#pragma unroll
        for (int m = 0; m < NW; ++m) {
          uint32_t a[2][2][4];
          chunk_fragments<T, true>(wq[d][m], make_uint2(0u, 0u), 0u, a);
#pragma unroll
          for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int j = 0; j < 2; ++j) Half2Math<T>::mma(part[m][t], a[t][j], b[j][0], b[j][1]);
        }
        const bool more = base + d + D < n_chunks;
#pragma unroll
        for (int m = 0; m < NW; ++m) {
          load_weights_if(wq[d][m], qload[m], more);
          qload[m] += qstep;
        }
        if constexpr (X_RING) {
          load_act_cg_if(xq[d], xload, more);
          xload += 32;
        }
        prow += 4;
      }
    }
  }
  fold();
}

// Slots of a call: the gemv kernels give every warp a slot j (an expert) and serve in it all the tokens
// of the call routed to that expert. One token (MT = 1): slot j is pair j. MT > 1 (the TMA kernel, up to
// 8 tokens and 64 pairs): slot j is the j-th distinct expert in order of first appearance in topk_ids.
// Every lane gets: n, the slots in use; expert, the expert of slot `want` (-1 if unused); and for pairs
// `lane` and `lane + 32`, their slot (-1 for an id out of range, which contributes nothing).
struct PairSlots {
  int n, expert, slot0, slot1;
};
// The slots of a call (grid rows of the gemv kernels; h is [slots][M] rows): M = 1, its pairs; more
// tokens, at most one per expert.
__host__ __device__ inline int decode_slots(int M, int top_k, int E) {
  return M == 1 ? top_k : (E < M * top_k ? E : M * top_k);
}
template <typename T, int MT>
__device__ __forceinline__ PairSlots pair_slots(const DecodeArgs<T>& a, int want) {
  const int P = a.M * a.top_k, lane = threadIdx.x & 31;
  const int e0 = lane < P ? load_expert(a.topk_ids, a.ids64, lane, a.E) : -1;
  const int e1 = lane + 32 < P ? load_expert(a.topk_ids, a.ids64, lane + 32, a.E) : -1;
  PairSlots ps;
  if (MT == 1) {
    ps.n = P;
    ps.expert = load_expert(a.topk_ids, a.ids64, want, a.E);
    ps.slot0 = e0 >= 0 ? lane : -1;
    ps.slot1 = e1 >= 0 ? lane + 32 : -1;
    return ps;
  }
  int f0 = lane, f1 = lane + 32;  // the first pair with the same expert
  for (int i = 0; i < P; ++i) {
    const int ei = __shfl_sync(0xffffffffu, i < 32 ? e0 : e1, i & 31);
    if (ei == e0) f0 = min(f0, i);
    if (ei == e1) f1 = min(f1, i);
  }
  const uint64_t first = __ballot_sync(0xffffffffu, e0 >= 0 && f0 == lane) |
                         static_cast<uint64_t>(__ballot_sync(0xffffffffu, e1 >= 0 && f1 == lane + 32)) << 32;
  ps.n = __popcll(first);
  ps.slot0 = e0 >= 0 ? __popcll(first & ((1ull << f0) - 1)) : -1;
  ps.slot1 = e1 >= 0 ? __popcll(first & ((1ull << f1) - 1)) : -1;
  ps.expert = -1;
  if (want < ps.n) {  // the pair that first names slot want's expert: the want-th set bit of first
    uint64_t m = first;
    for (int q = 0; q < want; ++q) m &= m - 1;
    const int pos = __ffsll(static_cast<long long>(m)) - 1;
    ps.expert = __shfl_sync(0xffffffffu, pos < 32 ? e0 : e1, pos & 31);
  }
  return ps;
}

// The end of a gemv warp (the register kernel, MT = 1, and the TMA kernel): acc[m][t][2i + a] is column
// m * N + col + 2t + i for the slot's token a (MT = 1: token 0, in every lane) or 2c + a (MT > 1, lane
// 4r + c), summed over K slice s of column tile `tile`. gate_up: NW = 2 matrices (gate, up) of N = I
// columns; down: NW column blocks of N = H / NW. The workspaces are [S][slots][M] rows of NW * N columns
// (h: [slots][M] rows of I). One slice: gate_up writes h; else the sums go to the workspace and the last
// warp to arrive (a counter) reduces them in a fixed order: gate_up slice by slice; down token by token,
// pair by pair in topk order, slice by slice.
template <typename T, bool GATED, int MT, int NW>
__device__ __forceinline__ void gemv_epilogue(const DecodeArgs<T>& a, const PairSlots& ps, const float (&acc)[NW][2][4],
                                              int j, int s, int tile, int col) {
  static_assert(!GATED || NW == 2, "gate_up has two matrices");
  const int M = a.M, P = M * a.top_k, slots = decode_slots(M, a.top_k, a.E);
  const int N = GATED ? a.I : a.H / NW, tiles = N / kDecodeTile;
  const int S = GATED ? a.split13 : a.split2;
  const int lane = threadIdx.x & 31, c = lane & 3;
  const int64_t wcols = NW * static_cast<int64_t>(N);
  // the lane's tokens: MT = 1, token 0 in the lanes c = 0 (all lanes hold it); else tokens 2c, 2c + 1
  auto token = [&](int t) { return MT == 1 ? (c == 0 && t == 0 ? 0 : M) : 2 * c + t; };
  if (GATED && S == 1) {
#pragma unroll
    for (int t = 0; t < 2; ++t)
      if (token(t) < M) {
#pragma unroll
        for (int v = 0; v < 4; ++v) {
          const float g = acc[0][v >> 1][2 * (v & 1) + t], up = acc[1][v >> 1][2 * (v & 1) + t];
          a.h[(static_cast<int64_t>(j) * M + token(t)) * N + col + v] = from_float<T>(g / (1.f + __expf(-g)) * up);
        }
      }
    return;
  }
  float* work = (GATED ? a.out13 : a.out2) + (static_cast<int64_t>(s) * slots + j) * M * wcols;
  bool wrote = false;
#pragma unroll
  for (int t = 0; t < 2; ++t)
    if (token(t) < M) {
#pragma unroll
      for (int m = 0; m < NW; ++m)
        *reinterpret_cast<float4*>(work + token(t) * wcols + m * N + col) =
            make_float4(acc[m][0][t], acc[m][0][2 + t], acc[m][1][t], acc[m][1][2 + t]);
      wrote = true;
    }
  if (wrote) fence_acq_rel_gpu();  // the sums are visible device-wide before this warp counts in
  __syncwarp();
  // gate_up: a counter per (slot, tile), S arrivals; down: one per tile, (slots in use) * S arrivals
  int last = 0;
  if (lane == 0) {
    int* counter = GATED ? a.counters + j * tiles + tile
                         : a.counters + static_cast<int64_t>(a.E) * ((a.I + kDecodeTile - 1) / kDecodeTile) + tile;
    last = atomicAdd(counter, 1) + 1 == (GATED ? S : ps.n * S);
    if (last) *counter = 0;  // left at zero for the next call
  }
  if (!__shfl_sync(0xffffffffu, last, 0)) return;
  fence_acq_rel_gpu();
  // The partial sums are read B at a time (independent loads: one L2 round trip per batch, not one per
  // row) and added in the same order as one at a time.
  constexpr int B = 16;
  const int cc = tile * kDecodeTile + lane;  // one column per lane
  if (GATED) {  // rows (token, slice), token-major
    const int rows = M * S;
    float g = 0.f, up = 0.f;
    int lt = 0, lk = 0, t = 0, k = 0;  // the next row to load, the next row to add
    for (int i0 = 0; i0 < rows; i0 += B / 2) {
      float tg[B / 2], tu[B / 2];
#pragma unroll
      for (int i = 0; i < B / 2; ++i) {
        const float* src = a.out13 + ((static_cast<int64_t>(lk) * slots + j) * M + lt) * wcols + cc;
        tg[i] = i0 + i < rows ? __ldcg(src) : 0.f;
        tu[i] = i0 + i < rows ? __ldcg(src + N) : 0.f;
        if (++lk == S) { lk = 0; ++lt; }
      }
#pragma unroll
      for (int i = 0; i < B / 2; ++i) {
        if (i0 + i < rows) {  // warp-uniform
          g += tg[i];
          up += tu[i];
          if (++k == S) {
            a.h[(static_cast<int64_t>(j) * M + t) * N + cc] = from_float<T>(g / (1.f + __expf(-g)) * up);
            g = up = 0.f;
            k = 0;
            ++t;
          }
        }
      }
    }
  } else {  // rows (token, pair of the token, slice); y[t] = sum_pairs w * (sum_slices out2)
    const int k_top = a.top_k, rows = P * S;
    // pair q's weight and slot, from the lanes that hold them (pairs q and q + 32)
    const float w0 = ps.slot0 >= 0 ? routing_weight(a.topk_weights, a.weights_kind, lane) : 0.f;
    const float w1 = ps.slot1 >= 0 ? routing_weight(a.topk_weights, a.weights_kind, lane + 32) : 0.f;
    auto weight = [&](int q) {
      const float lo = __shfl_sync(0xffffffffu, w0, q & 31), hi = __shfl_sync(0xffffffffu, w1, q & 31);
      if (q < 64) return q < 32 ? lo : hi;
      return load_expert(a.topk_ids, a.ids64, q, a.E) >= 0 ? routing_weight(a.topk_weights, a.weights_kind, q) : 0.f;
    };
    auto slot_of = [&](int q) {  // pairs >= 64 only with MT = 1, where the slot is the pair
      const int lo = __shfl_sync(0xffffffffu, ps.slot0, q & 31), hi = __shfl_sync(0xffffffffu, ps.slot1, q & 31);
      return q < 32 ? lo : q < 64 ? hi : q;
    };
    float y[NW], v[NW];
#pragma unroll
    for (int m = 0; m < NW; ++m) y[m] = v[m] = 0.f;
    int lq = 0, lk = 0, q = 0, k = 0;  // the next row to load (pair, slice), the next row to add
    for (int i0 = 0; i0 < rows; i0 += B / NW) {
      float tv[B / NW][NW];
#pragma unroll
      for (int i = 0; i < B / NW; ++i) {
        const int sl = slot_of(lq);
        const float* src = a.out2 + ((static_cast<int64_t>(lk) * slots + (sl >= 0 ? sl : 0)) * M + lq / k_top) * wcols + cc;
#pragma unroll
        for (int m = 0; m < NW; ++m) tv[i][m] = i0 + i < rows && sl >= 0 ? __ldcg(src + m * N) : 0.f;
        if (++lk == S) { lk = 0; ++lq; }
      }
#pragma unroll
      for (int i = 0; i < B / NW; ++i) {
        if (i0 + i < rows) {  // warp-uniform
#pragma unroll
          for (int m = 0; m < NW; ++m) v[m] += tv[i][m];
          if (++k == S) {  // pair q done
            const float w = weight(q);
#pragma unroll
            for (int m = 0; m < NW; ++m) {
              y[m] = fmaf(w, v[m], y[m]);
              v[m] = 0.f;
            }
            k = 0;
            if (++q % k_top == 0) {  // token q / k_top - 1 done
#pragma unroll
              for (int m = 0; m < NW; ++m) {
                a.y[static_cast<int64_t>(q / k_top - 1) * wcols + m * N + cc] = from_float<T>(y[m]);
                y[m] = 0.f;
              }
            }
          }
        }
      }
    }
  }
}

// Work split: one warp per (pair p, K slice s, 32-column tile), the tile running fastest, so the
// warps that run at the same time read the same packed rows of neighbouring tiles (DRAM pages are
// shared; a first version gave each warp an equal run of a (pair, tile, chunk) line, which spread the
// concurrent reads over all rows: 57-60% of HBM in ncu against 2.7 TB/s for the same bytes read
// row-wise, benchmarks/micro/read_pattern.cu). With S > 1 slices, the fp32 sums go to a workspace
// [s][p][cols] and the last slice of a (pair, tile) (gate_up) or of a tile (down, all pairs) to
// arrive, by a counter, adds them in slice order. Deterministic; no block barriers.
// GATED (launch 1): h[p] = SiLU(gate) * up. else (launch 2): y = sum_p w_p * down_p(h[p]).
template <typename T, bool GATED, bool ZEROS>
__global__ void __launch_bounds__(kGemvThreads, 2) moe_decode_gemv_kernel(DecodeArgs<T> a) {
  constexpr int NW = GATED ? 2 : 1;
  if (GATED) pdl_launch_dependents();  // the down grid may start as the gate_up warps finish

  const int P = a.top_k;  // M == 1: pair p is slot p of the token
  const int N = GATED ? a.I : a.H, R = (GATED ? a.H : a.I) / 8;
  const int tiles = N / kDecodeTile, chunks = R / 4;  // N, K multiples of 32 on this path
  const int S = GATED ? a.split13 : a.split2;
  const int lane = threadIdx.x & 31, r = lane >> 2;
  const int gw = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  if (gw >= P * S * tiles) return;
  const int tile = gw % tiles, s = (gw / tiles) % S, p = gw / (tiles * S);
  const int c_begin = chunks * s / S, c_end = chunks * (s + 1) / S;
  const int rpg = GATED ? a.rows_per_group13 : a.rows_per_group2;
  const int G = (R + rpg - 1) / rpg;
  const int64_t wcols = NW * static_cast<int64_t>(N);
  const int col = tile * kDecodeTile + 4 * r;
  const int expert = load_expert(a.topk_ids, a.ids64, p, a.E);
  float acc[NW][2][4] = {};  // gemv_epilogue's layout, token 0 in entries 0 and 2
  if (expert >= 0) {
    const int32_t* qe = (GATED ? a.w13 : a.w2) + static_cast<int64_t>(expert) * R * wcols;
    const uint16_t* se = reinterpret_cast<const uint16_t*>(GATED ? a.s13 : a.s2) + static_cast<int64_t>(expert) * G * wcols;
    const uint8_t* ze = ZEROS ? (GATED ? a.z13 : a.z2) + static_cast<int64_t>(expert) * G * wcols : nullptr;
    const T* in = GATED ? a.x : a.h + static_cast<int64_t>(p) * a.I;
    gemv_tile<T, NW, ZEROS, !GATED>(in, qe, se, ze, wcols, N, rpg, col, true, c_begin, c_end, !GATED, acc);
  } else if (!GATED) {  // an id out of range: the pair contributes nothing
    pdl_wait();
  }
  gemv_epilogue<T, GATED, 1, NW>(a, pair_slots<T, 1>(a, p), acc, p, s, tile, col);
}

// This path takes one token with K (H and I) a multiple of 32 and groups that span whole chunks.
inline bool decode_gemv_ok(int M, int H, int I, int rpg13, int rpg2) {
  return M == 1 && H % 32 == 0 && I % 32 == 0 && decode_fold(H, rpg13) && decode_fold(I, rpg2);
}

// Programmatic dependent launch of the down kernel: sm_90 and later; MOEQUANT_DECODE_PDL=0 turns it
// off (for measuring it; the results are the same either way).
inline bool decode_use_pdl() {
  static const bool use = [] {
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
      return false;
    const char* env = std::getenv("MOEQUANT_DECODE_PDL");
    return major >= 9 && !(env && env[0] == '0');
  }();
  return use;
}

// kernel(args...) on grid x block with smem bytes of dynamic shared memory; with pdl, as a programmatic
// dependent launch of the kernel before it in the stream.
template <typename... KArgs, typename... Args>
cudaError_t launch_maybe_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, int smem, cudaStream_t stream, bool pdl,
                             Args... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, args...);
}

template <typename T, bool ZEROS13, bool ZEROS2>
cudaError_t launch_decode_gemv(const DecodeArgs<T>& a, cudaStream_t stream) {
  const dim3 g1((a.top_k * a.split13 * (a.I / kDecodeTile) + kGemvWarps - 1) / kGemvWarps);
  const dim3 g2((a.top_k * a.split2 * (a.H / kDecodeTile) + kGemvWarps - 1) / kGemvWarps);
  moe_decode_gemv_kernel<T, true, ZEROS13><<<g1, kGemvThreads, 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_maybe_pdl(moe_decode_gemv_kernel<T, false, ZEROS2>, g2, dim3(kGemvThreads), 0, stream, decode_use_pdl(), a);
}

}  // namespace cuda
}  // namespace moequant
