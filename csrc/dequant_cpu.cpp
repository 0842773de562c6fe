// moequant._C: op schemas, the CPU dequantization op, and the Python module.
//
// The ops live in torch.ops.moequant (TORCH_LIBRARY); importing moequant._C registers them.
// CUDA implementations are registered from the .cu files when the extension is built with CUDA.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include "dequant_core.h"
#include "ops_common.h"

namespace moequant {

namespace {

template <typename S, typename O>
void dequantize_cpu_typed(const Packed& p, at::Tensor& out) {
  const PackedDims d{p.in_features, p.out_features, p.groups, p.group_size, p.bits};
  const int32_t* qw = p.qweight.data_ptr<int32_t>();
  const S* sc = p.scales.data_ptr<S>();
  const uint8_t* zr = p.qzeros.defined() ? p.qzeros.data_ptr<uint8_t>() : nullptr;
  const int32_t* gi = p.g_idx.defined() ? p.g_idx.data_ptr<int32_t>() : nullptr;
  O* dst = out.data_ptr<O>();
  const int64_t rows_q = p.qweight.size(-2), per_matrix_q = rows_q * d.out_features;
  const int64_t per_matrix_s = d.groups * d.out_features;
  const int64_t per_matrix_o = d.out_features * d.in_features;
  // One task = a run of output rows of one matrix; grain keeps tasks around 64K elements.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, d.in_features));
  at::parallel_for(0, p.batch * d.out_features, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t m = begin / d.out_features, o0 = begin % d.out_features;
      const int64_t o1 = std::min(d.out_features, o0 + (end - begin));
      dequantize_rows<S, O>(qw + m * per_matrix_q, sc + m * per_matrix_s, zr ? zr + m * per_matrix_s : nullptr,
                            gi ? gi + (p.g_idx_per_matrix ? m * d.in_features : 0) : nullptr, d, o0, o1,
                            dst + m * per_matrix_o);
      begin += o1 - o0;
    }
  });
}

template <typename S>
void dequantize_cpu_out(const Packed& p, at::Tensor& out) {
  switch (out.scalar_type()) {
    case at::kFloat: return dequantize_cpu_typed<S, float>(p, out);
    case at::kHalf: return dequantize_cpu_typed<S, at::Half>(p, out);
    case at::kBFloat16: return dequantize_cpu_typed<S, at::BFloat16>(p, out);
    default: MQ_CHECK(false, "dequantize: unsupported output dtype ", out.scalar_type());
  }
}

at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, const c10::optional<at::Tensor>& qzeros,
                          const c10::optional<at::Tensor>& g_idx, int64_t bits, int64_t group_size,
                          at::ScalarType dtype) {
  const Packed p = check_packed("dequantize", qweight, scales, qzeros, g_idx, bits, group_size);
  if (p.g_idx.defined() && p.g_idx.numel()) {  // out-of-range groups would read past scales
    const auto mn = p.g_idx.min().item<int64_t>(), mx = p.g_idx.max().item<int64_t>();
    MQ_CHECK(mn >= 0 && mx < p.groups, "dequantize: g_idx values must lie in [0, ", p.groups, "), got [", mn,
                ", ", mx, "]");
  }
  return dequantize_cpu_packed(p, dtype);
}

}  // namespace

at::Tensor dequantize_cpu_packed(const Packed& p, at::ScalarType dtype) {
  check_dtype_out(dtype);
  at::Tensor out = at::empty(dequant_shape(p), p.qweight.options().dtype(dtype));
  if (out.numel() == 0) return out;
  switch (p.scales.scalar_type()) {
    case at::kFloat: dequantize_cpu_out<float>(p, out); break;
    case at::kHalf: dequantize_cpu_out<at::Half>(p, out); break;
    case at::kBFloat16: dequantize_cpu_out<at::BFloat16>(p, out); break;
    default: MQ_CHECK(false, "dequantize: unsupported scales dtype ", p.scales.scalar_type());
  }
  return out;
}

}  // namespace moequant

TORCH_LIBRARY(moequant, m) {
  m.def("dequantize(Tensor qweight, Tensor scales, Tensor? qzeros, Tensor? g_idx, int bits, int group_size, "
        "ScalarType dtype) -> Tensor");
  m.def("moe_w4a16_decode(Tensor x, Tensor w13_qweight, Tensor w13_scales, Tensor? w13_qzeros, "
        "Tensor w2_qweight, Tensor w2_scales, Tensor? w2_qzeros, Tensor topk_ids, Tensor topk_weights, "
        "int bits, int w13_group_size, int w2_group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(moequant, CPU, m) { m.impl("dequantize", &moequant::dequantize_cpu); }

// The Python module itself is empty: the ops are reached through torch.ops.moequant.
static PyModuleDef moequant_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                        "moequant C++/CUDA ops, registered as torch.ops.moequant", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&moequant_c_module);
  if (mod == nullptr) return nullptr;
#ifdef MOEQUANT_WITH_CUDA
  PyModule_AddIntConstant(mod, "WITH_CUDA", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_CUDA", 0);
#endif
  return mod;
}
