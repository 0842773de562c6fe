// Small-batch fused MoE for decode (M of 1 to ~16 tokens), 4-bit packed experts (w4a16).
// Torch-free: the extension (moe_decode_cuda.cu) and the standalone tests include it.
//
// Two launches, no host synchronisation, no routing pre-pass:
//   1 gate_up: block (pair p, 32-column tile, K split s). The blocks of the first pair routed to an
//     expert own that expert ("owner"); the others exit at once. The owner lists the pairs routed to
//     its expert, streams its K slice of the expert's packed gate and up columns of its tile exactly
//     once and serves all those tokens. With one split it writes h[p, :] = SiLU(gate) * up, rounded to
//     x's dtype (as the dense layer rounds it); with several, fp32 partial sums, and the last of the
//     tile's splits to arrive (a counter) adds them in split order and writes h.
//   2 down: block (pair p, 32-column tile, K split s), the same scheme over w2 with h as input, fp32
//     partial sums out2[s, p, :]. Every block, owner or not, then counts itself in on its column tile;
//     the last one to arrive sums that tile for every token in a fixed order:
//     y[t, :] = sum_k topk_weight[t, k] * sum_s out2[s, t*k + k, :]. No atomics on data: deterministic.
//   K splits (decode_splits) cut the work into enough blocks that the last wave is not mostly empty
//   (ncu on Mixtral M=1 without them: 2.26 waves, "the partial wave may account for 33% of the time").
//
// The GEMMs run on tensor cores (mma.sync m16n8k16, fp32 accumulators) although at this M most of the
// tile is empty: an mma costs one issue slot for 256 weights, where a CUDA-core GEMV spends one FMA per
// weight per token. The kernel is then bound by streaming the packed weights, as it should be.
//
// Warp tile: 32 output columns x 32 K (one "chunk") per step. Lane l = 4r + c copies 16 bytes, the 4
// packed words of columns 4r..4r+3 at packed row 4*chunk + c (each warp-wide copy reads 4 rows x 128
// contiguous bytes), with cp.async into shared memory 2-3 chunks ahead, so no registers are held while
// the loads fly (the first version held them in registers: 124 registers, 25% occupancy, 40% of DRAM
// bandwidth in ncu). The mma's 16 K slots are a permutation of the physical K (free, as long as the
// weights and the activations use the same one): lane c's slots hold the nibbles of its own word, paired
// (j, j+4) so that one shift and one LOP3 turn a word into two 16-bit numbers (magic + q):
//   bf16: 0x4300 | q = 128 + q,   fp16: 0x6400 | q = 1024 + q   (exact: the ulp there is 1)
// Groups of 32 or more: the mma runs on (magic + q) as is, and each group's scale and zero point are
// applied to the fp32 sums once per group and column (FOLD, see decode_gemm_tile): 2 integer ops per
// pair of weights. Groups of 8 or 16: (v - (magic + z)) * s in 16-bit per element, the reference's
// dequantized weight bit for bit. Tile t of the mma (16 rows) takes columns 4r+2t (rows r) and
// 4r+2t+1 (rows r+8); mma j of a chunk takes nibble pairs (2j, 2j+4) and (2j+1, 2j+5); the
// activations are permuted to match with two byte-permutes per mma.
#pragma once
#include "cuda_common.cuh"

namespace moequant {
namespace cuda {

constexpr int kDecodeThreads = 256;   // 8 warps: each one a K slice of the block's column tile
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kDecodeMaxPairs = 1024;  // M * top_k of one call
constexpr int kDecodeTile = 32;        // output columns per block
constexpr int kDecodeMaxSplit = 8;     // K splits of a GEMM across blocks

enum DecodePath { kDecodeTiles = 0, kDecodeGemv = 1, kDecodeGemvTma = 2, kDecodeFused = 3 };

template <typename T>
struct DecodeArgs {
  const T* x;              // [M, H]
  const int32_t* w13;      // [E, H/8, 2I]   gate columns [0, I), up columns [I, 2I)
  const T* s13;            // [E, G13, 2I]
  const uint8_t* z13;      // [E, G13, 2I] or null (symmetric: zero 8)
  const int32_t* w2;       // [E, I/8, H]
  const T* s2;             // [E, G2, H]
  const uint8_t* z2;       // [E, G2, H] or null
  const void* topk_ids;    // [M, k] int32 or int64
  bool ids64;
  const void* topk_weights;  // [M, k]
  int weights_kind;        // 0 float, 1 half, 2 bfloat16
  int M, top_k, E, H, I;
  int rows_per_group13, rows_per_group2;  // group size / 8 (packed rows per group)
  int split13, split2;     // K splits of each GEMM (decode_plan() picks them; tiled: at most kDecodeMaxSplit)
  int path;                // a DecodePath (decode_plan in moe_decode.cuh)
  T* h;                    // [rows, I] workspace (rows: decode_plan; M*k except on the TMA path)
  float* out13;            // [split13, rows, 2I] workspace (used when split13 > 1)
  float* out2;             // [split2, rows, H] workspace
  int* counters;           // [E * ceil(I / 32) + ceil(H / 32)] workspace, zeroed (the kernels leave it zeroed)
  T* y;                    // [M, H]
};

// Expert of pair p, or -1 when the id is out of range (that pair then contributes nothing).
__device__ __forceinline__ int load_expert(const void* ids, bool ids64, int p, int E) {
  const int64_t e = ids64 ? static_cast<const int64_t*>(ids)[p] : static_cast<const int32_t*>(ids)[p];
  return (e < 0 || e >= E) ? -1 : static_cast<int>(e);
}

// Lists in s_pairs every pair routed to the expert of pair p_self, and returns their number
// if this block owns the expert (p_self is its first pair), else 0. The list's order varies
// between runs, but each token's arithmetic does not depend on its slot, so results don't.
__device__ __forceinline__ int collect_pairs(const void* ids, bool ids64, int P, int E, int p_self, int* s_pairs,
                                             int& expert) {
  __shared__ int s_n, s_dup;
  if (threadIdx.x == 0) { s_n = 0; s_dup = 0; }
  __syncthreads();
  const int e = load_expert(ids, ids64, p_self, E);
  if (e >= 0)
    for (int p = threadIdx.x; p < P; p += blockDim.x)
      if (load_expert(ids, ids64, p, E) == e) {
        if (p < p_self) s_dup = 1;
        else s_pairs[atomicAdd(&s_n, 1)] = p;
      }
  __syncthreads();
  expert = e;
  return (e < 0 || s_dup) ? 0 : s_n;
}

// ---- 16-bit types: the magic number, packed arithmetic and the mma ----
template <typename T> struct Half2Math;
template <> struct Half2Math<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // (128, 128)
  static constexpr uint32_t kOnes = 0x3F803F80u;   // (1, 1)
  static constexpr float kMagicF = 128.f;
  __device__ static __forceinline__ uint32_t sub_mul(uint32_t v, uint32_t zz, uint32_t ss) {
    __nv_bfloat162 a = *reinterpret_cast<__nv_bfloat162*>(&v);
    const __nv_bfloat162 r = __hmul2(__hsub2(a, *reinterpret_cast<__nv_bfloat162*>(&zz)),
                                     *reinterpret_cast<__nv_bfloat162*>(&ss));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <> struct Half2Math<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // (1024, 1024)
  static constexpr uint32_t kOnes = 0x3C003C00u;   // (1, 1)
  static constexpr float kMagicF = 1024.f;
  __device__ static __forceinline__ uint32_t sub_mul(uint32_t v, uint32_t zz, uint32_t ss) {
    __half2 a = *reinterpret_cast<__half2*>(&v);
    const __half2 r = __hmul2(__hsub2(a, *reinterpret_cast<__half2*>(&zz)), *reinterpret_cast<__half2*>(&ss));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  __device__ static __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Nibbles s and s+4 of w as (magic + q) in the low and high 16 bits.
// One LOP3 ((v & mask) | magic) after the shift: written in C, the compiler emits an AND and an OR,
// because a SASS LOP3 takes one immediate (SASS of the first v3 build: 65 LOP3 per chunk, not 32).
template <int S, typename T>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t w) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(r) : "r"(w >> (4 * S)), "n"(0x000F000F), "r"(Half2Math<T>::kMagic));
  return r;
}

// ---- cp.async: each lane copies its own 16 bytes into shared memory, STAGES chunks ahead ----
// (no registers held while the loads fly; a lane only ever reads back what it copied itself)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// The lane's 4 columns' scales and (magic + zero), as floats, for group g.
// The lane's 4 columns' scales (16-bit, two per word) and zero points (one byte each) of group g.
__device__ __forceinline__ void load_group(const uint16_t* scol, const uint8_t* zcol, int64_t g, int64_t wcols,
                                           uint2& sc, uint32_t& z) {
  sc = __ldg(reinterpret_cast<const uint2*>(scol + g * wcols));
  z = zcol ? __ldg(reinterpret_cast<const uint32_t*>(zcol + g * wcols)) : 0x08080808u;
}
template <typename T> __device__ __forceinline__ float scale_at(const uint2& sc, int v) {
  const uint16_t b = static_cast<uint16_t>((v < 2 ? sc.x : sc.y) >> (16 * (v & 1)));
  return to_float(*reinterpret_cast<const T*>(&b));
}
template <typename T> __device__ __forceinline__ float magic_plus_zero(uint32_t z, int v) {
  return Half2Math<T>::kMagicF + static_cast<float>((z >> (8 * v)) & 0xFFu);
}

// The mma A fragments of one chunk (2 tiles x 2 mmas x 4 registers) from the lane's 4 words.
// RAW: (magic + q) as they come (the group's scale and zero are applied later to the fp32 sums);
// else (q - z) * s in 16-bit with the lane's own group scale (for groups of 8 or 16, which change
// inside a chunk).
template <typename T, bool RAW>
__device__ __forceinline__ void chunk_fragments(const uint4& q, const uint2& sc, uint32_t z, uint32_t (&a)[2][2][4]) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
  uint32_t ss[4], zz[4];
  if (!RAW) {
    ss[0] = __byte_perm(sc.x, 0, 0x1010);  // (s, s) of column 0
    ss[1] = __byte_perm(sc.x, 0, 0x3232);
    ss[2] = __byte_perm(sc.y, 0, 0x1010);
    ss[3] = __byte_perm(sc.y, 0, 0x3232);
#pragma unroll
    for (int v = 0; v < 4; ++v)  // (magic + z, magic + z): byte v of z into bytes 0 and 2, OR the magic
      zz[v] = __byte_perm(z, 0, 0x4040 | (v << 8) | v) | Half2Math<T>::kMagic;
  }
  auto deq = [&](uint32_t v, int col) { return RAW ? v : Half2Math<T>::sub_mul(v, zz[col], ss[col]); };
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const int lo = 2 * t, hi = 2 * t + 1;  // columns 4r+2t (mma rows r) and 4r+2t+1 (rows r+8)
    a[t][0][0] = deq(nibble_pair<0, T>(w[lo]), lo);
    a[t][0][1] = deq(nibble_pair<0, T>(w[hi]), hi);
    a[t][0][2] = deq(nibble_pair<1, T>(w[lo]), lo);
    a[t][0][3] = deq(nibble_pair<1, T>(w[hi]), hi);
    a[t][1][0] = deq(nibble_pair<2, T>(w[lo]), lo);
    a[t][1][1] = deq(nibble_pair<2, T>(w[hi]), hi);
    a[t][1][2] = deq(nibble_pair<3, T>(w[lo]), lo);
    a[t][1][3] = deq(nibble_pair<3, T>(w[hi]), hi);
  }
}

// The mma B fragments of one chunk for one token: the lane's 8 activations x[0..7] (one 16-byte
// load, k = 8 * prow + i) permuted like the weights: mma j gets (x[2j], x[2j+4]) and (x[2j+1], x[2j+5]).
__device__ __forceinline__ void act_fragments(const uint4& xv, uint32_t (&b)[2][2]) {
  b[0][0] = __byte_perm(xv.x, xv.z, 0x5410);
  b[0][1] = __byte_perm(xv.x, xv.z, 0x7632);
  b[1][0] = __byte_perm(xv.y, xv.w, 0x5410);
  b[1][1] = __byte_perm(xv.y, xv.w, 0x7632);
}

template <int NW, int NT> struct DecodeTile {
  static constexpr int kStages = NW == 2 ? 3 : 4;          // chunks in flight per warp
  static constexpr int kStageVecs = kStages * (NW + NT) * 32;  // uint4 per warp
};

// One GEMM of the decode path for the block's expert and 32-column tile, over chunks [c_begin, c_end)
// of this warp. NW weight matrices side by side (gate_up: 2, columns col and col + up_offset).
// in_row[nt]: offset of the input row of token slot 8*nt + r, or -1 for an empty slot.
// FOLD (groups of 32 or more, or one group): mma on (magic + q), then per group and column
//   acc += s * (sum_k (magic + q_k) x_k - (magic + z) * sum_k x_k)   in fp32,
// with sum_k x_k from one more mma against ones; else dequantized per element (chunk_fragments).
// acc[m][t][nt][4]: matrix m, tile t, token group nt (8 tokens each), the mma D fragment.
template <typename T, int NW, int NT, bool FOLD>
__device__ __forceinline__ void decode_gemm_tile(const T* in, const int64_t (&in_row)[NT], const int32_t* qe,
                                                 const uint16_t* se, const uint8_t* ze, int64_t wcols, int64_t up_offset,
                                                 int R, int rows_per_group, int col, bool col_ok, int c_begin, int c_end,
                                                 uint4* stage, float (&acc)[NW][2][NT][4]) {
  constexpr int S = DecodeTile<NW, NT>::kStages;
  const int lane = threadIdx.x & 31, c = lane & 3;
#pragma unroll
  for (int m = 0; m < NW; ++m)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[m][t][nt][i] = 0.f;

  // Per-chunk work is kept to the copies, the dequantization and the mmas (ncu of a first version: 281
  // instructions per warp and chunk, ALU pipe 60-65% busy, most of it index arithmetic): running
  // pointers instead of products, a running group boundary instead of a division, no modulo.
  const int prow0 = 4 * c_begin + c;
  const int64_t qstep = 4 * wcols;  // int32 words from one chunk to the next
  const int32_t* qnext[NW];
#pragma unroll
  for (int m = 0; m < NW; ++m) qnext[m] = qe + m * up_offset + col + static_cast<int64_t>(prow0) * wcols;
  const T* xnext[NT];
  bool x_ok[NT];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    x_ok[nt] = in_row[nt] >= 0;
    xnext[nt] = in + (x_ok[nt] ? in_row[nt] : 0) + 8 * prow0;
  }
  int prow_next = prow0, ch_next = c_begin, slot_wr = 0;
  auto issue = [&]() {  // the next chunk's copies into slot slot_wr, then advance
    const bool in_k = ch_next < c_end && prow_next < R;
    uint4* dst = stage + slot_wr * (NW + NT) * 32 + lane;
#pragma unroll
    for (int m = 0; m < NW; ++m) cp_async16(dst + m * 32, in_k && col_ok ? qnext[m] : qe, in_k && col_ok);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) cp_async16(dst + (NW + nt) * 32, in_k && x_ok[nt] ? xnext[nt] : in, in_k && x_ok[nt]);
    cp_async_commit();
#pragma unroll
    for (int m = 0; m < NW; ++m) qnext[m] += qstep;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xnext[nt] += 32;
    prow_next += 4;
    ++ch_next;
    slot_wr = slot_wr == S - 1 ? 0 : slot_wr + 1;
  };
#pragma unroll
  for (int s = 0; s < S - 1; ++s) issue();

  float part[NW][2][NT][4], sx[NT][4];
  uint2 gsc[NW];  // the current group's scales and zeros, converted at the fold
  uint32_t gz[NW];
  auto fold = [&]() {
#pragma unroll
    for (int m = 0; m < NW; ++m)
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const float s_lo = scale_at<T>(gsc[m], 2 * t), s_hi = scale_at<T>(gsc[m], 2 * t + 1);
          const float z_lo = magic_plus_zero<T>(gz[m], 2 * t), z_hi = magic_plus_zero<T>(gz[m], 2 * t + 1);
          acc[m][t][nt][0] = fmaf(s_lo, part[m][t][nt][0] - z_lo * sx[nt][0], acc[m][t][nt][0]);
          acc[m][t][nt][1] = fmaf(s_lo, part[m][t][nt][1] - z_lo * sx[nt][1], acc[m][t][nt][1]);
          acc[m][t][nt][2] = fmaf(s_hi, part[m][t][nt][2] - z_hi * sx[nt][0], acc[m][t][nt][2]);
          acc[m][t][nt][3] = fmaf(s_hi, part[m][t][nt][3] - z_hi * sx[nt][1], acc[m][t][nt][3]);
        }
  };
  auto clear = [&]() {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) sx[nt][i] = 0.f;
#pragma unroll
      for (int m = 0; m < NW; ++m)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int i = 0; i < 4; ++i) part[m][t][nt][i] = 0.f;
    }
  };
  const uint32_t ones[4] = {Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes, Half2Math<T>::kOnes};
  // FOLD: the group of chunk ch is the same for its 4 lanes; it changes when 4 * ch reaches g_end.
  int64_t g = FOLD ? (4 * c_begin) / rows_per_group : 0;
  int g_end = static_cast<int>((g + 1) * rows_per_group);
  int64_t goff = col + (col_ok ? g * wcols : 0);  // of the group's scales and zeros for this lane
  auto load_groups = [&]() {
#pragma unroll
    for (int m = 0; m < NW; ++m)
      load_group(se + m * up_offset + goff, ze ? ze + m * up_offset + goff : nullptr, 0, wcols, gsc[m], gz[m]);
  };
  if (FOLD && c_begin < c_end) {
    clear();
    load_groups();
  }
  // per element (groups of 8 or 16): this lane's group follows its own packed row
  int prow = prow0;

  int slot_rd = 0;
  for (int ch = c_begin; ch < c_end; ++ch) {
    cp_async_wait<S - 2>();  // this chunk's copies are done (each lane waits for its own)
    const uint4* src = stage + slot_rd * (NW + NT) * 32 + lane;
    slot_rd = slot_rd == S - 1 ? 0 : slot_rd + 1;
    uint4 q[NW], xv[NT];
#pragma unroll
    for (int m = 0; m < NW; ++m) q[m] = src[m * 32];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) xv[nt] = src[(NW + nt) * 32];
    issue();  // into the slot read in the previous iteration
    uint32_t b[NT][2][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) act_fragments(xv[nt], b[nt]);
    if (FOLD) {
      if (4 * ch >= g_end) {  // a new group: apply the finished one, fetch the next one's scales
        fold();
        clear();
        g_end += rows_per_group;
        goff += col_ok ? wcols : 0;
        load_groups();
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) Half2Math<T>::mma(sx[nt], ones, b[nt][j][0], b[nt][j][1]);
    }
#pragma unroll
    for (int m = 0; m < NW; ++m) {
      uint32_t a[2][2][4];
      if (FOLD) {
        chunk_fragments<T, true>(q[m], make_uint2(0u, 0u), 0u, a);
      } else {
        const int64_t gl = (prow < R && col_ok) ? prow / rows_per_group : 0;
        const uint16_t* sp = se + m * up_offset + col + gl * wcols;
        const uint2 sc = __ldg(reinterpret_cast<const uint2*>(sp));
        const uint32_t z = ze ? __ldg(reinterpret_cast<const uint32_t*>(ze + m * up_offset + col + gl * wcols)) : 0x08080808u;
        chunk_fragments<T, false>(q[m], sc, z, a);
      }
#pragma unroll
      for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
            Half2Math<T>::mma(FOLD ? part[m][t][nt] : acc[m][t][nt], a[t][j], b[nt][j][0], b[nt][j][1]);
    }
    prow += 4;
  }
  if (FOLD && c_begin < c_end) fold();
  cp_async_wait<0>();  // the tail's (empty) copies too, before the block reuses shared memory
}

template <typename WT> __device__ __forceinline__ float weight_at(const void* w, int p) {
  return to_float(static_cast<const WT*>(w)[p]);
}
__device__ __forceinline__ float routing_weight(const void* w, int kind, int p) {
  return kind == 0 ? weight_at<float>(w, p) : kind == 1 ? weight_at<__half>(w, p) : weight_at<__nv_bfloat16>(w, p);
}

// Dynamic shared memory of one block: the pair list, then the warps' stage buffers, which the
// cross-warp reduction [warps][tokens][columns] overlays once the GEMM is done.
template <int NT, bool GATED> constexpr int decode_smem_bytes() {
  constexpr int NW = GATED ? 2 : 1;
  constexpr int stage = kDecodeWarps * DecodeTile<NW, NT>::kStageVecs * 16;
  constexpr int red = kDecodeWarps * 8 * NT * NW * kDecodeTile * 4;
  return kDecodeMaxPairs * 4 + (stage > red ? stage : red);
}

// GATED (launch 1): gate_up with SiLU(gate) * up -> h; grid (P, ceil(I / 32)).
// else (launch 2): down over K split blockIdx.z -> out2, then the tile's last block combines; grid (P, ceil(H / 32), split).
template <typename T, int NT, bool GATED, bool FOLD>
__global__ void __launch_bounds__(kDecodeThreads, NT == 1 ? 3 : 2) moe_decode_kernel(DecodeArgs<T> a) {
  constexpr int NW = GATED ? 2 : 1, TOK = 8 * NT, COLS = NW * kDecodeTile;
  extern __shared__ __align__(16) unsigned char smem[];
  int* s_pairs = reinterpret_cast<int*>(smem);
  uint4* s_stage = reinterpret_cast<uint4*>(smem + kDecodeMaxPairs * 4);
  float* s_red = reinterpret_cast<float*>(smem + kDecodeMaxPairs * 4);
  __shared__ int s_last;

  const int P = a.M * a.top_k;
  const int N = GATED ? a.I : a.H, R = (GATED ? a.H : a.I) / 8;
  const int n0 = blockIdx.y * kDecodeTile;
  int expert;
  const int n = collect_pairs(a.topk_ids, a.ids64, P, a.E, blockIdx.x, s_pairs, expert);
  if (n > 0) {  // the same for the whole block
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, c = lane & 3;
    const int64_t wcols = NW * static_cast<int64_t>(N);
    const int col = n0 + 4 * r;
    const bool col_ok = col < N;  // N % 4 == 0: the lane's 4 columns are all in or all out
    const int rpg = GATED ? a.rows_per_group13 : a.rows_per_group2;
    const int G = (R + rpg - 1) / rpg;
    const int32_t* qe = (GATED ? a.w13 : a.w2) + static_cast<int64_t>(expert) * R * wcols;
    const uint16_t* se = reinterpret_cast<const uint16_t*>(GATED ? a.s13 : a.s2) + static_cast<int64_t>(expert) * G * wcols;
    const uint8_t* zb = GATED ? a.z13 : a.z2;
    const uint8_t* ze = zb ? zb + static_cast<int64_t>(expert) * G * wcols : nullptr;
    const int chunks = (R + 3) / 4;
    const int split = GATED ? a.split13 : a.split2, z = blockIdx.z;
    const int s_begin = chunks * z / split, s_end = chunks * (z + 1) / split;
    const int c_begin = s_begin + (s_end - s_begin) * warp / kDecodeWarps;
    const int c_end = s_begin + (s_end - s_begin) * (warp + 1) / kDecodeWarps;
    const T* in = GATED ? a.x : a.h;
    const int64_t in_stride = GATED ? a.H : a.I;
    float* part = GATED ? a.out13 + static_cast<int64_t>(z) * P * 2 * N : a.out2 + static_cast<int64_t>(z) * P * N;

    for (int base = 0; base < n; base += TOK) {
      int64_t in_row[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int slot = base + nt * 8 + r;  // B fragment: token slot = lane / 4
        in_row[nt] = slot < n ? (GATED ? s_pairs[slot] / a.top_k : s_pairs[slot]) * in_stride : -1;
      }
      float acc[NW][2][NT][4];
      decode_gemm_tile<T, NW, NT, FOLD>(in, in_row, qe, se, ze, wcols, N, R, rpg, col, col_ok, c_begin, c_end,
                                        s_stage + warp * DecodeTile<NW, NT>::kStageVecs, acc);
      __syncthreads();  // every warp is done with its stage buffers, which s_red overlays
      // D fragment: d0,d1 = (column 4r+2t, slots 2c, 2c+1), d2,d3 = (column 4r+2t+1, same slots)
#pragma unroll
      for (int m = 0; m < NW; ++m)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const int cc = m * kDecodeTile + 4 * r + 2 * t, s0 = nt * 8 + 2 * c;
            float* red = s_red + (warp * TOK + s0) * COLS + cc;
            red[0] = acc[m][t][nt][0];
            red[COLS] = acc[m][t][nt][1];
            red[1] = acc[m][t][nt][2];
            red[COLS + 1] = acc[m][t][nt][3];
          }
      __syncthreads();
      for (int idx = threadIdx.x; idx < TOK * kDecodeTile; idx += blockDim.x) {
        const int s = idx / kDecodeTile, cc = idx % kDecodeTile;
        if (base + s < n && n0 + cc < N) {
          float g = 0.f, u = 0.f;
#pragma unroll
          for (int w = 0; w < kDecodeWarps; ++w) {
            g += s_red[(w * TOK + s) * COLS + cc];
            if (GATED) u += s_red[(w * TOK + s) * COLS + kDecodeTile + cc];
          }
          const int64_t p = s_pairs[base + s];
          if (GATED && split == 1) {
            a.h[p * N + n0 + cc] = from_float<T>(g / (1.f + __expf(-g)) * u);
          } else if (GATED) {
            part[p * 2 * N + n0 + cc] = g;
            part[p * 2 * N + N + n0 + cc] = u;
          } else {
            part[p * N + n0 + cc] = g;
          }
        }
      }
      __syncthreads();  // s_red / the stage buffers are reused by the next pass
    }
    if (GATED && split > 1) {  // the last of the tile's splits to arrive adds them up and writes h
      __threadfence();
      __syncthreads();
      int* counter = a.counters + static_cast<int64_t>(expert) * gridDim.y + blockIdx.y;
      if (threadIdx.x == 0) {
        s_last = atomicAdd(counter, 1) + 1 == split;
        if (s_last) *counter = 0;  // left at zero for the next call
      }
      __syncthreads();
      if (s_last) {
        __threadfence();
        for (int idx = threadIdx.x; idx < n * kDecodeTile; idx += blockDim.x) {
          const int s = idx / kDecodeTile, cc = n0 + idx % kDecodeTile;
          if (cc >= N) continue;
          const int64_t p = s_pairs[s];
          float g = 0.f, u = 0.f;
          for (int k = 0; k < split; ++k) {
            const float* pk = a.out13 + (static_cast<int64_t>(k) * P + p) * 2 * N;
            g += __ldcg(pk + cc);
            u += __ldcg(pk + N + cc);
          }
          a.h[p * N + cc] = from_float<T>(g / (1.f + __expf(-g)) * u);
        }
      }
    }
  }
  if (GATED) return;

  // Count this block in on its column tile; the last of the P * split2 blocks combines the tile.
  __threadfence();  // this block's partial sums are visible device-wide before it counts in
  __syncthreads();
  int* counter = a.counters + static_cast<int64_t>(a.E) * ((a.I + kDecodeTile - 1) / kDecodeTile) + blockIdx.y;
  if (threadIdx.x == 0) {
    s_last = atomicAdd(counter, 1) + 1 == P * a.split2;
    if (s_last) *counter = 0;  // left at zero for the next call
  }
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  for (int idx = threadIdx.x; idx < a.M * kDecodeTile; idx += blockDim.x) {
    const int t = idx / kDecodeTile, cc = n0 + idx % kDecodeTile;
    if (cc >= N) continue;
    float y = 0.f;
    for (int k = 0; k < a.top_k; ++k) {
      const int p = t * a.top_k + k;
      if (load_expert(a.topk_ids, a.ids64, p, a.E) < 0) continue;
      float v = 0.f;
      for (int s = 0; s < a.split2; ++s) v += __ldcg(a.out2 + (static_cast<int64_t>(s) * P + p) * N + cc);
      y = fmaf(routing_weight(a.topk_weights, a.weights_kind, p), v, y);
    }
    a.y[static_cast<int64_t>(t) * N + cc] = from_float<T>(y);
  }
}

// K splits of one GEMM: `items` blocks of `chunks` chunks each (32 K per chunk) without a split, on a
// GPU that runs `slots` blocks at once. The block time is taken as its chunks per warp plus a fixed
// cost of about two chunks (pipeline fill, cross-warp reduction); the split with the fewest waves x
// block time wins, each warp keeping at least two chunks.
inline int decode_split(int items, int chunks, int slots) {
  int best = 1;
  double best_t = 1e30;
  for (int split = 1; split <= kDecodeMaxSplit; split *= 2) {
    if (split > 1 && chunks < 2 * split * kDecodeWarps) break;
    const double waves = static_cast<double>((static_cast<int64_t>(items) * split + slots - 1) / slots);
    const double t = waves * (static_cast<double>(chunks) / (split * kDecodeWarps) + 2.0);
    if (t < best_t - 1e-9) { best_t = t; best = split; }
  }
  return best;
}
// Both splits for a call: the experts hit are taken as min(M * top_k, E).
inline void decode_splits(int M, int top_k, int E, int H, int I, int num_sms, int& split13, int& split2) {
  const int hit = M * top_k < E ? M * top_k : E;
  const int slots = (M <= 8 ? 3 : 2) * num_sms;  // blocks per SM: the kernels' launch bounds
  split13 = decode_split(hit * ((I + kDecodeTile - 1) / kDecodeTile), (H / 8 + 3) / 4, slots);
  split2 = decode_split(hit * ((H + kDecodeTile - 1) / kDecodeTile), (I / 8 + 3) / 4, slots);
}
// Counters of a call: per (expert, gate_up tile), then per down tile. The one-token path indexes the
// first part by pair (top_k <= E of them).
inline int64_t decode_counters(int E, int H, int I) {
  return static_cast<int64_t>(E) * ((I + kDecodeTile - 1) / kDecodeTile) + (H + kDecodeTile - 1) / kDecodeTile;
}

template <typename T, int NT, bool GATED, bool FOLD>
cudaError_t launch_one(const DecodeArgs<T>& a, dim3 grid, cudaStream_t stream) {
  constexpr int smem = decode_smem_bytes<NT, GATED>();
  auto kernel = moe_decode_kernel<T, NT, GATED, FOLD>;
  static const cudaError_t attr = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (attr != cudaSuccess) return attr;
  kernel<<<grid, kDecodeThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

// FOLD needs a group that spans whole chunks (32 K), or a single group.
inline bool decode_fold(int K, int rows_per_group) { return rows_per_group % 4 == 0 || rows_per_group >= K / 8; }

template <int NT, typename T>
cudaError_t launch_decode_nt(const DecodeArgs<T>& a, cudaStream_t stream) {
  const int P = a.M * a.top_k;
  const dim3 g1(P, (a.I + kDecodeTile - 1) / kDecodeTile, a.split13);
  const dim3 g2(P, (a.H + kDecodeTile - 1) / kDecodeTile, a.split2);
  cudaError_t err = decode_fold(a.H, a.rows_per_group13) ? launch_one<T, NT, true, true>(a, g1, stream)
                                                         : launch_one<T, NT, true, false>(a, g1, stream);
  if (err != cudaSuccess) return err;
  return decode_fold(a.I, a.rows_per_group2) ? launch_one<T, NT, false, true>(a, g2, stream)
                                             : launch_one<T, NT, false, false>(a, g2, stream);
}

// Requirements (checked by the caller): 4-bit, H % 8 == 0, I % 8 == 0, M * top_k <= kDecodeMaxPairs,
// group sizes multiples of 8 (rows_per_group >= 1), 1 <= splits <= kDecodeMaxSplit. T: bf16 or fp16.
// The op's entry point is launch_decode (moe_decode.cuh), which sends one token to a gemv kernel.
template <typename T>
cudaError_t launch_decode_tiles(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  if (a.M * a.top_k > kDecodeMaxPairs || a.H % 8 || a.I % 8 || a.rows_per_group13 < 1 || a.rows_per_group2 < 1 ||
      a.split13 < 1 || a.split13 > kDecodeMaxSplit || a.split2 < 1 || a.split2 > kDecodeMaxSplit)
    return cudaErrorInvalidValue;
  // tokens per pass: 8 (one mma n-tile) or 16; an expert with more tokens takes several passes
  if (a.M <= 8) return launch_decode_nt<1, T>(a, stream);
  return launch_decode_nt<2, T>(a, stream);
}

}  // namespace cuda
}  // namespace moequant
