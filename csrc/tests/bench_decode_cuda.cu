// One-token decode kernels timed without Python or torch: every path decode_plan can take at M = 1 on
// the real MoE shapes (int4 g128 symmetric, bf16), and the fused kernel on grids of 96 and 64 blocks too,
// each as a CUDA graph of 16 calls on 16 different routings and inputs (so the weights come from HBM),
// median of 30 replays. Prints µs per call, the bytes
// of the routed experts (packed weights + scales) over the time, and the largest difference to the first
// path's output (the paths sum in different orders; bf16 output).
//   build/cmake/bench_decode_cuda [name]     (CMakeLists.txt builds it next to the tests; name: only the shapes whose
//                                            name contains it, e.g. DeepSeek, for a profiler)
#include <cmath>
#include <string>

#include "../moe_decode.cuh"
#include "cuda_test_common.h"


namespace {
using bf16 = __nv_bfloat16;
constexpr int kCalls = 16, kReps = 30, kGroup = 128;

template <typename T> T* device_random(size_t n, std::mt19937& rng, T (*gen)(std::mt19937&)) {
  std::vector<T> h(n);
  for (auto& v : h) v = gen(rng);
  T* d = nullptr;
  CHECK_CUDA(cudaMalloc(&d, n * sizeof(T)));
  CHECK_CUDA(cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
int32_t any_word(std::mt19937& rng) { return static_cast<int32_t>(rng()); }
bf16 small_scale(std::mt19937& rng) { return __float2bfloat16(0.0005f + 0.002f * (rng() % 1000) / 1000.f); }
bf16 activation(std::mt19937& rng) { return __float2bfloat16(std::normal_distribution<float>()(rng)); }

void bench_shape(const char* name, int E, int k, int H, int I, int num_sms, std::mt19937& rng) {
  const int rpg = kGroup / 8;
  moequant::cuda::DecodeArgs<bf16> a{};
  a.w13 = device_random<int32_t>(static_cast<size_t>(E) * H / 8 * 2 * I, rng, any_word);
  a.s13 = device_random<bf16>(static_cast<size_t>(E) * H / kGroup * 2 * I, rng, small_scale);
  a.w2 = device_random<int32_t>(static_cast<size_t>(E) * I / 8 * H, rng, any_word);
  a.s2 = device_random<bf16>(static_cast<size_t>(E) * I / kGroup * H, rng, small_scale);
  bf16* xs = device_random<bf16>(static_cast<size_t>(kCalls) * H, rng, activation);
  std::vector<int32_t> ids;
  std::vector<float> wts;
  random_routing(kCalls, E, k, rng, ids, wts, [k](std::mt19937&) { return 1.f / k; });  // call c: token c
  int32_t* d_ids = nullptr;
  float* d_wts = nullptr;
  CHECK_CUDA(cudaMalloc(&d_ids, ids.size() * 4));
  CHECK_CUDA(cudaMalloc(&d_wts, wts.size() * 4));
  CHECK_CUDA(cudaMemcpy(d_ids, ids.data(), ids.size() * 4, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_wts, wts.data(), wts.size() * 4, cudaMemcpyHostToDevice));
  a.ids64 = false;
  a.weights_kind = 0;
  a.M = 1; a.top_k = k; a.E = E; a.H = H; a.I = I;
  a.rows_per_group13 = rpg; a.rows_per_group2 = rpg;
  const double mb = k * ((3.0 * H * I) / 2 + (3.0 * H * I / kGroup) * 2) / 1e6;  // int4 codes + bf16 scales

  // grid: the fused kernel's grid when not 0 (else the plan's, fused_grid)
  struct Path { const char* name; bool tma, fused; int path, grid; };
  const Path paths[] = {{"fused", true, true, moequant::cuda::kDecodeFused, 0},
                        {"fused", true, true, moequant::cuda::kDecodeFused, 96},
                        {"fused", true, true, moequant::cuda::kDecodeFused, 64},
                        {"tma", true, false, moequant::cuda::kDecodeGemvTma, 0},
                        {"register", false, false, moequant::cuda::kDecodeGemv, 0}};
  std::vector<bf16> first;
  for (const Path& p : paths) {
    moequant::cuda::DecodePlan pl = moequant::cuda::decode_plan(1, k, E, H, I, rpg, rpg, num_sms, p.tma, p.fused);
    if (pl.path != p.path) continue;  // the plan does not take it here (e.g. TMA on short K: the register kernel)
    if (p.grid) {
      if (p.grid >= pl.split2) continue;  // not smaller than the plan's grid: timed already
      pl.split2 = p.grid;
    }
    a.split13 = pl.split13; a.split2 = pl.split2; a.path = pl.path;
    CHECK_CUDA(cudaMalloc(&a.h, static_cast<size_t>(pl.rows) * I * 2));
    CHECK_CUDA(cudaMalloc(&a.out13, static_cast<size_t>(pl.split13) * pl.rows * 2 * I * 4));
    CHECK_CUDA(cudaMalloc(&a.out2, static_cast<size_t>(pl.split2) * pl.rows * H * 4));
    const size_t ncount = moequant::cuda::decode_counters(E, H, I);
    CHECK_CUDA(cudaMalloc(&a.counters, ncount * 4));
    CHECK_CUDA(cudaMemset(a.counters, 0, ncount * 4));
    bf16* ys = nullptr;
    CHECK_CUDA(cudaMalloc(&ys, static_cast<size_t>(kCalls) * H * 2));
    cudaStream_t s;
    CHECK_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    auto calls = [&]() {
      for (int c = 0; c < kCalls; ++c) {
        moequant::cuda::DecodeArgs<bf16> ac = a;
        ac.x = xs + static_cast<size_t>(c) * H;
        ac.topk_ids = d_ids + c * k;
        ac.topk_weights = d_wts + c * k;
        ac.y = ys + static_cast<size_t>(c) * H;
        CHECK_CUDA(moequant::cuda::launch_decode(ac, s));
      }
    };
    calls();  // warm-up (and the first-call attribute settings) outside the graph
    CHECK_CUDA(cudaStreamSynchronize(s));
    cudaGraph_t g;
    cudaGraphExec_t ge;
    CHECK_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    calls();
    CHECK_CUDA(cudaStreamEndCapture(s, &g));
    CHECK_CUDA(cudaGraphInstantiate(&ge, g, 0));
    for (int i = 0; i < 3; ++i) CHECK_CUDA(cudaGraphLaunch(ge, s));
    std::vector<float> ms(kReps);
    cudaEvent_t e0, e1;
    CHECK_CUDA(cudaEventCreate(&e0));
    CHECK_CUDA(cudaEventCreate(&e1));
    for (float& t : ms) {
      CHECK_CUDA(cudaEventRecord(e0, s));
      CHECK_CUDA(cudaGraphLaunch(ge, s));
      CHECK_CUDA(cudaEventRecord(e1, s));
      CHECK_CUDA(cudaEventSynchronize(e1));
      CHECK_CUDA(cudaEventElapsedTime(&t, e0, e1));
    }
    std::sort(ms.begin(), ms.end());
    const double us = 1e3 * ms[kReps / 2] / kCalls;
    std::vector<bf16> y(static_cast<size_t>(kCalls) * H);
    CHECK_CUDA(cudaMemcpy(y.data(), ys, y.size() * 2, cudaMemcpyDeviceToHost));
    double diff = 0, norm = 0;
    if (first.empty()) first = y;
    for (size_t i = 0; i < y.size(); ++i) {
      const double d = __bfloat162float(y[i]) - __bfloat162float(first[i]);
      diff += d * d;
      norm += static_cast<double>(__bfloat162float(first[i])) * __bfloat162float(first[i]);
    }
    std::printf("| %s | %s | %d | %.1f | %.2f | %.2e |\n", name, p.name, pl.path == moequant::cuda::kDecodeFused ? pl.split2 : 0, us,
                mb / us, std::sqrt(diff / norm));
    CHECK_CUDA(cudaGraphExecDestroy(ge));
    CHECK_CUDA(cudaGraphDestroy(g));
    for (void* ptr : {static_cast<void*>(a.h), static_cast<void*>(a.out13), static_cast<void*>(a.out2),
                      static_cast<void*>(a.counters), static_cast<void*>(ys)})
      CHECK_CUDA(cudaFree(ptr));
    CHECK_CUDA(cudaStreamDestroy(s));
  }
  for (const void* ptr : {static_cast<const void*>(a.w13), static_cast<const void*>(a.s13), static_cast<const void*>(a.w2),
                          static_cast<const void*>(a.s2), static_cast<const void*>(xs), static_cast<const void*>(d_ids),
                          static_cast<const void*>(d_wts)})
    CHECK_CUDA(cudaFree(const_cast<void*>(ptr)));
}
}  // namespace

int main(int argc, char** argv) {
  int dev = 0, num_sms = 0;
  if (cudaGetDeviceCount(&dev) != cudaSuccess || dev == 0) {
    std::printf("no CUDA device\n");
    return 77;
  }
  CHECK_CUDA(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs; one token, int4 g128 sym, bf16; graph of %d calls, median of %d\n", prop.name, num_sms,
              kCalls, kReps);
  std::printf("| shape | path | fused grid | us per call | TB/s (routed experts' bytes) | rel. diff to first path |\n|---|---|---|---|---|---|\n");
  std::mt19937 rng(7);
  const std::string only = argc > 1 ? argv[1] : "";
  struct Shape { const char* name; int E, k, H, I; };
  for (const Shape& s : {Shape{"Mixtral-8x7B", 8, 2, 4096, 14336}, Shape{"DeepSeek-V2-Lite", 64, 6, 2048, 1408},
                         Shape{"Qwen3-30B-A3B", 128, 8, 2048, 768}})
    if (std::string(s.name).find(only) != std::string::npos) bench_shape(s.name, s.E, s.k, s.H, s.I, num_sms, rng);
  return 0;
}
