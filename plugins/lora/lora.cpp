// LoRA / DoRA math, following HF PEFT's tuners/lora/layer.py (Linear) and
// tuners/lora/dora.py (DoraLinearLayer) so that adapters trained here load
// into PEFT with the same outputs and vice versa.
#include "lora.hpp"

#include <cmath>

#include "peftfw/kernels/lora_down.hpp"
#include "peftfw/nn/checkpoint.hpp"

namespace peftfw::lora {

namespace F = torch::nn::functional;

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_16bit(torch::ScalarType t) { return t == torch::kBFloat16 || t == torch::kHalf; }

// A frozen 16-bit linear with its LoRA branch in one autograd node:
//   out = x W^T (+ bias) + (drop(x) A^T) (s B)^T
// The branch joins the base product inside cuBLAS (no [M, out] temporary, no separate
// add), and the backward writes dx = dy W + drop'(dy (s B) A) with a beta = 1 GEMM. W and
// the bias get no gradient. A and B are float32 parameters used in the model's dtype (as
// the unfused path does), so their gradients arrive in float32.
struct LoraLinearFn : public torch::autograd::Function<LoraLinearFn> {
  // grad: whether a backward can follow (false in a checkpointed layer's first run, or in
  // evaluation), so that nothing is kept for it.
  static torch::Tensor forward(AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& A,
                               const torch::Tensor& B, const torch::Tensor& weight,
                               const std::optional<torch::Tensor>& bias, double scaling,
                               double dropout, bool grad) {
    const auto dt = x.scalar_type();
    const int64_t K = weight.size(1), N = weight.size(0);
    auto x2 = x.reshape({-1, K});
    auto a = A.to(dt);
    auto bs = (B * scaling).to(dt);
    const int64_t M = x2.size(0), r = a.size(0);
    const bool wide = N > K;
    // The output may be kept from a checkpoint's first run (nn/checkpoint.hpp): a narrow one
    // by shape, another within the budget. The rerun then only redoes the dropout and h,
    // which the backward needs (without [x | h]).
    const bool keepable = nn::may_keep(K, N);
    torch::Tensor out;
    if (keepable) out = nn::take_kept_output(M, N);
    const bool concat = wide && !out.defined();  // the K-concatenated GEMM runs
    // The down projection: one CUDA pass over x with a counter-based mask (the backward
    // redraws it), else LibTorch's dropout (a stored byte mask) and a GEMM.
    // (the same choice in a checkpoint's two runs, whether or not the output was kept)
    const bool kernel = (dropout > 0.0 || wide) && kernels::lora_down_kernel_applies(x2, a);
    kernels::DropMask drawn;
    torch::Tensor xd = x2, mask, h, xh;
    if (concat) xh = torch::empty({M, K + r}, x2.options());
    if (kernel) {
      drawn = kernels::draw_drop_mask(x2.device(), dropout);
      if (grad && dropout > 0.0) xd = torch::empty_like(x2);
      h = concat ? xh.narrow(1, K, r) : torch::empty({M, r}, x2.options());
      kernels::lora_down(x2, a, drawn, h, concat ? xh.narrow(1, 0, K) : torch::Tensor(),
                         grad && dropout > 0.0 ? xd : torch::Tensor());
    } else {
      if (dropout > 0.0) std::tie(xd, mask) = at::native_dropout(x2, dropout, true);
      h = torch::mm(xd, a.t());  // [M, r]
      if (concat) {
        xh.narrow(1, 0, K).copy_(x2);
        xh.narrow(1, K, r).copy_(h);
      }
    }
    const bool has_bias = bias && bias->defined();
    if (concat) {
      // Wide output: the branch rides along the base GEMM's reduction, [x | h] [W | s B]^T,
      // which costs a copy of x instead of a read and a write of the wider output.
      auto wb = torch::cat({weight, bs}, 1);  // [N, K + r]
      out = has_bias ? torch::addmm(*bias, xh, wb.t()) : torch::mm(xh, wb.t());
      if (grad && kernel) h = h.clone();  // the backward needs h, not all of [x | h]
      if (keepable) nn::keep_projection_output(K, N, out);
    } else if (!out.defined()) {
      out = has_bias ? torch::addmm(*bias, x2, weight.t()) : torch::mm(x2, weight.t());
      out.addmm_(h, bs.t());
      if (keepable) nn::keep_projection_output(K, N, out);
    }
    if (grad) {
      ctx->save_for_backward({xd, mask.defined() ? mask : torch::Tensor(), h, a, bs, weight});
      ctx->saved_data["dropout"] = dropout;
      ctx->saved_data["scaling"] = scaling;
      ctx->saved_data["redraw"] = kernel && dropout > 0.0;
      ctx->saved_data["seed"] = static_cast<int64_t>(drawn.seed);
      ctx->saved_data["offset"] = static_cast<int64_t>(drawn.offset);
    }
    auto sizes = x.sizes().vec();
    sizes.back() = N;
    return out.view(sizes);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    TORCH_CHECK(saved.size() == 6, "LoRA: backward through a forward run without gradients");
    const auto &xd = saved[0], &mask = saved[1], &h = saved[2], &a = saved[3], &bs = saved[4],
               &weight = saved[5];
    const double dropout = ctx->saved_data["dropout"].toDouble();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    variable_list result(8);
    if (!grads[0].defined()) return result;
    const int64_t N = weight.size(0), K = weight.size(1);
    auto dy = grads[0].reshape({-1, N}).to(xd.scalar_type());
    auto dh = torch::mm(dy, bs);  // [M, r]
    if (ctx->needs_input_grad(1)) result[1] = torch::mm(dh.t(), xd).to(torch::kFloat32);
    if (ctx->needs_input_grad(2)) result[2] = torch::mm(dy.t(), h).to(torch::kFloat32) * scaling;
    if (ctx->needs_input_grad(0)) {
      auto dx = torch::mm(dh, a);  // [M, K]
      if (ctx->saved_data["redraw"].toBool()) {
        kernels::DropMask m{dropout, static_cast<uint64_t>(ctx->saved_data["seed"].toInt()),
                            static_cast<uint64_t>(ctx->saved_data["offset"].toInt())};
        kernels::dropout_backward_(dx, m);
      } else if (mask.defined()) {
        dx = at::native_dropout_backward(dx, mask, 1.0 / (1.0 - dropout));
      }
      dx.addmm_(dy, weight);
      auto sizes = grads[0].sizes().vec();
      sizes.back() = K;
      result[0] = dx.view(sizes);
    }
    return result;
  }
};

}  // namespace

LoraAdapter::LoraAdapter(const LoraOptions& options, torch::nn::Linear A, torch::nn::Linear B)
    : options_(options),
      scaling_(options.use_rslora ? options.alpha / std::sqrt(static_cast<double>(options.r))
                                  : options.alpha / static_cast<double>(options.r)),
      A_(std::move(A)),
      B_(std::move(B)) {}

std::shared_ptr<LoraAdapter> LoraAdapter::attach(nn::LinearImpl& host, const LoraOptions& options) {
  TORCH_CHECK(!host.adapter(), "module already has an adapter");
  const auto device = host.weight.device();
  auto A = torch::nn::Linear(torch::nn::LinearOptions(host.in_features(), options.r).bias(false));
  auto B = torch::nn::Linear(torch::nn::LinearOptions(options.r, host.out_features()).bias(false));
  {
    torch::NoGradGuard no_grad;
    // PEFT's init: A Kaiming-uniform (a = sqrt(5), as nn.Linear), B zero.
    torch::nn::init::kaiming_uniform_(A->weight, std::sqrt(5.0));
    B->weight.zero_();
  }
  A->to(device, torch::kFloat32);
  B->to(device, torch::kFloat32);
  host.register_module("lora_A", A);
  host.register_module("lora_B", B);
  std::shared_ptr<LoraAdapter> adapter(new LoraAdapter(options, A, B));
  if (options.dora) {
    torch::Tensor magnitude;
    {
      torch::NoGradGuard no_grad;
      magnitude = adapter->weight_norm(host).clone();  // initialised to ||W|| (B = 0)
    }
    adapter->magnitude_ = host.register_parameter("lora_magnitude_vector", magnitude);
  }
  host.set_adapter(adapter);
  return adapter;
}

torch::Tensor LoraAdapter::weight_norm(const nn::LinearImpl& base) const {
  auto w = base.weight.to(torch::kFloat32) + scaling_ * torch::matmul(B_->weight, A_->weight);
  return w.norm(2, /*dim=*/1);
}

torch::Tensor LoraAdapter::forward_from_input(const torch::Tensor& x, const nn::LinearImpl& base) {
  // The fused node covers plain LoRA in a 16-bit model on a frozen base; everything else
  // (DoRA, float32 math, a trainable base) takes the composed path below.
  const auto wt = base.weight.scalar_type();
  const bool fused = !options_.dora && !options_.float32_math && is_16bit(wt) &&
                     x.scalar_type() == wt && !base.weight.requires_grad() &&
                     (!base.bias.defined() ||
                      (!base.bias.requires_grad() && base.bias.scalar_type() == wt && !base.bias_after_product()));
  if (!fused) return forward(x, base.base_forward(x), base);
  const double p = A_->is_training() ? options_.dropout : 0.0;
  std::optional<torch::Tensor> bias;
  if (base.bias.defined()) bias = base.bias;
  return LoraLinearFn::apply(x, A_->weight, B_->weight, base.weight, bias, scaling_, p,
                             torch::GradMode::is_enabled());
}

torch::Tensor LoraAdapter::forward(const torch::Tensor& x, const torch::Tensor& base_out,
                                   const nn::LinearImpl& base) {
  const bool training = A_->is_training();
  const bool drop = training && options_.dropout > 0.0;
  if (!options_.dora && !options_.float32_math && base_out.scalar_type() != torch::kFloat32) {
    // 16-bit model: the adapter's math in the model's dtype (tensor-core GEMMs, half the
    // traffic); the float32 A and B are cast, so their gradients arrive in float32.
    const auto dt = base_out.scalar_type();
    auto xd = x.to(dt);
    if (drop) xd = F::dropout(xd, F::DropoutFuncOptions().p(options_.dropout).training(true));
    auto lora = F::linear(F::linear(xd, A_->weight.to(dt)), (B_->weight * scaling_).to(dt));
    return base_out + lora;
  }
  auto xa = x.to(torch::kFloat32);  // PEFT casts the input to the adapter's dtype
  if (drop) xa = F::dropout(xa, F::DropoutFuncOptions().p(options_.dropout).training(true));
  auto lora = B_(A_(xa));
  if (!options_.dora) return base_out + (lora * scaling_).to(base_out.scalar_type());

  // DoRA: the weight norm is detached (PEFT, following the DoRA paper's section 4.3).
  auto norm = weight_norm(base).detach();
  auto mag_scale = (magnitude_ / norm).view({1, -1});
  torch::Tensor base_result;
  if (drop) {
    base_result = F::linear(xa, base.weight.to(torch::kFloat32));  // dropped-out input, no bias
  } else {
    base_result = base_out.to(torch::kFloat32);
    if (base.bias.defined()) base_result = base_result - base.bias.to(torch::kFloat32);
  }
  auto dora = (mag_scale - 1) * base_result + mag_scale * lora * scaling_;
  return base_out + dora.to(base_out.scalar_type());
}

torch::Tensor LoraAdapter::merged_weight(const nn::LinearImpl& base) const {
  torch::NoGradGuard no_grad;
  auto w = base.weight.to(torch::kFloat32) + scaling_ * torch::matmul(B_->weight, A_->weight);
  if (options_.dora) w = w * (magnitude_ / w.norm(2, 1)).unsqueeze(1);
  return w.to(base.weight.scalar_type());
}

}  // namespace peftfw::lora
