// CUDA implementation of torch.ops.moequant.moe_w4a16_decode (kernels: moe_decode_kernels.cuh).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "moe_decode.cuh"
#include "ops_common.h"

namespace moequant {
namespace {

int rows_per_group(const Packed& p, const char* name) {
  MQ_CHECK(p.group_size % 8 == 0, "moe_w4a16_decode: ", name, " group size ", p.group_size,
              " must be a multiple of 8 (or per channel) for the CUDA kernel");
  return static_cast<int>(p.group_size / 8);
}

template <typename T, typename CT>
void run(const at::Tensor& x, const Packed& w13, const Packed& w2, const at::Tensor& ids, const at::Tensor& wts,
         const MoeDims& d, const cuda::DecodePlan& plan, at::Tensor& h, at::Tensor& out13, at::Tensor& out2,
         at::Tensor& counters, at::Tensor& y) {
  cuda::DecodeArgs<CT> a;
  a.x = reinterpret_cast<const CT*>(x.data_ptr<T>());
  a.w13 = w13.qweight.data_ptr<int32_t>();
  a.s13 = reinterpret_cast<const CT*>(w13.scales.data_ptr<T>());
  a.z13 = w13.qzeros.defined() ? w13.qzeros.data_ptr<uint8_t>() : nullptr;
  a.w2 = w2.qweight.data_ptr<int32_t>();
  a.s2 = reinterpret_cast<const CT*>(w2.scales.data_ptr<T>());
  a.z2 = w2.qzeros.defined() ? w2.qzeros.data_ptr<uint8_t>() : nullptr;
  a.topk_ids = ids.data_ptr();
  a.ids64 = ids.scalar_type() == at::kLong;
  a.topk_weights = wts.data_ptr();
  a.weights_kind = wts.scalar_type() == at::kFloat ? 0 : (wts.scalar_type() == at::kHalf ? 1 : 2);
  a.M = static_cast<int>(d.M);
  a.top_k = static_cast<int>(d.top_k);
  a.E = static_cast<int>(d.E);
  a.H = static_cast<int>(d.H);
  a.I = static_cast<int>(d.I);
  a.rows_per_group13 = rows_per_group(w13, "w13");
  a.rows_per_group2 = rows_per_group(w2, "w2");
  a.split13 = plan.split13;
  a.split2 = plan.split2;
  a.path = plan.path;
  a.h = reinterpret_cast<CT*>(h.data_ptr<T>());
  a.out13 = out13.data_ptr<float>();
  a.out2 = out2.data_ptr<float>();
  a.counters = counters.data_ptr<int>();
  a.y = reinterpret_cast<CT*>(y.data_ptr<T>());
  const cudaError_t err = cuda::launch_decode<CT>(a, at::cuda::getCurrentCUDAStream());
  MQ_CHECK(err == cudaSuccess, "moe_w4a16_decode: CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor moe_w4a16_decode_cuda(const at::Tensor& x, const at::Tensor& w13_qweight, const at::Tensor& w13_scales,
                                 const c10::optional<at::Tensor>& w13_qzeros, const at::Tensor& w2_qweight,
                                 const at::Tensor& w2_scales, const c10::optional<at::Tensor>& w2_qzeros,
                                 const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t bits,
                                 int64_t w13_group_size, int64_t w2_group_size) {
  MQ_CHECK(bits == 4, "moe_w4a16_decode: the CUDA kernel takes 4-bit weights, got bits=", bits,
              "; dequantize and use a dense path for other widths");
  Packed w13 = check_packed("moe_w4a16_decode (w13)", w13_qweight, w13_scales, w13_qzeros, {}, bits, w13_group_size);
  Packed w2 = check_packed("moe_w4a16_decode (w2)", w2_qweight, w2_scales, w2_qzeros, {}, bits, w2_group_size);
  const MoeDims d = check_moe(x, w13, w2, topk_ids, topk_weights);
  MQ_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "moe_w4a16_decode: on CUDA x must be bfloat16 or float16, got ", x.scalar_type());
  MQ_CHECK(w13.scales.scalar_type() == x.scalar_type() && w2.scales.scalar_type() == x.scalar_type(),
              "moe_w4a16_decode: scales must have x's dtype ", x.scalar_type(), " (got ", w13.scales.scalar_type(), ", ",
              w2.scales.scalar_type(), "); convert them once at load with .to(x.dtype)");
  MQ_CHECK(d.M * d.top_k <= cuda::kDecodeMaxPairs, "moe_w4a16_decode: M*top_k = ", d.M * d.top_k, " exceeds ",
              cuda::kDecodeMaxPairs, "; this kernel is for decode-sized batches: use the Triton fused_moe_w4a16 for large M");
  const c10::cuda::CUDAGuard guard(x.device());
  // the kernels read 16 (weights, x), 8 (scales) and 4 (zeros) bytes at a time: start on a 16-byte boundary
  for (at::Tensor* t : {&w13.qweight, &w13.scales, &w13.qzeros, &w2.qweight, &w2.scales, &w2.qzeros})
    if (t->defined() && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) *t = t->clone();
  // 16-byte loads of x: a view that starts off a 16-byte boundary is copied (rare: sliced inputs)
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16) xc = xc.clone();
  const at::Tensor ids = topk_ids.contiguous(), wts = topk_weights.contiguous();
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cuda::DecodePlan plan =
      cuda::decode_plan(static_cast<int>(d.M), static_cast<int>(d.top_k), static_cast<int>(d.E), static_cast<int>(d.H),
                        static_cast<int>(d.I), rows_per_group(w13, "w13"), rows_per_group(w2, "w2"), num_sms,
                        cuda::decode_tma_available(), cuda::decode_fused_available());
  const int64_t split13 = plan.split13, split2 = plan.split2;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor h = at::empty({plan.rows, d.I}, x.options());
  at::Tensor out13 = at::empty({split13 > 1 ? split13 : 0, plan.rows, 2 * d.I}, f32);
  at::Tensor out2 = at::empty({split2, plan.rows, d.H}, f32);
  at::Tensor counters = at::zeros({cuda::decode_counters(static_cast<int>(d.E), static_cast<int>(d.H),
                                                         static_cast<int>(d.I))}, x.options().dtype(at::kInt));
  at::Tensor y = at::empty({d.M, d.H}, x.options());
  if (d.M == 0) return y;
  if (x.scalar_type() == at::kBFloat16)
    run<at::BFloat16, __nv_bfloat16>(xc, w13, w2, ids, wts, d, plan, h, out13, out2, counters, y);
  else
    run<at::Half, __half>(xc, w13, w2, ids, wts, d, plan, h, out13, out2, counters, y);
  return y;
}

}  // namespace
}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, CUDA, m) { m.impl("moe_w4a16_decode", &moequant::moe_w4a16_decode_cuda); }
