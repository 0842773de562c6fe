// CUDA implementation of torch.ops.moequant.dequantize (kernels: dequant_kernels.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dequant_kernels.cuh"
#include "ops_common.h"

namespace moequant {
namespace {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

template <typename S, typename O>
void run(const Packed& p, at::Tensor& out) {
  using CS = typename CudaType<S>::type;
  using CO = typename CudaType<O>::type;
  cuda::DequantArgs<CS, CO> a;
  a.qweight = p.qweight.data_ptr<int32_t>();
  a.scales = reinterpret_cast<const CS*>(p.scales.data_ptr<S>());
  a.zeros = p.qzeros.defined() ? p.qzeros.data_ptr<uint8_t>() : nullptr;
  a.g_idx = p.g_idx.defined() ? p.g_idx.data_ptr<int32_t>() : nullptr;
  a.g_idx_per_matrix = p.g_idx_per_matrix;
  a.batch = p.batch;
  a.in = p.in_features;
  a.out = p.out_features;
  a.groups = p.groups;
  a.group_size = p.group_size;
  a.bits = p.bits;
  a.dst = reinterpret_cast<CO*>(out.data_ptr<O>());
  const cudaError_t err = cuda::launch_dequant(a, at::cuda::getCurrentCUDAStream());
  MQ_CHECK(err == cudaSuccess, "dequantize: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename S>
void run_out(const Packed& p, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat: return run<S, float>(p, out);
    case at::kHalf: return run<S, at::Half>(p, out);
    case at::kBFloat16: return run<S, at::BFloat16>(p, out);
    default: MQ_CHECK(false, "dequantize: unsupported output dtype ", out.scalar_type());
  }
}

at::Tensor dequantize_cuda(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros,
                           const c10::optional<at::Tensor>& g_idx, int64_t bits, int64_t group_size, at::ScalarType dtype) {
  const Packed p = check_packed("dequantize", qweight, scales, qzeros, g_idx, bits, group_size);
  check_dtype_out(dtype);
  MQ_CHECK((p.in_features + 31) / 32 <= 65535, "dequantize: in_features ", p.in_features, " is too large (max ",
              65535 * 32, ")");
  const c10::cuda::CUDAGuard guard(qweight.device());
  at::Tensor out = at::empty(dequant_shape(p), qweight.options().dtype(dtype));
  if (out.numel() == 0) return out;
  switch (p.scales.scalar_type()) {
    case at::kFloat: run_out<float>(p, out); break;
    case at::kHalf: run_out<at::Half>(p, out); break;
    case at::kBFloat16: run_out<at::BFloat16>(p, out); break;
    default: MQ_CHECK(false, "dequantize: unsupported scales dtype ", p.scales.scalar_type());
  }
  return out;
}

}  // namespace
}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, CUDA, m) { m.impl("dequantize", &moequant::dequantize_cuda); }
