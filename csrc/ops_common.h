// Input checks shared by the CPU (.cpp) and CUDA (.cu) implementations of the moequant ops.
// Every check names the problem and the fix.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace moequant {

// Error messages are built with std::to_string, never with an iostream: on the GPU image, formatting
// an integer through the ostringstream of TORCH_CHECK crashed (SIGSEGV in num_put, inside a pytest
// process only), so every number, shape and dtype is turned into text here first and TORCH_CHECK only
// ever receives one std::string.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
inline void append(std::string& s, at::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, at::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  s += ']';
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic<T>::value>>
inline void append(std::string& s, T v) { s += std::to_string(v); }
template <typename... Args> std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
// TORCH_CHECK with the message built by message() only when the check fails.
#define MQ_CHECK(cond, ...)                                          \
  do {                                                               \
    if (C10_UNLIKELY(!(cond))) TORCH_CHECK(false, ::moequant::message(__VA_ARGS__)); \
  } while (0)

// A packed weight [..., in*bits/32, out] with its scales / zeros / g_idx, validated.
struct Packed {
  at::Tensor qweight, scales, qzeros, g_idx;  // contiguous; qzeros / g_idx undefined when absent
  int64_t batch = 1;                          // product of the leading dims (experts)
  int64_t in_features = 0, out_features = 0, groups = 0, group_size = 0;
  int bits = 0;
  bool g_idx_per_matrix = false;              // g_idx [..., in] instead of [in]
};

inline Packed check_packed(const char* what, const at::Tensor& qweight, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& qzeros, const c10::optional<at::Tensor>& g_idx,
                           int64_t bits, int64_t group_size) {
  Packed p;
  MQ_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, what, ": bits=", bits,
              " is not supported; choose one of 2, 3, 4, 8");
  MQ_CHECK(qweight.scalar_type() == at::kInt, what, ": qweight must be int32 (the packed format), got ",
              qweight.scalar_type());
  MQ_CHECK(qweight.dim() >= 2, what, ": qweight must be [..., in*bits/32, out], got shape ", qweight.sizes());
  const int64_t nd = qweight.dim();
  p.bits = static_cast<int>(bits);
  p.in_features = qweight.size(nd - 2) * 32 / bits;
  p.out_features = qweight.size(nd - 1);
  for (int64_t d = 0; d < nd - 2; ++d) p.batch *= qweight.size(d);
  MQ_CHECK(scales.dim() == nd && scales.sizes().slice(0, nd - 2) == qweight.sizes().slice(0, nd - 2) &&
                  scales.size(nd - 1) == p.out_features,
              what, ": scales must be [..., in/g, out] matching qweight ", qweight.sizes(), ", got ", scales.sizes());
  const auto st = scales.scalar_type();
  MQ_CHECK(st == at::kHalf || st == at::kBFloat16 || st == at::kFloat, what,
              ": scales must be float16, bfloat16 or float32, got ", st);
  p.groups = scales.size(nd - 2);
  MQ_CHECK(p.groups >= 1, what, ": scales have no groups");
  if (g_idx.has_value() && g_idx->defined()) {
    MQ_CHECK(g_idx->scalar_type() == at::kInt, what, ": g_idx must be int32, got ", g_idx->scalar_type());
    p.g_idx_per_matrix = g_idx->dim() > 1;
    const bool ok = g_idx->size(-1) == p.in_features &&
                    (g_idx->dim() == 1 || (g_idx->dim() == nd - 1 &&
                                           g_idx->sizes().slice(0, nd - 2) == qweight.sizes().slice(0, nd - 2)));
    MQ_CHECK(ok, what, ": g_idx must be [in] or [..., in] with in=", p.in_features, ", got ", g_idx->sizes());
    MQ_CHECK(g_idx->device() == qweight.device(), what, ": g_idx is on ", g_idx->device(), ", qweight on ",
                qweight.device(), "; move them to one device");
    p.g_idx = g_idx->contiguous();
    p.group_size = 0;
  } else {
    p.group_size = group_size <= 0 ? p.in_features : group_size;
    const int64_t need = (p.in_features + p.group_size - 1) / p.group_size;
    MQ_CHECK(p.groups == need, what, ": scales have ", p.groups, " groups but in=", p.in_features,
                " with group_size=", group_size, " needs ", need, " (pass the group size the weight was packed with)");
  }
  if (qzeros.has_value() && qzeros->defined()) {
    MQ_CHECK(qzeros->scalar_type() == at::kByte, what, ": qzeros must be uint8, got ", qzeros->scalar_type());
    MQ_CHECK(qzeros->sizes() == scales.sizes(), what, ": qzeros ", qzeros->sizes(), " must match scales ",
                scales.sizes());
    MQ_CHECK(qzeros->device() == qweight.device(), what, ": qzeros is on ", qzeros->device(), ", qweight on ",
                qweight.device(), "; move them to one device");
    p.qzeros = qzeros->contiguous();
  }
  MQ_CHECK(scales.device() == qweight.device(), what, ": scales is on ", scales.device(), ", qweight on ",
              qweight.device(), "; move them to one device");
  p.qweight = qweight.contiguous();
  p.scales = scales.contiguous();
  return p;
}

inline void check_dtype_out(at::ScalarType dt) {
  MQ_CHECK(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat,
              "dequantize: dtype must be float16, bfloat16 or float32, got ", dt);
}

// Output shape [..., out, in] of a dequantized packed weight.
inline std::vector<int64_t> dequant_shape(const Packed& p) {
  std::vector<int64_t> s(p.qweight.sizes().begin(), p.qweight.sizes().end() - 2);
  s.push_back(p.out_features);
  s.push_back(p.in_features);
  return s;
}

// Checks of the small-batch fused MoE op; returns (M, H, I, E, top_k).
struct MoeDims { int64_t M, H, I, E, top_k; };

inline MoeDims check_moe(const at::Tensor& x, const Packed& w13, const Packed& w2, const at::Tensor& topk_ids,
                         const at::Tensor& topk_weights) {
  MQ_CHECK(x.dim() == 2, "moe_w4a16_decode: x must be [M, H], got ", x.sizes());
  const auto xt = x.scalar_type();
  MQ_CHECK(xt == at::kHalf || xt == at::kBFloat16 || xt == at::kFloat,
              "moe_w4a16_decode: x must be float16, bfloat16 or float32, got ", xt);
  MQ_CHECK(w13.qweight.dim() == 3 && w2.qweight.dim() == 3,
              "moe_w4a16_decode: expert weights must be stacked [E, in*bits/32, out]");
  MoeDims d;
  d.M = x.size(0);
  d.H = x.size(1);
  d.E = w13.qweight.size(0);
  d.I = w2.in_features;
  MQ_CHECK(w2.qweight.size(0) == d.E, "moe_w4a16_decode: w13 has ", d.E, " experts, w2 ", w2.qweight.size(0));
  MQ_CHECK(w13.in_features == d.H && w13.out_features == 2 * d.I && w2.out_features == d.H,
              "moe_w4a16_decode: shapes disagree: x [M, ", d.H, "], w13 [E, ", w13.out_features, " out, ",
              w13.in_features, " in], w2 [E, ", w2.out_features, " out, ", w2.in_features,
              " in]; expected w13 [E, 2I, H] and w2 [E, H, I] (gate rows first)");
  MQ_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == d.M, "moe_w4a16_decode: topk_ids must be [M, k], got ",
              topk_ids.sizes());
  MQ_CHECK(topk_ids.scalar_type() == at::kInt || topk_ids.scalar_type() == at::kLong,
              "moe_w4a16_decode: topk_ids must be int32 or int64, got ", topk_ids.scalar_type());
  MQ_CHECK(topk_weights.sizes() == topk_ids.sizes(), "moe_w4a16_decode: topk_weights ", topk_weights.sizes(),
              " must match topk_ids ", topk_ids.sizes());
  const auto wt = topk_weights.scalar_type();
  MQ_CHECK(wt == at::kHalf || wt == at::kBFloat16 || wt == at::kFloat,
              "moe_w4a16_decode: topk_weights must be float16, bfloat16 or float32, got ", wt);
  for (const at::Tensor* t : {&w13.qweight, &w2.qweight, &topk_ids, &topk_weights})
    MQ_CHECK(t->device() == x.device(), "moe_w4a16_decode: all inputs must be on ", x.device(), ", one is on ",
                t->device());
  d.top_k = topk_ids.size(1);
  return d;
}

// Expert e of a stacked packed weight (a view; shares storage).
inline Packed select_expert(const Packed& p, int64_t e) {
  Packed q = p;
  q.qweight = p.qweight.select(0, e);
  q.scales = p.scales.select(0, e);
  if (p.qzeros.defined()) q.qzeros = p.qzeros.select(0, e);
  if (p.g_idx.defined() && p.g_idx_per_matrix) q.g_idx = p.g_idx.select(0, e);
  q.batch = 1;
  return q;
}

// CPU dequantization of a validated packed weight -> [..., out, in] in `dtype` (dequant_cpu.cpp).
at::Tensor dequantize_cpu_packed(const Packed& p, at::ScalarType dtype);

}  // namespace moequant
