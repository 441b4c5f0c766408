// LibTorch glue for the generic ops' CUDA kernels (conv1d, its decoding step, the gated
// RMSNorm, the gated MLP activation): argument checks, dtype and layout handling, autograd
// Functions for the differentiable ops, and the fallback to the reference implementation
// for unsupported cases.
#include "ops_cuda.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/torch.h>

#include <optional>

#include "glue.hpp"
#include "launch.hpp"

namespace peftfw::kernels::cuda_ops {
namespace {

namespace kc = ::peftfw::kernels::cuda;
using namespace ::peftfw::kernels::glue;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kMaxNormDim = 8192;   // gated_rms_norm_* limit

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " (CUDA kernel): ", cudaGetErrorString(err));
}

// ---- causal conv1d ------------------------------------------------------------

// The distance in elements between consecutive rows of t seen as [numel / D, D] with a
// unit column stride, or -1 when no single row stride describes it.
int64_t row_stride(const torch::Tensor& t) {
  if (t.dim() == 0 || t.stride(-1) != 1) return -1;
  if (t.dim() == 1) return t.size(0);
  int64_t ld = -1;
  for (int64_t i = t.dim() - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (ld < 0) {
      ld = t.stride(i);
    } else {
      int64_t inner = 1;  // rows spanned by one step of dim i
      for (int64_t j = i + 1; j < t.dim() - 1; ++j) inner *= t.size(j);
      if (t.stride(i) != ld * inner) return -1;
    }
  }
  return ld < 0 ? t.size(-1) : ld;
}

// x [B,T,C] with evenly strided rows (row_stride), weight [C,K], bias [C] (x's dtype)
// and seq_ids [B,T] int64 contiguous, all on one device.
torch::Tensor conv_forward(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& b,
                           const torch::Tensor& seq, bool silu) {
  c10::cuda::CUDAGuard guard(x.device());
  auto out = torch::empty(x.sizes(), x.options());
  const auto err = kc::causal_conv1d_fwd(
      dtype_of(x), x.data_ptr(), row_stride(x), w.data_ptr(), ptr_or_null(b),
      seq.defined() ? seq.data_ptr<int64_t>() : nullptr, out.data_ptr(), x.size(0), x.size(1),
      x.size(2), static_cast<int>(w.size(1)), silu, current_stream());
  check_launch(err, "causal_conv1d");
  return out;
}

struct CausalConv1dFn : public torch::autograd::Function<CausalConv1dFn> {
  // Optional tensors are passed as std::optional: autograd's Function::apply
  // cannot take undefined at::Tensor arguments. x and weight come first, so
  // their needs_input_grad indices are 0 and 1; bias is 2 when present.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& bias,
                               const std::optional<torch::Tensor>& seq_ids, bool silu) {
    // x is read in place when its rows are evenly strided (a view into the projection).
    auto xc = row_stride(x) >= x.size(-1) ? x : x.contiguous();
    auto wc = weight.contiguous();
    auto bc = bias.has_value() && bias->defined() ? bias->contiguous() : torch::Tensor();
    auto sc = seq_ids.has_value() && seq_ids->defined() ? seq_ids->contiguous() : torch::Tensor();
    auto out = conv_forward(xc, wc, bc, sc, silu);
    ctx->save_for_backward({xc, wc, bc, sc});
    ctx->saved_data["silu"] = silu;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w = saved[1];
    const auto& b = saved[2];
    const auto& seq = saved[3];
    const bool silu = ctx->saved_data["silu"].toBool();
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_b = b.defined() && ctx->needs_input_grad(2);
    variable_list result(5);  // x, weight, bias, seq_ids, silu
    if (!grads[0].defined() || !(need_x || need_w || need_b)) return result;

    c10::cuda::CUDAGuard guard(x.device());
    auto dout = grads[0].to(x.scalar_type()).contiguous();
    const int64_t C = x.size(2), K = w.size(1);
    const auto f32 = x.options().dtype(torch::kFloat32);
    torch::Tensor dx = need_x ? torch::empty(x.sizes(), x.options()) : torch::Tensor();
    torch::Tensor dw = need_w ? torch::zeros({C, K}, f32) : torch::Tensor();
    torch::Tensor db = need_b ? torch::zeros({C}, f32) : torch::Tensor();
    const auto err = kc::causal_conv1d_bwd(
        dtype_of(x), dout.data_ptr(), x.data_ptr(), row_stride(x), w.data_ptr(), ptr_or_null(b),
        seq.defined() ? seq.data_ptr<int64_t>() : nullptr, need_x ? dx.data_ptr() : nullptr,
        need_w ? dw.data_ptr<float>() : nullptr, need_b ? db.data_ptr<float>() : nullptr,
        x.size(0), x.size(1), C, static_cast<int>(K), silu, current_stream());
    check_launch(err, "causal_conv1d backward");
    result[0] = dx;
    if (need_w) result[1] = dw.to(w.scalar_type());
    if (need_b) result[2] = db.to(b.scalar_type());
    return result;
  }
};

// ---- gated RMSNorm --------------------------------------------------------------


struct GatedRmsNormFn : public torch::autograd::Function<GatedRmsNormFn> {
  // Arguments ordered (y, weight, z) so that needs_input_grad indices are
  // y: 0, weight: 1, z: 2 (z is an optional, absent from the edges when unset).
  // The output has weight's dtype; y is either of that dtype or float32.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& y,
                               const torch::Tensor& weight, const std::optional<torch::Tensor>& z,
                               double eps) {
    auto yc = y.contiguous();
    // z is read in place when its rows are evenly strided (a view into the projection).
    auto zc = z.has_value() && z->defined() ? (row_stride(*z) >= z->size(-1) ? *z : z->contiguous())
                                            : torch::Tensor();
    const int64_t z_ld = zc.defined() ? row_stride(zc) : 0;
    auto wc = weight.contiguous();
    const int64_t D = yc.size(-1), R = yc.numel() / D;
    const bool y_f32 = yc.scalar_type() != wc.scalar_type();

    c10::cuda::CUDAGuard guard(yc.device());
    auto out = torch::empty(yc.sizes(), yc.options().dtype(wc.scalar_type()));
    auto rstd = torch::empty({R}, yc.options().dtype(torch::kFloat32));
    const auto err = kc::gated_rms_norm_fwd(dtype_of(wc), y_f32, yc.data_ptr(), ptr_or_null(zc), z_ld,
                                            wc.data_ptr(), out.data_ptr(), rstd.data_ptr<float>(),
                                            R, D, static_cast<float>(eps), current_stream());
    check_launch(err, "gated_rms_norm");
    ctx->save_for_backward({yc, zc, wc, rstd});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& y = saved[0];
    const auto& z = saved[1];
    const auto& w = saved[2];
    const auto& rstd = saved[3];
    const bool need_y = ctx->needs_input_grad(0);
    const bool need_w = ctx->needs_input_grad(1);
    const bool need_z = z.defined() && ctx->needs_input_grad(2);
    variable_list result(4);  // y, weight, z, eps
    if (!grads[0].defined() || !(need_y || need_z || need_w)) return result;

    c10::cuda::CUDAGuard guard(y.device());
    auto dout = grads[0].to(w.scalar_type()).contiguous();
    const int64_t D = y.size(-1), R = y.numel() / D;
    const bool y_f32 = y.scalar_type() != w.scalar_type();
    torch::Tensor dy = need_y ? torch::empty_like(y) : torch::Tensor();
    torch::Tensor dz = need_z ? torch::empty(z.sizes(), z.options()) : torch::Tensor();
    const int64_t z_ld = z.defined() ? row_stride(z) : 0;
    torch::Tensor dw =
        need_w ? torch::zeros({D}, y.options().dtype(torch::kFloat32)) : torch::Tensor();
    const auto err = kc::gated_rms_norm_bwd(
        dtype_of(w), y_f32, dout.data_ptr(), y.data_ptr(), ptr_or_null(z), z_ld, w.data_ptr(),
        rstd.data_ptr<float>(), need_y ? dy.data_ptr() : nullptr, need_z ? dz.data_ptr() : nullptr,
        need_w ? dw.data_ptr<float>() : nullptr, R, D, current_stream());
    check_launch(err, "gated_rms_norm backward");
    result[0] = dy;
    if (need_w) result[1] = dw.to(w.scalar_type());
    result[2] = dz;
    return result;
  }
};

// ---- gated MLP activation ---------------------------------------------------------

struct SiluMulFn : public torch::autograd::Function<SiluMulFn> {
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& gu) {
    auto g = gu.contiguous();
    const int64_t I = g.size(-1) / 2, R = g.numel() / g.size(-1);
    auto sizes = g.sizes().vec();
    sizes.back() = I;
    c10::cuda::CUDAGuard guard(g.device());
    auto out = torch::empty(sizes, g.options());
    check_launch(kc::silu_mul_fwd(dtype_of(g), g.data_ptr(), out.data_ptr(), R, I, current_stream()),
                 "silu_mul");
    ctx->save_for_backward({g});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = ctx->get_saved_variables()[0];
    if (!grads[0].defined()) return {torch::Tensor()};
    const int64_t I = g.size(-1) / 2, R = g.numel() / g.size(-1);
    c10::cuda::CUDAGuard guard(g.device());
    auto dout = grads[0].to(g.scalar_type()).contiguous();
    auto dg = torch::empty_like(g);
    check_launch(kc::silu_mul_bwd(dtype_of(g), dout.data_ptr(), g.data_ptr(), dg.data_ptr(), R, I,
                                  current_stream()),
                 "silu_mul backward");
    return {dg};
  }
};

}  // namespace

torch::Tensor silu_mul(const torch::Tensor& gu) {
  const bool supported = gu.is_cuda() && gu.dim() >= 1 && gu.numel() > 0 &&
                         gu.size(-1) % 2 == 0 && kernel_dtype(gu.scalar_type()).has_value();
  if (!supported) return reference::silu_mul(gu);
  return SiluMulFn::apply(gu);
}

torch::Tensor causal_conv1d(const torch::Tensor& x, const torch::Tensor& weight,
                            const torch::Tensor& bias, const torch::Tensor& seq_ids, bool silu) {
  TORCH_CHECK(x.dim() == 3, "causal_conv1d: x must be [B,T,C], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(2),
              "causal_conv1d: weight must be [C,K] with C=", x.size(2), ", got ", weight.sizes());
  const int64_t K = weight.size(1);
  const bool supported = x.is_cuda() && kernel_dtype(x.scalar_type()).has_value() &&
                         weight.scalar_type() == x.scalar_type() && K >= 2 && K <= 4 &&
                         x.numel() > 0;
  if (!supported) return reference::causal_conv1d(x, weight, bias, seq_ids, silu);

  const char* op = "causal_conv1d";
  check_device(weight, x.device(), op, "weight");
  check_device(bias, x.device(), op, "bias");
  check_device(seq_ids, x.device(), op, "seq_ids");
  if (bias.defined())
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == x.size(2), "causal_conv1d: bias must be [C] with C=",
                x.size(2), ", got ", bias.sizes());
  if (seq_ids.defined())
    TORCH_CHECK(seq_ids.sizes() == x.sizes().slice(0, 2), "causal_conv1d: seq_ids must be [B,T]=[",
                x.size(0), ",", x.size(1), "], got ", seq_ids.sizes());
  // Outside the Function so autograd sees the bias cast (the reference casts
  // the bias to x's dtype as well).
  auto b = bias.defined() && bias.scalar_type() != x.scalar_type() ? bias.to(x.scalar_type()) : bias;
  auto s = seq_ids.defined() ? seq_ids.to(torch::kInt64) : seq_ids;
  std::optional<torch::Tensor> b_opt, s_opt;
  if (b.defined()) b_opt = b;
  if (s.defined()) s_opt = s;
  return CausalConv1dFn::apply(x, weight, b_opt, s_opt, silu);
}

torch::Tensor gated_rms_norm(const torch::Tensor& y, const torch::Tensor& z,
                             const torch::Tensor& weight, double eps,
                             std::optional<torch::ScalarType> out_dtype) {
  // Two supported layouts: everything in one dtype (out too), or a float32 y with z,
  // weight and the requested output in one 16-bit dtype (the float32 result rounded once).
  const auto wt = weight.scalar_type();
  const bool same = y.scalar_type() == wt && (!out_dtype || *out_dtype == wt);
  const bool mixed = y.scalar_type() == torch::kFloat32 && wt != torch::kFloat32 &&
                     out_dtype && *out_dtype == wt;
  const bool supported =
      y.is_cuda() && y.dim() >= 1 && kernel_dtype(wt).has_value() && (same || mixed) &&
      y.numel() > 0 && y.size(-1) >= 1 && y.size(-1) <= kMaxNormDim && weight.dim() == 1 &&
      weight.size(0) == y.size(-1) && (!z.defined() || (z.sizes() == y.sizes() && z.scalar_type() == wt));
  if (!supported) return reference::gated_rms_norm(y, z, weight, eps, out_dtype);

  const char* op = "gated_rms_norm";
  check_device(z, y.device(), op, "z");
  check_device(weight, y.device(), op, "weight");
  std::optional<torch::Tensor> z_opt;
  if (z.defined()) z_opt = z;
  return GatedRmsNormFn::apply(y, weight, z_opt, eps);
}

torch::Tensor causal_conv1d_step(torch::Tensor& conv_state, const torch::Tensor& x_t,
                                 const torch::Tensor& weight, const torch::Tensor& bias,
                                 bool silu) {
  TORCH_CHECK(conv_state.dim() == 3, "causal_conv1d_step: conv_state must be [B,C,K], got ",
              conv_state.sizes());
  const int64_t Bsz = conv_state.size(0), C = conv_state.size(1), K = conv_state.size(2);
  const auto st = conv_state.scalar_type();
  const bool supported =
      conv_state.is_cuda() && kernel_dtype(st).has_value() && weight.scalar_type() == st &&
      (!bias.defined() || bias.scalar_type() == st) && K >= 2 && K <= 4 &&
      conv_state.numel() > 0 && !needs_grad({&conv_state, &x_t, &weight, &bias});
  if (!supported) return reference::causal_conv1d_step(conv_state, x_t, weight, bias, silu);

  const char* op = "causal_conv1d_step";
  const auto dev = conv_state.device();
  check_device(x_t, dev, op, "x_t");
  check_device(weight, dev, op, "weight");
  check_device(bias, dev, op, "bias");
  TORCH_CHECK(x_t.dim() == 2 && x_t.size(0) == Bsz && x_t.size(1) == C,
              "causal_conv1d_step: x_t must be [B,C]=[", Bsz, ",", C, "], got ", x_t.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == C && weight.size(1) == K,
              "causal_conv1d_step: weight must be [C,K]=[", C, ",", K, "], got ", weight.sizes());
  if (bias.defined())
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "causal_conv1d_step: bias must be [C]=[", C,
                "], got ", bias.sizes());

  c10::cuda::CUDAGuard guard(dev);
  const bool in_place = conv_state.is_contiguous();
  torch::Tensor state = in_place ? conv_state : conv_state.contiguous();
  auto x = x_t.to(st).contiguous();  // the reference casts x_t to the state's dtype
  auto w = weight.contiguous();
  auto b = bias.defined() ? bias.contiguous() : bias;
  auto out = torch::empty({Bsz, C}, state.options());
  const auto err = kc::causal_conv1d_step(dtype_of(state), state.data_ptr(), x.data_ptr(),
                                          w.data_ptr(), ptr_or_null(b), out.data_ptr(), Bsz, C,
                                          static_cast<int>(K), silu, current_stream());
  check_launch(err, "causal_conv1d_step");
  if (!in_place) conv_state = state;
  return out;
}

}  // namespace peftfw::kernels::cuda_ops
