// Torch-free CPU core of the packed-weight format (moequant/packing.py), shared by the
// extension's CPU ops and the standalone ctest build (CMakeLists.txt).
//
//   qweight int32 [in*bits/32, out]  column o holds a little-endian bit stream of codes q[o, 0..in)
//   scales  S     [G, out]           G groups over the input dim
//   zeros   uint8 [G, out] or null   (null: symmetric, zero = 2**(bits-1))
//   g_idx   int32 [in]     or null   (null: group of input i is i / group_size)
//   W_hat[o, i] = (q[o, i] - zero[g(i), o]) * scale[g(i), o]       -> dst [out, in]
#pragma once
#include <cstdint>

namespace moequant {

// Code i of the column that starts at `col` (rows `stride` words apart). A 3-bit code may
// straddle two words; 2-, 4- and 8-bit codes never do.
inline uint32_t read_code(const int32_t* col, int64_t stride, int64_t i, int bits) {
  const int64_t pos = i * bits;
  const int64_t w = pos >> 5;
  const int off = static_cast<int>(pos & 31);
  uint32_t v = static_cast<uint32_t>(col[w * stride]) >> off;
  if (off + bits > 32) v |= static_cast<uint32_t>(col[(w + 1) * stride]) << (32 - off);
  return v & ((1u << bits) - 1u);
}

struct PackedDims {
  int64_t in_features;
  int64_t out_features;
  int64_t groups;      // rows of scales / zeros
  int64_t group_size;  // used when g_idx is null
  int bits;
};

// Dequantize output rows [o_begin, o_end) of one packed matrix. S and O are float or
// 16-bit float types constructible from / convertible to float (c10::Half, c10::BFloat16).
// Arithmetic in float, rounded once into O: the same numbers as packing.dequantize.
template <typename S, typename O>
void dequantize_rows(const int32_t* qweight, const S* scales, const uint8_t* zeros, const int32_t* g_idx,
                     const PackedDims& d, int64_t o_begin, int64_t o_end, O* dst) {
  const int64_t out = d.out_features, in = d.in_features;
  const float sym_zero = static_cast<float>(1u << (d.bits - 1));
  for (int64_t o = o_begin; o < o_end; ++o) {
    const int32_t* col = qweight + o;
    O* row = dst + o * in;
    if (g_idx == nullptr) {
      for (int64_t g = 0, i0 = 0; i0 < in; ++g, i0 += d.group_size) {
        const float s = static_cast<float>(scales[g * out + o]);
        const float z = zeros ? static_cast<float>(zeros[g * out + o]) : sym_zero;
        const int64_t i1 = i0 + d.group_size < in ? i0 + d.group_size : in;
        for (int64_t i = i0; i < i1; ++i)
          row[i] = O((static_cast<float>(read_code(col, out, i, d.bits)) - z) * s);
      }
    } else {
      for (int64_t i = 0; i < in; ++i) {
        const int64_t g = g_idx[i];
        const float s = static_cast<float>(scales[g * out + o]);
        const float z = zeros ? static_cast<float>(zeros[g * out + o]) : sym_zero;
        row[i] = O((static_cast<float>(read_code(col, out, i, d.bits)) - z) * s);
      }
    }
  }
}

}  // namespace moequant
