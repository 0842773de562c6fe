// Standalone test of the CPU dequantization core (csrc/dequant_core.h) against a scalar
// reference written from the format's definition, one bit at a time. No torch needed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../dequant_core.h"

namespace {

// Pack codes [out][in] into the format: bit b of code i of column o sits at stream bit i*bits+b.
std::vector<int32_t> pack(const std::vector<uint32_t>& codes, int out, int in, int bits) {
  const int rows = in * bits / 32;
  std::vector<uint32_t> w(static_cast<size_t>(rows) * out, 0u);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i)
      for (int b = 0; b < bits; ++b) {
        const int pos = i * bits + b;
        if ((codes[static_cast<size_t>(o) * in + i] >> b) & 1u) w[static_cast<size_t>(pos / 32) * out + o] |= 1u << (pos % 32);
      }
  return std::vector<int32_t>(w.begin(), w.end());
}

int run_case(int out, int in, int bits, int group, bool sym, bool act_order, std::mt19937& rng) {
  const int G = in / group;
  std::vector<uint32_t> codes(static_cast<size_t>(out) * in);
  for (auto& c : codes) c = rng() % (1u << bits);
  std::vector<float> scales(static_cast<size_t>(G) * out);
  for (auto& s : scales) s = 0.001f + 0.02f * static_cast<float>(rng() % 10007) / 10007.0f;
  std::vector<uint8_t> zeros(static_cast<size_t>(G) * out);
  for (auto& z : zeros) z = static_cast<uint8_t>(rng() % (1u << bits));
  std::vector<int32_t> g_idx(in);
  for (int i = 0; i < in; ++i) g_idx[i] = i / group;
  if (act_order) std::shuffle(g_idx.begin(), g_idx.end(), rng);
  const std::vector<int32_t> qweight = pack(codes, out, in, bits);

  std::vector<float> got(static_cast<size_t>(out) * in, NAN);
  const moequant::PackedDims d{in, out, G, group, bits};
  moequant::dequantize_rows<float, float>(qweight.data(), scales.data(), sym ? nullptr : zeros.data(),
                                          act_order ? g_idx.data() : nullptr, d, 0, out, got.data());
  int bad = 0;
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) {
      const int g = g_idx[i];
      const float z = sym ? static_cast<float>(1 << (bits - 1)) : static_cast<float>(zeros[static_cast<size_t>(g) * out + o]);
      const float want = (static_cast<float>(codes[static_cast<size_t>(o) * in + i]) - z) * scales[static_cast<size_t>(g) * out + o];
      if (!(got[static_cast<size_t>(o) * in + i] == want) && bad++ < 5)
        std::printf("  mismatch o=%d i=%d got %g want %g\n", o, i, got[static_cast<size_t>(o) * in + i], want);
    }
  std::printf("%s out=%d in=%d bits=%d group=%d %s%s\n", bad ? "FAIL" : "ok  ", out, in, bits, group,
              sym ? "sym" : "asym", act_order ? " act-order" : "");
  return bad ? 1 : 0;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int fails = 0;
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {true, false})
      for (bool act : {false, true}) {
        fails += run_case(37, 256, bits, 64, sym, act, rng);
        fails += run_case(16, 96, bits, 96, sym, act, rng);   // one group per channel
      }
  fails += run_case(9, 8 * 17, 4, 8, false, false, rng);      // in not a multiple of 32
  std::printf(fails ? "%d case(s) FAILED\n" : "all cases passed\n", fails);
  return fails ? 1 : 0;
}
