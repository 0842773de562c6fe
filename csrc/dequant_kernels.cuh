// CUDA dequantization of the packed format (moequant/packing.py) -> dense [batch, out, in].
// Torch-free: the extension (dequant_cuda.cu) and the standalone tests (csrc/tests) include it.
//
// General kernel: one thread = one output row o and one chunk of 32 input codes, which is
// exactly BITS words of the column's bit stream (32 * BITS bits).
// 4-bit codes with 16-bit scales and output take a fast kernel (coalesced writes): two nibbles at once become
// two halves (1024 + q, or 128 + q for bf16) by one LOP3 into a magic exponent, then one
// packed subtract and one packed multiply give (q - z) * s, rounded once as the reference does.
#pragma once
#include "cuda_common.cuh"

namespace moequant {
namespace cuda {

template <typename S, typename O>
struct DequantArgs {
  const int32_t* qweight;  // [batch, in*bits/32, out]
  const S* scales;         // [batch, groups, out]
  const uint8_t* zeros;    // [batch, groups, out] or null (symmetric)
  const int32_t* g_idx;    // [in] or [batch, in] or null
  bool g_idx_per_matrix;
  int64_t batch, in, out, groups, group_size;  // group_size used when g_idx is null
  int bits;
  O* dst;                  // [batch, out, in]
};

constexpr int kDequantThreads = 128;

template <typename T> struct Packed2;
template <> struct Packed2<__half> {
  using V = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both fp16 halves
  static constexpr float kBias = 1024.f;
  __device__ static V splat(float v) { return __float2half2_rn(v); }
  __device__ static V pair(__half v) { return __half2half2(v); }
};
template <> struct Packed2<__nv_bfloat16> {
  using V = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both bf16 halves
  static constexpr float kBias = 128.f;
  __device__ static V splat(float v) { return __float2bfloat162_rn(v); }
  __device__ static V pair(__nv_bfloat16 v) { return __bfloat162bfloat162(v); }
};

template <typename T> struct IsHalf16 { static constexpr bool value = false; };
template <> struct IsHalf16<__half> { static constexpr bool value = true; };
template <> struct IsHalf16<__nv_bfloat16> { static constexpr bool value = true; };

template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

// Two floats rounded into one 32-bit word of 16-bit values (low half first).
template <typename O> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  return static_cast<uint32_t>(__half_as_ushort(__float2half_rn(lo))) |
         (static_cast<uint32_t>(__half_as_ushort(__float2half_rn(hi))) << 16);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  return static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(lo))) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(hi))) << 16);
}

// Store the first n of 32 values: 16-byte stores when the whole chunk is there and aligned.
template <typename O>
__device__ __forceinline__ void store32(O* dst, const float (&v)[32], int n, bool aligned16) {
  if (n == 32 && aligned16) {
    if constexpr (sizeof(O) == 4) {
#pragma unroll
      for (int k = 0; k < 8; ++k)
        reinterpret_cast<float4*>(dst)[k] = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k)
        reinterpret_cast<uint4*>(dst)[k] = make_uint4(pack2<O>(v[8 * k], v[8 * k + 1]), pack2<O>(v[8 * k + 2], v[8 * k + 3]),
                                                      pack2<O>(v[8 * k + 4], v[8 * k + 5]), pack2<O>(v[8 * k + 6], v[8 * k + 7]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 32; ++j)
      if (j < n) dst[j] = from_float<O>(v[j]);
  }
}

// Fast path: 4 bits, 16-bit scales and output of one type, no g_idx, group size a multiple of
// 8 (one scale and zero per packed word). Kept apart from the general kernel so that its
// register count stays small, and laid out for whole-sector writes: a warp covers 8 columns x
// 128 codes; lane (c = lane % 8, q = lane / 8) takes words q, q+4, q+8, q+12 of column c, so
// each load instruction reads 32-byte runs of 8 columns and each 16-byte store instruction
// writes 64 contiguous bytes (two full sectors) of every column's output row.
constexpr int kFastCols = 32;  // columns per block (4 warps x 8)

template <typename O>
__global__ void __launch_bounds__(kDequantThreads) dequant4_half_kernel(DequantArgs<O, O> a) {
  using P = Packed2<O>;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kFastCols + warp * 8 + lane % 8;
  if (o >= a.out) return;
  const int q = lane / 8;
  const int64_t rows = a.in / 8, row0 = static_cast<int64_t>(blockIdx.y) * 16;
  for (int64_t m = blockIdx.z; m < a.batch; m += gridDim.z) {
    const int32_t* col = a.qweight + m * rows * a.out + o;
    uint32_t w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t r = row0 + q + 4 * k;
      w[k] = r < rows ? static_cast<uint32_t>(__ldg(col + r * a.out)) : 0u;
    }
    O* dst = a.dst + (m * a.out + o) * a.in;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t r = row0 + q + 4 * k;
      if (r >= rows) break;
      const int64_t g = r * 8 / a.group_size;
      const float z = a.zeros ? static_cast<float>(a.zeros[(m * a.groups + g) * a.out + o]) : 8.f;
      const typename P::V zz = P::splat(P::kBias + z);  // exact: small integers
      const typename P::V ss = P::pair(a.scales[(m * a.groups + g) * a.out + o]);
      uint32_t pr[4];  // pr[j] holds codes (j, j + 4) of the word as two halves
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t bits = ((w[k] >> (4 * j)) & 0x000F000Fu) | P::kMagic;
        typename P::V v = *reinterpret_cast<typename P::V*>(&bits);
        v = __hmul2(__hsub2(v, zz), ss);  // (q - z) exact, then one rounding: as the reference
        pr[j] = *reinterpret_cast<uint32_t*>(&v);
      }
      // Back to memory order (0,1) (2,3) (4,5) (6,7); 4-bit packing makes in % 8 == 0, so
      // each word's 8 outputs are one aligned 16-byte store.
      *reinterpret_cast<uint4*>(dst + r * 8) =
          make_uint4(__byte_perm(pr[0], pr[1], 0x5410), __byte_perm(pr[2], pr[3], 0x5410),
                     __byte_perm(pr[0], pr[1], 0x7632), __byte_perm(pr[2], pr[3], 0x7632));
    }
  }
}

template <int BITS, typename S, typename O>
__global__ void __launch_bounds__(kDequantThreads) dequant_kernel(DequantArgs<S, O> a) {
  constexpr int kWords = BITS;  // 32 codes per chunk
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * kDequantThreads + threadIdx.x;
  if (o >= a.out) return;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * 32;
  const int64_t rows = a.in * BITS / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kWords;
  const int n_words = static_cast<int>(rows - row0 < kWords ? rows - row0 : kWords);  // < kWords: last chunk
  const int n_codes = n_words * 32 / BITS;
  const float sym_zero = static_cast<float>(1u << (BITS - 1));

  for (int64_t m = blockIdx.z; m < a.batch; m += gridDim.z) {
    const int32_t* col = a.qweight + m * rows * a.out + o;
    const S* sc = a.scales + m * a.groups * a.out + o;
    const uint8_t* zr = a.zeros ? a.zeros + m * a.groups * a.out + o : nullptr;
    const int32_t* gi = a.g_idx ? a.g_idx + (a.g_idx_per_matrix ? m * a.in : 0) : nullptr;
    O* dst = a.dst + (m * a.out + o) * a.in + i0;

    uint32_t w[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = k < n_words ? static_cast<uint32_t>(__ldg(col + (row0 + k) * a.out)) : 0u;

    const bool uniform = gi == nullptr && (a.group_size % 32 == 0 || n_codes == 32 && i0 / a.group_size == (i0 + 31) / a.group_size);
    // General path: codes to floats with integer ops, (q - z) * s in float, rounded once.
    float s_u = 0.f, z_u = sym_zero;
    if (uniform) {
      const int64_t g = i0 / a.group_size;
      s_u = to_float(sc[g * a.out]);
      if (zr) z_u = static_cast<float>(zr[g * a.out]);
    }
    float vals[32];
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int pos = j * BITS, wi = pos / 32, off = pos % 32;
      uint32_t c = w[wi] >> off;
      if (off + BITS > 32 && wi + 1 < kWords) c |= w[wi + 1] << (32 - off);
      c &= kMask;
      float s = s_u, z = z_u;
      if (!uniform && j < n_codes) {
        const int64_t g = gi ? static_cast<int64_t>(__ldg(gi + i0 + j)) : (i0 + j) / a.group_size;
        s = to_float(sc[g * a.out]);
        z = zr ? static_cast<float>(zr[g * a.out]) : sym_zero;
      }
      vals[j] = (code_to_float(c) - z) * s;
    }
    store32<O>(dst, vals, n_codes, a.in % (16 / sizeof(O)) == 0);
  }
}

template <typename S, typename O>
cudaError_t launch_dequant(const DequantArgs<S, O>& a, cudaStream_t stream) {
  if (a.batch == 0 || a.out == 0 || a.in == 0) return cudaSuccess;
  const int64_t chunks = (a.in + 31) / 32;
  if (chunks > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>((a.out + kDequantThreads - 1) / kDequantThreads), static_cast<unsigned>(chunks),
                  static_cast<unsigned>(a.batch < 65535 ? a.batch : 65535));
  if constexpr (IsHalf16<O>::value && SameType<S, O>::value) {
    if (a.bits == 4 && a.g_idx == nullptr && a.group_size % 8 == 0) {
      const int64_t blocks_y = (a.in / 8 + 15) / 16;
      if (blocks_y > 65535) return cudaErrorInvalidConfiguration;
      const dim3 fast(static_cast<unsigned>((a.out + kFastCols - 1) / kFastCols), static_cast<unsigned>(blocks_y),
                      grid.z);
      dequant4_half_kernel<O><<<fast, kDequantThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  switch (a.bits) {
    case 2: dequant_kernel<2, S, O><<<grid, kDequantThreads, 0, stream>>>(a); break;
    case 3: dequant_kernel<3, S, O><<<grid, kDequantThreads, 0, stream>>>(a); break;
    case 4: dequant_kernel<4, S, O><<<grid, kDequantThreads, 0, stream>>>(a); break;
    case 8: dequant_kernel<8, S, O><<<grid, kDequantThreads, 0, stream>>>(a); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace moequant
