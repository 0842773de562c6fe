// Small-batch fused MoE for decode (M of 1 to ~16 tokens), 4-bit packed experts (w4a16).
// Torch-free: the extension (moe_decode_cuda.cu) and the standalone tests include it.
//
// Three launches, no host synchronisation, no routing pre-pass:
//   1 gate_up: block (pair p, column tile). The block of the first pair routed to an expert
//     owns that expert ("owner"); the others exit at once. The owner lists every pair routed
//     to its expert, streams the expert's packed gate and up columns of its tile exactly once,
//     dequantizes in registers and serves all its tokens: h[p, :] = SiLU(gate) * up (fp32).
//   2 down: the same scheme over w2 with h as input: out2[p, :] (fp32, unweighted).
//   3 combine: y[t, :] = sum over k of topk_weight[t, k] * out2[t*k + k, :] in fp32 -> x dtype.
// A tensor-core tile would waste most of its rows at this M, so the GEMMs run on CUDA cores:
// each thread owns VEC adjacent output columns (one 8- or 16-byte load per packed row), the
// block's 256 threads split the K dim into slices and meet in shared memory at the end.
// Dequantization: nibble -> (128 + q) as a float with a shift and one LOP3 (no I2F); the
// zero point and scale are applied once per group: sum_k x_k (q_k - z) s = s (sum_k x_k (128 + q_k)
// - (128 + z) sum_k x_k). Accumulation is fp32 throughout.
#pragma once
#include "cuda_common.cuh"

namespace moequant {
namespace cuda {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeMaxPairs = 1024;  // M * top_k of one call
constexpr int kRowsUnroll = 4;         // packed rows in flight per thread

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
  float* h;                // [M*k, I] workspace
  float* out2;             // [M*k, H] workspace
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

template <int VEC> __device__ __forceinline__ void load_words(const int32_t* p, uint32_t (&w)[VEC]);
template <> __device__ __forceinline__ void load_words<4>(const int32_t* p, uint32_t (&w)[4]) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
}
template <> __device__ __forceinline__ void load_words<2>(const int32_t* p, uint32_t (&w)[2]) {
  const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
  w[0] = v.x; w[1] = v.y;
}

// sum_j x[j] * (128 + q_j(w)) over the 8 nibbles of one packed word.
__device__ __forceinline__ float dot8(const float (&x)[8], uint32_t w, float acc) {
  acc = fmaf(x[0], nibble_plus_128<0>(w), acc);
  acc = fmaf(x[1], nibble_plus_128<1>(w), acc);
  acc = fmaf(x[2], nibble_plus_128<2>(w), acc);
  acc = fmaf(x[3], nibble_plus_128<3>(w), acc);
  acc = fmaf(x[4], nibble_plus_128<4>(w), acc);
  acc = fmaf(x[5], nibble_plus_128<5>(w), acc);
  acc = fmaf(x[6], nibble_plus_128<6>(w), acc);
  acc = fmaf(x[7], nibble_plus_128<7>(w), acc);
  return acc;
}

// One GEMM of the decode path. GATED: gate_up (weight has 2N columns; writes SiLU(gate)*up);
// else down. Input rows: x[p / top_k] (GATED) or h[p]; output rows out[p, N] fp32.
// MT: token slots per pass (registers); VEC: adjacent columns per thread.
template <int MT, int VEC, bool GATED, typename XT, typename T>
__global__ void __launch_bounds__(kDecodeThreads)
    moe_decode_gemm_kernel(const XT* __restrict__ in, const int32_t* __restrict__ qw, const T* __restrict__ sc,
                           const uint8_t* __restrict__ zr, const void* ids, bool ids64, int P, int top_k, int E, int K,
                           int N, int rows_per_group, float* __restrict__ out) {
  constexpr int TPS = GATED ? 16 : 8;  // threads per K slice: GATED = 8 on gate columns + 8 on up
  constexpr int KS = kDecodeThreads / TPS;
  constexpr int COLS = 8 * VEC;        // output columns per block
  constexpr int WIDTH = TPS * VEC;     // accumulator columns per slice
  constexpr int U = kRowsUnroll;
  __shared__ int s_pairs[kDecodeMaxPairs];
  __shared__ float s_red[KS][MT][WIDTH];

  int expert;
  const int n = collect_pairs(ids, ids64, P, E, blockIdx.x, s_pairs, expert);
  if (n == 0) return;  // the same for the whole block

  const int WCOLS = GATED ? 2 * N : N;
  const int R = K / 8;
  const int G = (R + rows_per_group - 1) / rows_per_group;
  const int ks = threadIdx.x / TPS, c = threadIdx.x % TPS;
  const int n0 = blockIdx.y * COLS;
  const int col = n0 + (c % 8) * VEC;
  const bool valid = col < N;  // N % VEC == 0, so the thread's VEC columns are all in or all out
  const int wcol = col + (GATED && c >= 8 ? N : 0);
  const int r_begin = static_cast<int>(static_cast<int64_t>(ks) * R / KS);
  const int r_end = static_cast<int>(static_cast<int64_t>(ks + 1) * R / KS);
  const int32_t* qe = qw + static_cast<int64_t>(expert) * R * WCOLS + wcol;
  const T* se = sc + static_cast<int64_t>(expert) * G * WCOLS + wcol;
  const uint8_t* ze = zr ? zr + static_cast<int64_t>(expert) * G * WCOLS + wcol : nullptr;

  for (int base = 0; base < n; base += MT) {
    const int nt = n - base < MT ? n - base : MT;
    const XT* xrow[MT];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
      const int p = s_pairs[base + (t < nt ? t : nt - 1)];
      xrow[t] = in + static_cast<int64_t>(GATED ? p / top_k : p) * K;
    }
    float acc[MT][VEC];
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[t][v] = 0.f;

    if (valid) {
      int r = r_begin;
      while (r < r_end) {
        const int g = r / rows_per_group;
        const int g_end = (g + 1) * rows_per_group < r_end ? (g + 1) * rows_per_group : r_end;
        float s[VEC], zc[VEC];  // issued now, first used at the fold below
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          s[v] = to_float(se[static_cast<int64_t>(g) * WCOLS + v]);
          zc[v] = 128.f + (ze ? static_cast<float>(ze[static_cast<int64_t>(g) * WCOLS + v]) : 8.f);
        }
        float part[MT][VEC], sx[MT];
#pragma unroll
        for (int t = 0; t < MT; ++t) {
          sx[t] = 0.f;
#pragma unroll
          for (int v = 0; v < VEC; ++v) part[t][v] = 0.f;
        }
        for (; r < g_end; r += U) {
          uint32_t w[U][VEC];
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (r + u < g_end) load_words<VEC>(qe + static_cast<int64_t>(r + u) * WCOLS, w[u]);
          }
#pragma unroll
          for (int u = 0; u < U; ++u) {
            if (r + u < g_end) {
#pragma unroll
              for (int t = 0; t < MT; ++t) {
                if (t < nt) {
                  float xv[8];
                  load8_as_float(xrow[t] + 8 * (r + u), xv);
                  sx[t] += ((xv[0] + xv[1]) + (xv[2] + xv[3])) + ((xv[4] + xv[5]) + (xv[6] + xv[7]));
#pragma unroll
                  for (int v = 0; v < VEC; ++v) part[t][v] = dot8(xv, w[u][v], part[t][v]);
                }
              }
            }
          }
        }
        r = g_end;  // the row loop steps by U and may overshoot the group's end
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[t][v] = fmaf(s[v], part[t][v] - zc[v] * sx[t], acc[t][v]);
      }
    }

#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int v = 0; v < VEC; ++v) s_red[ks][t][c * VEC + v] = acc[t][v];
    __syncthreads();
    for (int idx = threadIdx.x; idx < MT * COLS; idx += kDecodeThreads) {
      const int t = idx / COLS, cc = idx % COLS;
      if (t < nt && n0 + cc < N) {
        float a = 0.f, b = 0.f;
#pragma unroll 8
        for (int k = 0; k < KS; ++k) {
          a += s_red[k][t][cc];
          if (GATED) b += s_red[k][t][COLS + cc];
        }
        const float v = GATED ? a / (1.f + __expf(-a)) * b : a;
        out[static_cast<int64_t>(s_pairs[base + t]) * N + n0 + cc] = v;
      }
    }
    __syncthreads();  // s_red is reused by the next pass
  }
}

template <typename WT> __device__ __forceinline__ float weight_at(const void* w, int p) {
  return to_float(static_cast<const WT*>(w)[p]);
}

// y[t, :] = sum_k w[t, k] * out2[t*top_k + k, :], fp32, summed in k order.
template <typename T, typename WT>
__global__ void moe_decode_combine_kernel(const float* __restrict__ out2, const void* ids, bool ids64, const void* wts,
                                          int top_k, int E, int H, T* __restrict__ y) {
  const int t = blockIdx.x;
  const int col = blockIdx.y * blockDim.x + threadIdx.x;
  if (col >= H) return;
  float acc = 0.f;
  for (int k = 0; k < top_k; ++k) {
    const int p = t * top_k + k;
    if (load_expert(ids, ids64, p, E) >= 0) acc = fmaf(weight_at<WT>(wts, p), out2[static_cast<int64_t>(p) * H + col], acc);
  }
  y[static_cast<int64_t>(t) * H + col] = from_float<T>(acc);
}

template <int MT, typename T>
cudaError_t launch_decode_mt(const DecodeArgs<T>& a, cudaStream_t stream) {
  constexpr int VEC = MT <= 4 ? 4 : 2;
  constexpr int COLS = 8 * VEC;
  const int P = a.M * a.top_k;
  const dim3 g1(P, (a.I + COLS - 1) / COLS), g2(P, (a.H + COLS - 1) / COLS);
  moe_decode_gemm_kernel<MT, VEC, true, T, T><<<g1, kDecodeThreads, 0, stream>>>(
      a.x, a.w13, a.s13, a.z13, a.topk_ids, a.ids64, P, a.top_k, a.E, a.H, a.I, a.rows_per_group13, a.h);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  moe_decode_gemm_kernel<MT, VEC, false, float, T><<<g2, kDecodeThreads, 0, stream>>>(
      a.h, a.w2, a.s2, a.z2, a.topk_ids, a.ids64, P, a.top_k, a.E, a.I, a.H, a.rows_per_group2, a.out2);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 g3(a.M, (a.H + 255) / 256);
  switch (a.weights_kind) {
    case 0: moe_decode_combine_kernel<T, float><<<g3, 256, 0, stream>>>(a.out2, a.topk_ids, a.ids64, a.topk_weights, a.top_k, a.E, a.H, a.y); break;
    case 1: moe_decode_combine_kernel<T, __half><<<g3, 256, 0, stream>>>(a.out2, a.topk_ids, a.ids64, a.topk_weights, a.top_k, a.E, a.H, a.y); break;
    case 2: moe_decode_combine_kernel<T, __nv_bfloat16><<<g3, 256, 0, stream>>>(a.out2, a.topk_ids, a.ids64, a.topk_weights, a.top_k, a.E, a.H, a.y); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Requirements (checked by the caller): 4-bit, H % 8 == 0, I % 8 == 0, M * top_k <= kDecodeMaxPairs,
// group sizes multiples of 8 (rows_per_group >= 1).
template <typename T>
cudaError_t launch_decode(const DecodeArgs<T>& a, cudaStream_t stream) {
  if (a.M == 0) return cudaSuccess;
  if (a.M * a.top_k > kDecodeMaxPairs || a.H % 8 || a.I % 8 || a.rows_per_group13 < 1 || a.rows_per_group2 < 1)
    return cudaErrorInvalidValue;
  if (a.M <= 1) return launch_decode_mt<1, T>(a, stream);
  if (a.M <= 2) return launch_decode_mt<2, T>(a, stream);
  if (a.M <= 4) return launch_decode_mt<4, T>(a, stream);
  if (a.M <= 8) return launch_decode_mt<8, T>(a, stream);
  return launch_decode_mt<16, T>(a, stream);
}

}  // namespace cuda
}  // namespace moequant
