// LibTorch glue for the Mamba-1 selective scan's CUDA kernels (scan_fwd.cu, scan_bwd.cu,
// scan_step.cu): argument checks, dtype and layout handling, the autograd Function that runs
// the CUDA backward, and the fallback to the reference for what the kernels do not cover.
#include "scan_cuda.hpp"

#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include <array>
#include <optional>

#include "../../common/cuda/glue.hpp"
#include "peftfw/kernels/check_launch.hpp"
#include "scan.hpp"

namespace peftfw::kernels::mamba1::cuda_ops {
namespace {

namespace kc = ::peftfw::kernels::mamba1::cuda;
using namespace ::peftfw::kernels::glue;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor f32c(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 && t.is_contiguous() ? t : t.to(torch::kFloat32).contiguous();
}

torch::Tensor opt(const std::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : torch::Tensor();
}

// The forward's arguments, in order (the backward returns one gradient per argument).
enum Arg { kU, kDelta, kALog, kB, kC, kD, kZ, kInit, kSeq, kGrad, kNumArgs };
constexpr std::array<const char*, kNumArgs> kArgNames = {"u", "delta", "A_log", "B", "C", "D", "z", "init", "seq", "grad"};

struct ScanFn : public torch::autograd::Function<ScanFn> {
  // Optional tensors are std::optional (Function::apply takes no undefined at::Tensor). seq_ids
  // is int32 and contiguous (made so by the caller) and gets no gradient. `grad`: whether grad
  // mode was on at the call (forward itself runs with it off).
  static variable_list forward(AutogradContext* ctx, const torch::Tensor& u_in, const torch::Tensor& delta_in,
                               const torch::Tensor& A_log, const torch::Tensor& B_in, const torch::Tensor& C_in,
                               const std::optional<torch::Tensor>& D_opt, const std::optional<torch::Tensor>& z_opt,
                               const std::optional<torch::Tensor>& init_opt,
                               const std::optional<torch::Tensor>& seq_opt, bool grad) {
    const torch::Tensor D = opt(D_opt), z_in = opt(z_opt), init = opt(init_opt), seq = opt(seq_opt);
    c10::cuda::CUDAGuard guard(u_in.device());
    auto u = u_in.contiguous(), delta = delta_in.contiguous(), Bm = B_in.contiguous(), Cm = C_in.contiguous();
    auto z = z_in.defined() ? z_in.contiguous() : torch::Tensor();
    auto A32 = f32c(A_log), D32 = D.defined() ? f32c(D) : torch::Tensor();
    auto init32 = init.defined() ? f32c(init) : torch::Tensor();
    const int64_t Bsz = u.size(0), T = u.size(1), Dm = u.size(2), N = A32.size(1);

    // The autograd inputs (tensors only, absent optionals skipped) index needs_input_grad.
    std::array<int64_t, kNumArgs> var{};
    int64_t next = 0;
    bool any_grad = false;  // whether autograd records this call (then chunk_states are kept)
    const std::array<const torch::Tensor*, kGrad> args = {&u_in, &delta_in, &A_log, &B_in, &C_in, &D, &z_in, &init, &seq};
    for (int i = 0; i < kGrad; ++i) {
      var[i] = args[i]->defined() ? next++ : -1;
      if (grad && i != kSeq && args[i]->defined() && args[i]->requires_grad()) any_grad = true;
    }
    for (int i = 0; i < kGrad; ++i) ctx->saved_data[std::string("var_") + kArgNames[i]] = var[i];

    const auto f32 = u.options().dtype(torch::kFloat32);
    auto y = torch::empty({Bsz, T, Dm}, f32);
    auto final_state = torch::empty({Bsz, Dm, N}, f32);
    torch::Tensor chunk_states =
        any_grad ? torch::empty({Bsz, kc::scan_chunks(T), Dm, N}, f32) : torch::Tensor();
    auto ws = torch::empty({kc::scan_workspace_floats(Bsz, T, Dm, N)}, f32);
    kc::ScanProblem p;
    p.batch = Bsz, p.seqlen = T, p.dim = Dm, p.state = N;
    p.u = u.data_ptr(), p.delta = delta.data_ptr(), p.z = ptr_or_null(z), p.B = Bm.data_ptr(), p.C = Cm.data_ptr();
    p.A_log = A32.data_ptr<float>();
    p.D = D32.defined() ? D32.data_ptr<float>() : nullptr;
    p.initial_state = init32.defined() ? init32.data_ptr<float>() : nullptr;
    p.seq_ids = seq.defined() ? seq.data_ptr<int32_t>() : nullptr;
    p.chunk_states = chunk_states.defined() ? chunk_states.data_ptr<float>() : nullptr;
    p.workspace = ws.numel() > 0 ? ws.data_ptr<float>() : nullptr;
    p.y = y.data_ptr<float>();
    p.final_state = final_state.data_ptr<float>();
    check_launch(kc::selective_scan_fwd(dtype_of(u), p, current_stream()), "selective_scan (CUDA kernel)");

    if (any_grad) {
      ctx->save_for_backward({u, delta, z, Bm, Cm, A32, D32, init32, seq, chunk_states});
      ctx->saved_data["A_log_dtype"] = static_cast<int64_t>(A_log.scalar_type());
      ctx->saved_data["D_dtype"] = static_cast<int64_t>(D.defined() ? D.scalar_type() : torch::kFloat32);
      ctx->saved_data["init_dtype"] = static_cast<int64_t>(init.defined() ? init.scalar_type() : torch::kFloat32);
    }
    return {y, final_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(kNumArgs);
    const auto saved = ctx->get_saved_variables();
    if (saved.empty() || (!grads[0].defined() && !grads[1].defined())) return result;
    const torch::Tensor &u = saved[0], &delta = saved[1], &z = saved[2], &Bm = saved[3], &Cm = saved[4],
                        &A32 = saved[5], &D32 = saved[6], &init32 = saved[7], &seq = saved[8], &cs = saved[9];
    auto need = [&](Arg i) {
      const int64_t v = ctx->saved_data[std::string("var_") + kArgNames[i]].toInt();
      return v >= 0 && ctx->needs_input_grad(static_cast<size_t>(v));
    };
    c10::cuda::CUDAGuard guard(u.device());
    const int64_t Bsz = u.size(0), T = u.size(1), Dm = u.size(2), N = A32.size(1);
    const auto f32 = u.options().dtype(torch::kFloat32);
    auto dy = grads[0].defined() ? f32c(grads[0]) : torch::zeros({Bsz, T, Dm}, f32);
    auto dfinal = grads[1].defined() ? f32c(grads[1]) : torch::Tensor();
    auto maybe = [&](bool on, torch::IntArrayRef sizes, const torch::TensorOptions& o, bool zero) {
      if (!on) return torch::Tensor();
      return zero ? torch::zeros(sizes, o) : torch::empty(sizes, o);
    };
    auto du = maybe(need(kU), {Bsz, T, Dm}, u.options(), false);
    auto ddelta = maybe(need(kDelta), {Bsz, T, Dm}, u.options(), false);
    auto dz = maybe(z.defined() && need(kZ), {Bsz, T, Dm}, u.options(), false);
    auto dA = maybe(need(kALog), {Dm, N}, f32, true);
    auto dB = maybe(need(kB), {Bsz, T, N}, f32, true);
    auto dC = maybe(need(kC), {Bsz, T, N}, f32, true);
    auto dD = maybe(D32.defined() && need(kD), {Dm}, f32, true);
    auto dinit = maybe(init32.defined() && need(kInit), {Bsz, Dm, N}, f32, false);
    if (!(du.defined() || ddelta.defined() || dz.defined() || dA.defined() || dB.defined() || dC.defined() ||
          dD.defined() || dinit.defined()))
      return result;
    auto ws = torch::empty({kc::scan_workspace_floats(Bsz, T, Dm, N)}, f32);
    kc::ScanProblem p;
    p.batch = Bsz, p.seqlen = T, p.dim = Dm, p.state = N;
    p.u = u.data_ptr(), p.delta = delta.data_ptr(), p.z = ptr_or_null(z), p.B = Bm.data_ptr(), p.C = Cm.data_ptr();
    p.A_log = A32.data_ptr<float>();
    p.D = D32.defined() ? D32.data_ptr<float>() : nullptr;
    p.initial_state = init32.defined() ? init32.data_ptr<float>() : nullptr;
    p.seq_ids = seq.defined() ? seq.data_ptr<int32_t>() : nullptr;
    p.chunk_states = cs.data_ptr<float>();
    p.workspace = ws.numel() > 0 ? ws.data_ptr<float>() : nullptr;
    p.dy = dy.data_ptr<float>();
    p.dfinal = dfinal.defined() ? dfinal.data_ptr<float>() : nullptr;
    auto fp = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
    p.du = du.defined() ? du.data_ptr() : nullptr;
    p.ddelta = ddelta.defined() ? ddelta.data_ptr() : nullptr;
    p.dz = dz.defined() ? dz.data_ptr() : nullptr;
    p.dA_log = fp(dA), p.dB = fp(dB), p.dC = fp(dC), p.dD = fp(dD), p.dinitial_state = fp(dinit);
    check_launch(kc::selective_scan_bwd(dtype_of(u), p, current_stream()), "selective_scan backward (CUDA kernel)");

    auto dtype = [&](const char* key) { return static_cast<torch::ScalarType>(ctx->saved_data[key].toInt()); };
    result[kU] = du;
    result[kDelta] = ddelta;
    result[kZ] = dz;
    if (dA.defined()) result[kALog] = dA.to(dtype("A_log_dtype"));
    if (dB.defined()) result[kB] = dB.to(Bm.scalar_type());
    if (dC.defined()) result[kC] = dC.to(Cm.scalar_type());
    if (dD.defined()) result[kD] = dD.to(dtype("D_dtype"));
    if (dinit.defined()) result[kInit] = dinit.to(dtype("init_dtype"));
    return result;
  }
};

void check_scan(const ScanArgs& a) {
  const char* op = "selective_scan";
  TORCH_CHECK(a.u.defined() && a.u.dim() == 3, "selective_scan: u must be [B,T,D], got ",
              a.u.defined() ? a.u.sizes() : torch::IntArrayRef{});
  const int64_t Bsz = a.u.size(0), T = a.u.size(1), D = a.u.size(2);
  TORCH_CHECK(a.delta.defined() && a.delta.sizes() == a.u.sizes(), "selective_scan: delta must match u ", a.u.sizes());
  TORCH_CHECK(a.A_log.defined() && a.A_log.dim() == 2 && a.A_log.size(0) == D, "selective_scan: A_log must be [", D,
              ",N]");
  const int64_t N = a.A_log.size(1);
  for (const auto* t : {&a.B, &a.C})
    TORCH_CHECK(t->defined() && t->dim() == 3 && t->size(0) == Bsz && t->size(1) == T && t->size(2) == N,
                "selective_scan: B and C must be [", Bsz, ",", T, ",", N, "]");
  TORCH_CHECK(!a.D.defined() || (a.D.dim() == 1 && a.D.size(0) == D), "selective_scan: D must be [", D, "]");
  TORCH_CHECK(!a.z.defined() || a.z.sizes() == a.u.sizes(), "selective_scan: z must match u");
  TORCH_CHECK(!a.initial_state.defined() || a.initial_state.sizes() == torch::IntArrayRef({Bsz, D, N}),
              "selective_scan: initial_state must be [", Bsz, ",", D, ",", N, "]");
  TORCH_CHECK(!a.seq_ids.defined() || a.seq_ids.sizes() == torch::IntArrayRef({Bsz, T}),
              "selective_scan: seq_ids must be [", Bsz, ",", T, "]");
  const auto dev = a.u.device();
  check_device(a.delta, dev, op, "delta");
  check_device(a.A_log, dev, op, "A_log");
  check_device(a.B, dev, op, "B");
  check_device(a.C, dev, op, "C");
  check_device(a.D, dev, op, "D");
  check_device(a.z, dev, op, "z");
  check_device(a.initial_state, dev, op, "initial_state");
  check_device(a.seq_ids, dev, op, "seq_ids");
}

}  // namespace

ScanResult selective_scan(const ScanArgs& a) {
  if (!a.u.defined() || !a.u.is_cuda() || a.u.dim() != 3) return reference::selective_scan(a);
  check_scan(a);
  const auto st = a.u.scalar_type();
  auto same = [&](const torch::Tensor& t) { return !t.defined() || t.scalar_type() == st; };
  const bool supported =
      kernel_dtype(st).has_value() && same(a.delta) && same(a.B) && same(a.C) && same(a.z) &&
      at::isFloatingType(a.A_log.scalar_type()) && (!a.D.defined() || at::isFloatingType(a.D.scalar_type())) &&
      (!a.initial_state.defined() || at::isFloatingType(a.initial_state.scalar_type())) &&
      (!a.seq_ids.defined() || at::isIntegralType(a.seq_ids.scalar_type(), /*includeBool=*/false)) &&
      cuda::scan_supported(a.u.size(0), a.u.size(1), a.u.size(2), a.A_log.size(1));
  if (!supported) return reference::selective_scan(a);

  auto some = [](const torch::Tensor& t) {
    std::optional<torch::Tensor> o;
    if (t.defined()) o = t;
    return o;
  };
  torch::Tensor seq = a.seq_ids.defined() ? a.seq_ids.to(torch::kInt32).contiguous() : torch::Tensor();
  auto out = ScanFn::apply(a.u, a.delta, a.A_log, a.B, a.C, some(a.D), some(a.z), some(a.initial_state), some(seq),
                           torch::GradMode::is_enabled());
  return {out[0], out[1]};
}

torch::Tensor selective_scan_step(StepArgs& a) {
  const bool shaped = a.u.defined() && a.u.dim() == 2 && a.A_log.defined() && a.A_log.dim() == 2 &&
                      a.B.defined() && a.B.dim() == 2 && a.state.defined() && a.state.dim() == 3;
  if (!shaped || !a.u.is_cuda()) return reference::selective_scan_step(a);
  const auto st = a.u.scalar_type();
  auto same = [&](const torch::Tensor& t) { return !t.defined() || t.scalar_type() == st; };
  const int64_t Bsz = a.u.size(0), Dm = a.u.size(1), N = a.A_log.size(1);
  const bool supported = kernel_dtype(st).has_value() && same(a.delta) && same(a.B) && same(a.C) && same(a.z) &&
                         at::isFloatingType(a.A_log.scalar_type()) &&
                         (!a.D.defined() || at::isFloatingType(a.D.scalar_type())) && a.u.numel() > 0 &&
                         !needs_grad({&a.state, &a.u, &a.delta, &a.A_log, &a.B, &a.C, &a.D, &a.z});
  if (!supported) return reference::selective_scan_step(a);

  const char* op = "selective_scan_step";
  const auto dev = a.u.device();
  check_device(a.state, dev, op, "state");
  check_device(a.delta, dev, op, "delta");
  check_device(a.A_log, dev, op, "A_log");
  check_device(a.B, dev, op, "B");
  check_device(a.C, dev, op, "C");
  check_device(a.D, dev, op, "D");
  check_device(a.z, dev, op, "z");
  TORCH_CHECK(a.state.sizes() == torch::IntArrayRef({Bsz, Dm, N}), "selective_scan_step: state must be [", Bsz, ",",
              Dm, ",", N, "], got ", a.state.sizes());
  TORCH_CHECK(a.delta.defined() && a.delta.sizes() == a.u.sizes(), "selective_scan_step: delta must match u ",
              a.u.sizes());
  TORCH_CHECK(a.A_log.size(0) == Dm, "selective_scan_step: A_log must be [", Dm, ",", N, "], got ", a.A_log.sizes());
  for (const auto* t : {&a.B, &a.C})
    TORCH_CHECK(t->defined() && t->sizes() == torch::IntArrayRef({Bsz, N}), "selective_scan_step: B and C must be [",
                Bsz, ",", N, "]");
  TORCH_CHECK(!a.D.defined() || (a.D.dim() == 1 && a.D.size(0) == Dm), "selective_scan_step: D must be [", Dm, "]");
  TORCH_CHECK(!a.z.defined() || a.z.sizes() == a.u.sizes(), "selective_scan_step: z must match u");

  c10::cuda::CUDAGuard guard(dev);
  const bool in_place = a.state.scalar_type() == torch::kFloat32 && a.state.is_contiguous();
  torch::Tensor state = in_place ? a.state : a.state.to(torch::kFloat32).contiguous();
  auto u = a.u.contiguous(), delta = a.delta.contiguous(), Bm = a.B.contiguous(), Cm = a.C.contiguous();
  auto z = a.z.defined() ? a.z.contiguous() : torch::Tensor();
  auto A32 = f32c(a.A_log);
  auto D32 = a.D.defined() ? f32c(a.D) : torch::Tensor();
  auto y = torch::empty({Bsz, Dm}, u.options().dtype(torch::kFloat32));
  check_launch(kc::selective_scan_step(dtype_of(u), state.data_ptr<float>(), u.data_ptr(), delta.data_ptr(),
                                       ptr_or_null(z), A32.data_ptr<float>(), Bm.data_ptr(), Cm.data_ptr(),
                                       D32.defined() ? D32.data_ptr<float>() : nullptr, y.data_ptr<float>(), Bsz, Dm,
                                       N, current_stream()),
               "selective_scan_step (CUDA kernel)");
  if (!in_place) a.state = state;
  return y;
}

}  // namespace peftfw::kernels::mamba1::cuda_ops
