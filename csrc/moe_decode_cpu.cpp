// CPU implementation of the small-batch fused MoE op (moe_w4a16_decode): for each expert
// with routed tokens, dequantize it to float32 and run gate_up -> SiLU(gate)*up -> down,
// weighting by the routing weight and summing over top-k in float32.
#include <torch/library.h>

#include "ops_common.h"

namespace moequant {
namespace {

at::Tensor moe_w4a16_decode_cpu(const at::Tensor& x, const at::Tensor& w13_qweight, const at::Tensor& w13_scales,
                                const c10::optional<at::Tensor>& w13_qzeros, const at::Tensor& w2_qweight,
                                const at::Tensor& w2_scales, const c10::optional<at::Tensor>& w2_qzeros,
                                const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t bits,
                                int64_t w13_group_size, int64_t w2_group_size) {
  const Packed w13 = check_packed("moe_w4a16_decode (w13)", w13_qweight, w13_scales, w13_qzeros, {}, bits,
                                  w13_group_size);
  const Packed w2 = check_packed("moe_w4a16_decode (w2)", w2_qweight, w2_scales, w2_qzeros, {}, bits,
                                 w2_group_size);
  const MoeDims d = check_moe(x, w13, w2, topk_ids, topk_weights);
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor xf = x.to(at::kFloat);
  at::Tensor y = at::zeros({d.M, d.H}, x.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = wts.data_ptr<float>();
  const int64_t pairs = d.M * d.top_k;
  for (int64_t p = 0; p < pairs; ++p)
    MQ_CHECK(id[p] >= 0 && id[p] < d.E, "moe_w4a16_decode: topk_ids value ", id[p], " is outside [0, ", d.E, ")");
  for (int64_t e = 0; e < d.E; ++e) {
    std::vector<int64_t> tok;
    std::vector<float> w;
    for (int64_t p = 0; p < pairs; ++p)
      if (id[p] == e) {
        tok.push_back(p / d.top_k);
        w.push_back(wt[p]);
      }
    if (tok.empty()) continue;
    const at::Tensor t = at::tensor(tok, ids.options());
    const at::Tensor a = at::tensor(w, wts.options()).unsqueeze(1);
    const at::Tensor W13 = dequantize_cpu_packed(select_expert(w13, e), at::kFloat);  // [2I, H]
    const at::Tensor W2 = dequantize_cpu_packed(select_expert(w2, e), at::kFloat);    // [H, I]
    const at::Tensor gu = at::matmul(xf.index_select(0, t), W13.t());
    const at::Tensor h = at::silu(gu.narrow(1, 0, d.I)) * gu.narrow(1, d.I, d.I);
    y.index_add_(0, t, at::matmul(h, W2.t()) * a);
  }
  return y.to(x.scalar_type());
}

}  // namespace
}  // namespace moequant

TORCH_LIBRARY_IMPL(moequant, CPU, m) { m.impl("moe_w4a16_decode", &moequant::moe_w4a16_decode_cpu); }
