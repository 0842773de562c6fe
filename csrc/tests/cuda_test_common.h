// What the standalone CUDA programs (test_kernels_cuda, bench_decode_cuda) share: the error check and a
// random top-k routing.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CHECK_CUDA(call)                                                                             \
  do {                                                                                               \
    const cudaError_t e_ = (call);                                                                   \
    if (e_ != cudaSuccess) {                                                                         \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #call); \
      std::exit(2);                                                                                  \
    }                                                                                                \
  } while (0)

// ids [M, k]: k distinct experts of E per token. weights [M, k]: weight(rng) each.
template <typename W>
void random_routing(int M, int E, int k, std::mt19937& rng, std::vector<int32_t>& ids, std::vector<float>& weights,
                    W weight) {
  ids.assign(static_cast<size_t>(M) * k, 0);
  weights.assign(ids.size(), 0.f);
  std::vector<int> perm(E);
  for (int t = 0; t < M; ++t) {
    for (int e = 0; e < E; ++e) perm[e] = e;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int j = 0; j < k; ++j) {
      ids[t * k + j] = perm[j];
      weights[t * k + j] = weight(rng);
    }
  }
}
