// Standalone tests of the CUDA kernels (no torch): dequantization against the CPU core
// (dequant_core.h), and the fused decode MoE against a float64 host reference.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../dequant_core.h"
#include "../dequant_kernels.cuh"
#include "../moe_decode.cuh"
#include "cuda_test_common.h"


namespace {

uint16_t to_bf16_bits(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float from_bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, v.size() * sizeof(T) + 16));
  CHECK_CUDA(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

struct Weight {  // one packed stack [batch, in*bits/32, out], float-valued scales
  int batch, out, in, bits, group;
  std::vector<int32_t> qweight;
  std::vector<float> scales;  // bf16-representable values
  std::vector<uint8_t> zeros;
};

Weight random_weight(int batch, int out, int in, int bits, int group, std::mt19937& rng) {
  Weight w{batch, out, in, bits, group, {}, {}, {}};
  const int rows = in * bits / 32, G = in / group;
  w.qweight.resize(static_cast<size_t>(batch) * rows * out);
  for (auto& q : w.qweight) q = static_cast<int32_t>(rng());
  w.scales.resize(static_cast<size_t>(batch) * G * out);
  for (auto& s : w.scales) s = from_bf16_bits(to_bf16_bits(0.001f + 0.02f * static_cast<float>(rng() % 10007) / 10007.f));
  w.zeros.resize(w.scales.size());
  for (auto& z : w.zeros) z = static_cast<uint8_t>(rng() % (1u << bits));
  return w;
}

// CPU core over every matrix of the stack -> float [batch, out, in].
std::vector<float> host_dequant(const Weight& w, bool sym) {
  const int rows = w.in * w.bits / 32, G = w.in / w.group;
  std::vector<float> out(static_cast<size_t>(w.batch) * w.out * w.in);
  const moequant::PackedDims d{w.in, w.out, G, w.group, w.bits};
  for (int m = 0; m < w.batch; ++m)
    moequant::dequantize_rows<float, float>(w.qweight.data() + static_cast<size_t>(m) * rows * w.out,
                                            w.scales.data() + static_cast<size_t>(m) * G * w.out,
                                            sym ? nullptr : w.zeros.data() + static_cast<size_t>(m) * G * w.out,
                                            nullptr, d, 0, w.out, out.data() + static_cast<size_t>(m) * w.out * w.in);
  return out;
}

int test_dequant_float(int bits, bool sym, std::mt19937& rng) {
  const Weight w = random_weight(3, 200, 256, bits, 64, rng);
  const std::vector<float> want = host_dequant(w, sym);
  moequant::cuda::DequantArgs<float, float> a{};
  a.qweight = to_device(w.qweight);
  a.scales = to_device(w.scales);
  a.zeros = sym ? nullptr : to_device(w.zeros);
  a.batch = w.batch; a.in = w.in; a.out = w.out; a.groups = w.in / w.group; a.group_size = w.group; a.bits = bits;
  float* dst = nullptr;
  CHECK_CUDA(cudaMalloc(&dst, want.size() * 4));
  CHECK_CUDA(cudaMemset(dst, 0xFF, want.size() * 4));  // NaN poison
  a.dst = dst;
  CHECK_CUDA(moequant::cuda::launch_dequant(a, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> got(want.size());
  CHECK_CUDA(cudaMemcpy(got.data(), dst, got.size() * 4, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += !(got[i] == want[i]);
  std::printf("%s dequant float bits=%d %s: %zu mismatches\n", bad ? "FAIL" : "ok  ", bits, sym ? "sym" : "asym", bad);
  cudaFree(const_cast<int32_t*>(a.qweight)); cudaFree(const_cast<float*>(a.scales));
  if (a.zeros) cudaFree(const_cast<uint8_t*>(a.zeros));
  cudaFree(dst);
  return bad != 0;
}

// The bf16 4-bit fast path against the CPU core rounded to bf16, bit for bit.
int check_dequant_bf16_fast_path(const Weight& w, bool sym, const char* label) {
  const std::vector<float> want = host_dequant(w, sym);
  std::vector<uint16_t> s16(w.scales.size());
  for (size_t i = 0; i < s16.size(); ++i) s16[i] = to_bf16_bits(w.scales[i]);
  moequant::cuda::DequantArgs<__nv_bfloat16, __nv_bfloat16> a{};
  a.qweight = to_device(w.qweight);
  a.scales = reinterpret_cast<const __nv_bfloat16*>(to_device(s16));
  a.zeros = sym ? nullptr : to_device(w.zeros);
  a.batch = w.batch; a.in = w.in; a.out = w.out; a.groups = w.in / w.group; a.group_size = w.group; a.bits = 4;
  uint16_t* dst = nullptr;
  CHECK_CUDA(cudaMalloc(&dst, want.size() * 2));
  CHECK_CUDA(cudaMemset(dst, 0xFF, want.size() * 2));
  a.dst = reinterpret_cast<__nv_bfloat16*>(dst);
  CHECK_CUDA(moequant::cuda::launch_dequant(a, 0));
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> got(want.size());
  CHECK_CUDA(cudaMemcpy(got.data(), dst, got.size() * 2, cudaMemcpyDeviceToHost));
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += got[i] != to_bf16_bits(want[i]);
  std::printf("%s dequant bf16 fast path %s: %zu mismatches (bit-exact expected)\n", bad ? "FAIL" : "ok  ", label, bad);
  cudaFree(dst);
  return bad != 0;
}

int test_dequant_bf16_fast_path(bool sym, std::mt19937& rng) {
  return check_dequant_bf16_fast_path(random_weight(2, 300, 512, 4, 128, rng), sym, sym ? "sym" : "asym");
}

int test_dequant_bf16_fast_path_odd(std::mt19937& rng) {  // partial row and column blocks, group 8
  return check_dequant_bf16_fast_path(random_weight(2, 40, 136, 4, 8, rng), false, "40x136 g8 asym");
}

// bad_id: token 0's last expert id is E (out of range): that pair contributes nothing.
// group: gate_up's group size; group_down: down's (0: the same)
int test_decode(int M, int E, int k, int H, int I, int group, bool sym, std::mt19937& rng, bool bad_id = false,
                int group_down = 0) {
  if (group_down == 0) group_down = group;
  const Weight w13 = random_weight(E, 2 * I, H, 4, group, rng);
  const Weight w2 = random_weight(E, H, I, 4, group_down, rng);
  const std::vector<float> W13 = host_dequant(w13, sym), W2 = host_dequant(w2, sym);
  std::vector<uint16_t> x16(static_cast<size_t>(M) * H);
  std::normal_distribution<float> normal;
  for (auto& v : x16) v = to_bf16_bits(normal(rng));
  std::vector<int32_t> ids;
  std::vector<float> wts;
  random_routing(M, E, k, rng, ids, wts, [](std::mt19937& g) { return 0.1f + static_cast<float>(g() % 1000) / 1000.f; });
  if (bad_id) ids[k - 1] = E;
  // float64 reference
  std::vector<double> want(static_cast<size_t>(M) * H, 0.0);
  for (int t = 0; t < M; ++t)
    for (int j = 0; j < k; ++j) {
      const int e = ids[t * k + j];
      if (e >= E) continue;
      std::vector<double> hv(I);
      for (int n = 0; n < I; ++n) {
        double g = 0, u = 0;
        for (int i = 0; i < H; ++i) {
          const double xv = from_bf16_bits(x16[static_cast<size_t>(t) * H + i]);
          g += xv * W13[(static_cast<size_t>(e) * 2 * I + n) * H + i];
          u += xv * W13[(static_cast<size_t>(e) * 2 * I + I + n) * H + i];
        }
        hv[n] = g / (1 + std::exp(-g)) * u;
      }
      for (int o = 0; o < H; ++o) {
        double s = 0;
        for (int n = 0; n < I; ++n) s += hv[n] * W2[(static_cast<size_t>(e) * H + o) * I + n];
        want[static_cast<size_t>(t) * H + o] += wts[t * k + j] * s;
      }
    }
  std::vector<uint16_t> s13(w13.scales.size()), s2(w2.scales.size());
  for (size_t i = 0; i < s13.size(); ++i) s13[i] = to_bf16_bits(w13.scales[i]);
  for (size_t i = 0; i < s2.size(); ++i) s2[i] = to_bf16_bits(w2.scales[i]);
  moequant::cuda::DecodeArgs<__nv_bfloat16> a{};
  a.x = reinterpret_cast<const __nv_bfloat16*>(to_device(x16));
  a.w13 = to_device(w13.qweight);
  a.s13 = reinterpret_cast<const __nv_bfloat16*>(to_device(s13));
  a.z13 = sym ? nullptr : to_device(w13.zeros);
  a.w2 = to_device(w2.qweight);
  a.s2 = reinterpret_cast<const __nv_bfloat16*>(to_device(s2));
  a.z2 = sym ? nullptr : to_device(w2.zeros);
  a.topk_ids = to_device(ids);
  a.ids64 = false;
  a.topk_weights = to_device(wts);
  a.weights_kind = 0;
  a.M = M; a.top_k = k; a.E = E; a.H = H; a.I = I;
  a.rows_per_group13 = group / 8; a.rows_per_group2 = group_down / 8;
  int num_sms = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  // every kernel that takes the problem: the fused one-token kernel, the TMA kernel wherever it takes the
  // shape (main sets MOEQUANT_DECODE_TMA=2), and the register or tiled kernel
  const bool tma = moequant::cuda::decode_tma_available(), fused = moequant::cuda::decode_fused_available();
  std::vector<moequant::cuda::DecodePlan> plans;
  for (const bool use_fused : {fused, false})
    for (const bool use_tma : {tma, false}) {
      const moequant::cuda::DecodePlan pl =
          moequant::cuda::decode_plan(M, k, E, H, I, group / 8, group_down / 8, num_sms, use_tma, use_fused);
      if (std::none_of(plans.begin(), plans.end(), [&](const moequant::cuda::DecodePlan& q) { return q.path == pl.path; }))
        plans.push_back(pl);
    }
  const size_t ncount = moequant::cuda::decode_counters(E, H, I);
  int fails = 0;
  for (const moequant::cuda::DecodePlan& pl : plans) {
    a.split13 = pl.split13;
    a.split2 = pl.split2;
    a.path = pl.path;
    CHECK_CUDA(cudaMalloc(&a.h, static_cast<size_t>(pl.rows) * I * 2));
    CHECK_CUDA(cudaMalloc(&a.out13, static_cast<size_t>(a.split13) * pl.rows * 2 * I * 4));
    CHECK_CUDA(cudaMalloc(&a.out2, static_cast<size_t>(a.split2) * pl.rows * H * 4));
    CHECK_CUDA(cudaMalloc(&a.counters, ncount * 4));
    CHECK_CUDA(cudaMemset(a.counters, 0, ncount * 4));
    uint16_t* y = nullptr;
    CHECK_CUDA(cudaMalloc(&y, static_cast<size_t>(M) * H * 2));
    CHECK_CUDA(cudaMemset(y, 0xFF, static_cast<size_t>(M) * H * 2));
    a.y = reinterpret_cast<__nv_bfloat16*>(y);
    CHECK_CUDA(moequant::cuda::launch_decode(a, 0));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<uint16_t> got(static_cast<size_t>(M) * H);
    CHECK_CUDA(cudaMemcpy(got.data(), y, got.size() * 2, cudaMemcpyDeviceToHost));
    for (void* ptr : {static_cast<void*>(a.h), static_cast<void*>(a.out13), static_cast<void*>(a.out2),
                      static_cast<void*>(a.counters), static_cast<void*>(y)})
      CHECK_CUDA(cudaFree(ptr));
    double num = 0, den = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double d = from_bf16_bits(got[i]) - want[i];
      num += d * d;
      den += want[i] * want[i];
    }
    const double rel = std::sqrt(num / den);
    const bool ok = rel < 5e-3;  // bf16 output rounding is ~2e-3
    static const char* names[] = {"tiles", "gemv", "gemv-tma", "fused"};
    std::printf("%s decode M=%d E=%d k=%d H=%d I=%d g=%d %s [%s, splits %d/%d]: rel err %.2e\n", ok ? "ok  " : "FAIL", M,
                E, k, H, I, group, sym ? "sym" : "asym", names[pl.path], pl.split13, pl.split2, rel);
    fails += !ok;
  }
  return fails;
}

}  // namespace

int main() {
  std::setvbuf(stdout, nullptr, _IONBF, 0);  // keep every line if the process dies
  int dev = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  setenv("MOEQUANT_DECODE_TMA", "2", 1);  // test the TMA kernel on every shape it takes, not only long K
  setenv("MOEQUANT_DECODE_FUSED", "1", 1);  // and the fused one-token kernel, on by default or not
  std::mt19937 rng(99);
  int fails = 0;
  for (int bits : {2, 3, 4, 8})
    for (bool sym : {true, false}) fails += test_dequant_float(bits, sym, rng);
  for (bool sym : {true, false}) fails += test_dequant_bf16_fast_path(sym, rng);
  fails += test_dequant_bf16_fast_path_odd(rng);
  fails += test_decode(1, 8, 2, 256, 128, 128, true, rng);
  fails += test_decode(3, 8, 2, 256, 96, 32, false, rng);
  fails += test_decode(12, 16, 4, 512, 64, 64, false, rng);
  fails += test_decode(20, 4, 2, 128, 64, 32, true, rng);  // > 16 tokens per expert: several passes
  fails += test_decode(1, 8, 2, 1024, 3584, 128, true, rng);  // K split across blocks in the down GEMM
  fails += test_decode(1, 8, 2, 4096, 512, 128, false, rng);  // K split across blocks in the gate_up GEMM
  fails += test_decode(2, 8, 2, 520, 1416, 8, false, rng);    // ragged chunks and tiles, group 8
  // one token (the gemv kernel): ragged column tiles, asymmetric, several groups per warp, and the
  // tiled kernel again where the gemv kernel does not apply (group 16, K not a multiple of 32)
  fails += test_decode(1, 16, 4, 544, 1440, 32, false, rng);
  fails += test_decode(1, 8, 2, 2048, 1408, 64, true, rng);
  fails += test_decode(1, 8, 2, 256, 128, 16, false, rng);
  fails += test_decode(1, 8, 2, 264, 136, 8, true, rng);
  // groups of 256 K: two TMA stages per group, K slices that start inside a group
  fails += test_decode(1, 8, 2, 768, 768, 256, false, rng);
  // one token through the fused kernel: groups of 32 (a fold per chunk, scale rows per stage 16), 512 K
  // on gate_up with 64 on down (two gate_up stages per group; down's K = I = 256 holds no group of 512) and an
  // id out of range (the pair is skipped)
  fails += test_decode(1, 16, 4, 1024, 96, 32, false, rng);
  fails += test_decode(1, 8, 2, 2048, 256, 512, true, rng, false, 64);
  fails += test_decode(1, 8, 3, 3072, 192, 64, false, rng, /*bad_id=*/true);
  // 2-8 tokens through the TMA kernel (one slot per distinct expert): few experts shared by all tokens,
  // many experts with few tokens each, and the most pairs it takes (64)
  fails += test_decode(8, 8, 2, 1024, 512, 128, false, rng);
  fails += test_decode(5, 64, 6, 512, 384, 64, true, rng);
  fails += test_decode(8, 128, 8, 256, 256, 32, false, rng);
  std::printf(fails ? "%d case(s) FAILED\n" : "all cases passed\n", fails);
  return fails ? 1 : 0;
}
