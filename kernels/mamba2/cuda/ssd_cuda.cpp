// LibTorch glue for the SSD's CUDA kernels: registers the fused scan's kernels (ssd_masks.cu,
// ssd_prep.cu, ssd_chunk_*.cu; see ssd_fused.cpp) and runs the decoding step (ssd_step.cu).
#include "ssd_cuda.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include "../../common/cuda/glue.hpp"
#include "peftfw/kernels/check_launch.hpp"
#include "peftfw/kernels/ssd_fused.hpp"
#include "ssd_chunk.hpp"
#include "ssd_masks.hpp"
#include "ssd_prep.hpp"
#include "ssd_step.hpp"

namespace peftfw::kernels::mamba2::cuda_ops {
namespace {

constexpr int64_t kMaxStateDim = 6144;  // ssd_step keeps 2 * N floats in shared memory

int dtype_code(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return 0;
    case torch::kHalf: return 1;
    case torch::kBFloat16: return 2;
    default: TORCH_CHECK(false, "ssd kernels: unsupported dtype ", t, " (expected float32, float16 or bfloat16)");
  }
}

// t as contiguous float32, without a dispatcher call when it already is (the chunk kernels'
// inputs usually are, and these wrappers run several times per step).
torch::Tensor as_f32(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat32 && t.is_contiguous() ? t : t.to(torch::kFloat32).contiguous();
}

torch::Tensor build(const torch::Tensor& CB, const torch::Tensor& cum, const torch::Tensor& seg,
                    int64_t Hg, torch::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(CB.device());
  const int64_t B = CB.size(0), nc = CB.size(1), G = CB.size(2), Lc = CB.size(3);
  auto M = torch::empty({B, nc, G * Hg, Lc, Lc}, CB.options().dtype(dtype));
  check_launch(cuda::ssd_build_decay_cb(dtype_code(dtype), CB.contiguous().data_ptr<float>(),
                                 cum.contiguous().data_ptr<float>(), seg.contiguous().data_ptr<int32_t>(),
                                 M.data_ptr(), B * nc, G, Hg, Lc, at::cuda::getCurrentCUDAStream()),
        "ssd_build_decay_cb");
  return M;
}

std::pair<torch::Tensor, torch::Tensor> backward(const torch::Tensor& dM, const torch::Tensor& CB,
                                                 const torch::Tensor& cum, const torch::Tensor& seg,
                                                 int64_t Hg) {
  c10::cuda::CUDAGuard guard(CB.device());
  const int64_t B = CB.size(0), nc = CB.size(1), G = CB.size(2), Lc = CB.size(3);
  auto dCB = torch::zeros_like(CB);
  auto dcum = torch::empty({B, nc, G * Hg, Lc}, CB.options());
  auto dMc = dM.contiguous();
  check_launch(cuda::ssd_build_decay_cb_backward(
            dtype_code(dMc.scalar_type()), dMc.data_ptr(), CB.contiguous().data_ptr<float>(),
            cum.contiguous().data_ptr<float>(), seg.contiguous().data_ptr<int32_t>(),
            dCB.data_ptr<float>(), dcum.data_ptr<float>(), B * nc, G, Hg, Lc,
            at::cuda::getCurrentCUDAStream()),
        "ssd_build_decay_cb_backward");
  return {dCB, dcum};
}

std::pair<torch::Tensor, torch::Tensor> states(const torch::Tensor& S_in, const torch::Tensor& dec_in,
                                               const torch::Tensor& init_in) {
  c10::cuda::CUDAGuard guard(S_in.device());
  auto S = S_in.contiguous(), dec = as_f32(dec_in);
  const int64_t B = S.size(0), nc = S.size(1), H = S.size(2), PN = S.size(3) * S.size(4);
  auto prev = torch::empty_like(S);
  auto final_state = torch::empty({B, H, S.size(3), S.size(4)}, S.options().dtype(torch::kFloat32));
  torch::Tensor init = init_in.defined() ? as_f32(init_in) : torch::Tensor();
  check_launch(cuda::ssd_state_passing(dtype_code(S.scalar_type()), S.data_ptr(), dec.data_ptr<float>(),
                                init.defined() ? init.data_ptr<float>() : nullptr, prev.data_ptr(),
                                final_state.data_ptr<float>(), B, nc, H, PN, at::cuda::getCurrentCUDAStream()),
        "ssd_state_passing");
  return {prev, final_state};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> states_backward(const torch::Tensor& dH_in,
                                                                        const torch::Tensor& dec_in,
                                                                        const torch::Tensor& dfinal_in,
                                                                        const torch::Tensor& prev_in) {
  c10::cuda::CUDAGuard guard(dH_in.device());
  auto prev = prev_in.contiguous();
  auto dH = dH_in.to(prev.scalar_type()).contiguous(), dec = as_f32(dec_in);
  const int64_t B = prev.size(0), nc = prev.size(1), H = prev.size(2), PN = prev.size(3) * prev.size(4);
  auto dS = torch::empty_like(prev);
  auto ddec = torch::zeros({B, nc, H}, prev.options().dtype(torch::kFloat32));
  auto dinit = torch::empty({B, H, prev.size(3), prev.size(4)}, prev.options().dtype(torch::kFloat32));
  torch::Tensor dfinal = dfinal_in.defined() ? as_f32(dfinal_in) : torch::Tensor();
  check_launch(cuda::ssd_state_passing_backward(dtype_code(prev.scalar_type()), dH.data_ptr(), dec.data_ptr<float>(),
                                         dfinal.defined() ? dfinal.data_ptr<float>() : nullptr, prev.data_ptr(),
                                         dS.data_ptr(), ddec.data_ptr<float>(), dinit.data_ptr<float>(), B, nc, H,
                                         PN, at::cuda::getCurrentCUDAStream()),
        "ssd_state_passing_backward");
  return {dS, ddec, dinit};
}

// A [B,T,K,W] tensor the chunk kernels can read in place: unit stride in W,
// K stride W, 16-byte aligned rows. Anything else is copied.
torch::Tensor rows(const torch::Tensor& t, torch::ScalarType dtype) {
  auto u = t.scalar_type() == dtype ? t : t.to(dtype);
  const int64_t el = u.element_size();
  const bool ok = u.stride(3) == 1 && u.stride(2) == u.size(3) && (u.stride(1) * el) % 16 == 0 &&
                  (u.stride(0) * el) % 16 == 0 && reinterpret_cast<uintptr_t>(u.data_ptr()) % 16 == 0;
  return ok ? u : u.contiguous();
}

struct Chunk {
  torch::Tensor x, B, C, dt, cum, seg, CB, Ld, E, D;
  cuda::SsdChunkDims d;
  int dtype;
};

Chunk chunk_of(const fused::ChunkInputs& in) {
  Chunk k;
  const auto st = in.x.scalar_type();
  k.dtype = dtype_code(st);
  k.x = rows(in.x, st);
  k.B = rows(in.B, st);
  k.C = rows(in.C, st);
  k.dt = as_f32(in.dt);
  k.cum = as_f32(in.cum);
  if (in.CB.defined()) k.CB = as_f32(in.CB);  // undefined where C.B is being computed (chunk_cb)
  k.Ld = as_f32(in.Ld);
  k.E = as_f32(in.E);
  k.seg = in.seg.scalar_type() == torch::kInt32 && in.seg.is_contiguous() ? in.seg : in.seg.to(torch::kInt32).contiguous();
  if (in.D.defined()) k.D = as_f32(in.D);
  k.d = {k.x.size(0), k.x.size(1), k.x.size(2), k.x.size(3), k.B.size(2), k.B.size(3), in.nc,
         k.x.stride(0), k.x.stride(1), k.B.stride(0), k.B.stride(1), k.C.stride(0), k.C.stride(1)};
  return k;
}

const float* ptr_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

bool chunk_supported(const torch::Tensor& x, const torch::Tensor& B) {
  const auto st = x.scalar_type();
  if (st != torch::kBFloat16 && st != torch::kHalf) return false;
  return cuda::ssd_chunk_supported(x.size(3), B.size(3), dtype_code(st));
}

std::pair<torch::Tensor, torch::Tensor> chunk_states_pass(const fused::ChunkInputs& in, const torch::Tensor& dec_in,
                                                          const torch::Tensor& init_in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  auto dec = as_f32(dec_in);
  torch::Tensor init = init_in.defined() ? as_f32(init_in) : torch::Tensor();
  auto prev = torch::empty({k.d.B, k.d.nc, k.d.H, k.d.P, k.d.N}, k.x.options());
  auto final_state = torch::empty({k.d.B, k.d.H, k.d.P, k.d.N}, k.x.options().dtype(torch::kFloat32));
  check_launch(cuda::ssd_chunk_states_pass(k.dtype, k.d, k.x.data_ptr(), k.dt.data_ptr<float>(), k.Ld.data_ptr<float>(),
                                    k.B.data_ptr(), dec.data_ptr<float>(), init.defined() ? init.data_ptr<float>() : nullptr,
                                    prev.data_ptr(), final_state.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "ssd_chunk_states_pass");
  return {prev, final_state};
}

torch::Tensor chunk_scan(const fused::ChunkInputs& in, const torch::Tensor& prev_in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  auto prev = prev_in.to(k.x.scalar_type()).contiguous();
  auto y = torch::empty({k.d.B, k.d.T, k.d.H, k.d.P}, k.x.options().dtype(torch::kFloat32));
  check_launch(cuda::ssd_chunk_scan_fwd(k.dtype, k.d, k.x.data_ptr(), k.dt.data_ptr<float>(), k.cum.data_ptr<float>(),
                                 k.seg.data_ptr<int32_t>(), k.CB.data_ptr<float>(), k.E.data_ptr<float>(),
                                 k.C.data_ptr(), prev.data_ptr(), ptr_or_null(k.D), y.data_ptr<float>(),
                                 at::cuda::getCurrentCUDAStream()),
        "ssd_chunk_scan_fwd");
  return y;
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> chunk_bwd_off(const fused::ChunkInputs& in,
                                                                      const torch::Tensor& dy_in,
                                                                      const torch::Tensor& prev_in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  auto dy = as_f32(dy_in);
  auto prev = prev_in.to(k.x.scalar_type()).contiguous();
  const auto& d = k.d;
  auto dC = torch::zeros({d.B, d.nc, d.G, cuda::kSsdChunk, d.N}, dy.options());
  auto dH_off = torch::empty({d.B, d.nc, d.H, d.P, d.N}, k.x.options());
  auto dcum_E = torch::empty({d.B, d.nc, d.H, cuda::kSsdChunk}, dy.options());
  check_launch(cuda::ssd_chunk_bwd_off(k.dtype, d, dy.data_ptr<float>(), k.E.data_ptr<float>(), k.C.data_ptr(),
                                       prev.data_ptr(), dH_off.data_ptr(), dcum_E.data_ptr<float>(),
                                       dC.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "ssd_chunk_bwd_off");
  return {dC, dH_off, dcum_E};
}

torch::Tensor chunk_cb(const fused::ChunkInputs& in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  const auto& d = k.d;
  auto CB = torch::empty({d.B, d.nc, d.G, cuda::kSsdChunk, cuda::kSsdChunk}, k.dt.options());
  check_launch(cuda::ssd_chunk_cb(k.dtype, d, k.B.data_ptr(), k.C.data_ptr(), CB.data_ptr<float>(),
                                  at::cuda::getCurrentCUDAStream()),
               "ssd_chunk_cb");
  return CB;
}

std::pair<torch::Tensor, torch::Tensor> chunk_cb_bwd(const fused::ChunkInputs& in, const torch::Tensor& dCB,
                                                     const torch::Tensor& dC_off, const torch::Tensor& dB_S) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  const auto& d = k.d;
  auto dB = torch::empty({d.B, d.T, d.G, d.N}, k.x.options());
  auto dC = torch::empty_like(dB);
  auto dCBc = as_f32(dCB), dCo = as_f32(dC_off), dBs = as_f32(dB_S);
  check_launch(cuda::ssd_chunk_cb_bwd(k.dtype, d, k.B.data_ptr(), k.C.data_ptr(), dCBc.data_ptr<float>(),
                                      dCo.data_ptr<float>(), dBs.data_ptr<float>(), dC.data_ptr(), dB.data_ptr(),
                                      at::cuda::getCurrentCUDAStream()),
               "ssd_chunk_cb_bwd");
  return {dB, dC};
}

torch::Tensor chunk_bwd_db(const fused::ChunkInputs& in, const torch::Tensor& dS_in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  auto dS = dS_in.to(k.x.scalar_type()).contiguous();
  const auto& d = k.d;
  auto dB = torch::zeros({d.B, d.nc, d.G, cuda::kSsdChunk, d.N}, k.dt.options());
  check_launch(cuda::ssd_chunk_bwd_db(k.dtype, d, k.x.data_ptr(), k.dt.data_ptr<float>(), k.Ld.data_ptr<float>(),
                                      dS.data_ptr(), dB.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
               "ssd_chunk_bwd_db");
  return dB;
}

fused::ChunkGrads chunk_bwd_diag(const fused::ChunkInputs& in, const torch::Tensor& dy_in,
                                 const torch::Tensor& dS_in) {
  c10::cuda::CUDAGuard guard(in.x.device());
  auto k = chunk_of(in);
  auto dy = as_f32(dy_in);
  auto dS = dS_in.to(k.x.scalar_type()).contiguous();
  const auto& d = k.d;
  const auto f32 = dy.options();
  fused::ChunkGrads gr;
  gr.dx = torch::empty({d.B, d.T, d.H, d.P}, k.x.options());
  gr.ddt_u = torch::empty({d.B, d.nc, d.H, cuda::kSsdChunk}, f32);
  gr.dcum = torch::empty_like(gr.ddt_u);
  gr.dLd = torch::empty_like(gr.ddt_u);
  gr.dCB = torch::zeros({d.B, d.nc, d.G, cuda::kSsdChunk, cuda::kSsdChunk}, f32);
  if (k.D.defined()) gr.dD = torch::zeros({d.H}, f32);
  check_launch(cuda::ssd_chunk_bwd_diag(k.dtype, d, k.x.data_ptr(), k.dt.data_ptr<float>(), k.cum.data_ptr<float>(),
                                 k.seg.data_ptr<int32_t>(), k.CB.data_ptr<float>(), k.Ld.data_ptr<float>(),
                                 k.B.data_ptr(), dy.data_ptr<float>(), dS.data_ptr(), ptr_or_null(k.D),
                                 gr.dx.data_ptr(), gr.ddt_u.data_ptr<float>(),
                                 gr.dcum.data_ptr<float>(), gr.dLd.data_ptr<float>(), gr.dCB.data_ptr<float>(),
                                 gr.dD.defined() ? gr.dD.data_ptr<float>() : nullptr,
                                 at::cuda::getCurrentCUDAStream()),
        "ssd_chunk_bwd_diag");
  return gr;
}

fused::ChunkPrep chunk_prep(const torch::Tensor& dt_in, const torch::Tensor& A_in, const torch::Tensor& seq_in,
                           int64_t nc) {
  c10::cuda::CUDAGuard guard(dt_in.device());
  auto dt = as_f32(dt_in), A = as_f32(A_in);
  const int64_t B = dt.size(0), T = dt.size(1), H = dt.size(2), Lc = cuda::kSsdPrepChunk;
  torch::Tensor seq = seq_in.defined() ? seq_in.to(dt.device(), torch::kInt64).contiguous() : torch::Tensor();
  const auto f32 = dt.options();
  fused::ChunkPrep p;
  p.seg = torch::empty({B, nc, Lc}, f32.dtype(torch::kInt32));
  p.cum = torch::empty({B, nc, H, Lc}, f32);
  p.Ld = torch::empty_like(p.cum);
  p.E = torch::empty_like(p.cum);
  p.dec = torch::empty({B, nc, H}, f32);
  check_launch(cuda::ssd_chunk_prep(dt.data_ptr<float>(), A.data_ptr<float>(), seq.defined() ? seq.data_ptr<int64_t>() : nullptr,
                             B, T, H, nc, p.seg.data_ptr<int32_t>(), p.cum.data_ptr<float>(), p.Ld.data_ptr<float>(),
                             p.E.data_ptr<float>(), p.dec.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
        "ssd_chunk_prep");
  return p;
}

fused::DecayGrads chunk_decay_grad(const torch::Tensor& dcum_E, const torch::Tensor& dcum_diag, const torch::Tensor& dLd,
                                   const torch::Tensor& ddec, const torch::Tensor& dec, const torch::Tensor& ddt_u,
                                   const torch::Tensor& dt_in, const torch::Tensor& A_in) {
  c10::cuda::CUDAGuard guard(dt_in.device());
  auto dt = as_f32(dt_in), A = as_f32(A_in), gE = as_f32(dcum_E), gD = as_f32(dcum_diag), gL = as_f32(dLd),
       dd = as_f32(ddec), de = as_f32(dec), du = as_f32(ddt_u);
  const int64_t B = dt.size(0), T = dt.size(1), H = dt.size(2), nc = gE.size(1);
  fused::DecayGrads g;
  g.ddt = torch::empty({B, T, H}, dt.options());
  auto part = torch::empty({B * nc, H}, dt.options());
  check_launch(cuda::ssd_chunk_decay_grad(gE.data_ptr<float>(), gD.data_ptr<float>(), gL.data_ptr<float>(), dd.data_ptr<float>(),
                                   de.data_ptr<float>(), du.data_ptr<float>(), dt.data_ptr<float>(), A.data_ptr<float>(),
                                   B, T, H, nc, g.ddt.data_ptr<float>(), part.data_ptr<float>(),
                                   at::cuda::getCurrentCUDAStream()),
        "ssd_chunk_decay_grad");
  g.dA = part.sum(0);
  return g;
}

// dt = clamp(softplus(raw + bias), lo, hi) and A = -exp(A_log) as one autograd node, one kernel
// each way (ssd_prep.hpp), in place of five LibTorch ops forward and their five backward nodes.
class SsdDtFunction : public torch::autograd::Function<SsdDtFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& raw_in,
                                                const torch::Tensor& bias, const torch::Tensor& A_log, double lo,
                                                double hi) {
    c10::cuda::CUDAGuard guard(raw_in.device());
    auto raw = raw_in.contiguous();
    const int64_t H = raw.size(-1), n = raw.numel();
    TORCH_CHECK(bias.numel() == H && A_log.numel() == H, "ssd dt: dt_bias and A_log must have one value per head (",
                H, "), got ", bias.sizes(), " and ", A_log.sizes());
    auto b32 = bias.to(raw.device(), torch::kFloat32).contiguous();
    auto a32 = A_log.to(raw.device(), torch::kFloat32).contiguous();
    auto dt = torch::empty(raw.sizes(), raw.options().dtype(torch::kFloat32));
    auto A = torch::empty({H}, dt.options());
    check_launch(cuda::ssd_dt_fwd(dtype_code(raw.scalar_type()), raw.data_ptr(), b32.data_ptr<float>(),
                                  a32.data_ptr<float>(), n, H, static_cast<float>(lo), static_cast<float>(hi),
                                  dt.data_ptr<float>(), A.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
                 "ssd_dt_fwd");
    ctx->save_for_backward({raw, b32, a32});
    ctx->saved_data["lo"] = lo;
    ctx->saved_data["hi"] = hi;
    ctx->saved_data["bias_dtype"] = static_cast<int64_t>(bias.scalar_type());
    ctx->saved_data["A_log_dtype"] = static_cast<int64_t>(A_log.scalar_type());
    return {dt, A};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor &raw = saved[0], &b32 = saved[1], &a32 = saved[2];
    c10::cuda::CUDAGuard guard(raw.device());
    const int64_t H = raw.size(-1), n = raw.numel();
    auto g = grads[0].defined() ? as_f32(grads[0])
                                : torch::zeros(raw.sizes(), raw.options().dtype(torch::kFloat32));
    auto dA = grads[1].defined() ? as_f32(grads[1]) : torch::Tensor();
    auto draw = torch::empty_like(raw);
    auto part = torch::empty({cuda::ssd_dt_blocks(n, H), H}, g.options());
    auto dA_log = dA.defined() ? torch::empty({H}, g.options()) : torch::Tensor();
    check_launch(cuda::ssd_dt_bwd(dtype_code(raw.scalar_type()), g.data_ptr<float>(), raw.data_ptr(),
                                  b32.data_ptr<float>(), a32.data_ptr<float>(), dA.defined() ? dA.data_ptr<float>() : nullptr,
                                  n, H, static_cast<float>(ctx->saved_data["lo"].toDouble()),
                                  static_cast<float>(ctx->saved_data["hi"].toDouble()), draw.data_ptr(),
                                  part.data_ptr<float>(), dA.defined() ? dA_log.data_ptr<float>() : nullptr,
                                  at::cuda::getCurrentCUDAStream()),
                 "ssd_dt_bwd");
    auto dtype_of = [&](const char* key) { return static_cast<torch::ScalarType>(ctx->saved_data[key].toInt()); };
    return {draw, part.sum(0).to(dtype_of("bias_dtype")),
            dA.defined() ? dA_log.to(dtype_of("A_log_dtype")) : torch::Tensor(), torch::Tensor(), torch::Tensor()};
  }
};

std::pair<torch::Tensor, torch::Tensor> dt_prep(const torch::Tensor& raw, const torch::Tensor& bias,
                                                const torch::Tensor& A_log, double lo, double hi) {
  auto out = SsdDtFunction::apply(raw, bias, A_log, lo, hi);
  return {out[0], out[1]};
}

}  // namespace

torch::Tensor ssd_step(SsdStepArgs& a) {
  TORCH_CHECK(a.x.dim() == 3, "ssd_step: x must be [B,H,P], got ", a.x.sizes());
  TORCH_CHECK(a.B.dim() == 3 && a.B.size(0) == a.x.size(0),
              "ssd_step: B must be [B,G,N] with B=", a.x.size(0), ", got ", a.B.sizes());
  const int64_t Bsz = a.x.size(0), H = a.x.size(1), P = a.x.size(2);
  const int64_t G = a.B.size(1), N = a.B.size(2);
  TORCH_CHECK(G > 0 && H % G == 0, "ssd_step: heads (", H, ") must be a multiple of groups (", G,
              ")");
  const auto dt_type = a.x.scalar_type();
  const bool supported =
      a.x.is_cuda() && glue::kernel_dtype(dt_type).has_value() && a.dt.scalar_type() == dt_type &&
      a.B.scalar_type() == dt_type && a.C.scalar_type() == dt_type && Bsz <= 65535 &&
      H <= 65535 && N <= kMaxStateDim && a.x.numel() > 0 &&
      !glue::needs_grad({&a.state, &a.x, &a.dt, &a.A_log, &a.B, &a.C, &a.D, &a.dt_bias});
  if (!supported) return reference::ssd_step(a);

  const char* op = "ssd_step";
  const auto dev = a.x.device();
  glue::check_device(a.state, dev, op, "state");
  glue::check_device(a.dt, dev, op, "dt");
  glue::check_device(a.A_log, dev, op, "A_log");
  glue::check_device(a.B, dev, op, "B");
  glue::check_device(a.C, dev, op, "C");
  glue::check_device(a.D, dev, op, "D");
  glue::check_device(a.dt_bias, dev, op, "dt_bias");
  TORCH_CHECK(a.state.defined() && a.state.dim() == 4 && a.state.size(0) == Bsz &&
                  a.state.size(1) == H && a.state.size(2) == P && a.state.size(3) == N,
              "ssd_step: state must be [B,H,P,N]=[", Bsz, ",", H, ",", P, ",", N, "], got ",
              a.state.defined() ? a.state.sizes() : torch::IntArrayRef{});
  TORCH_CHECK(a.dt.dim() == 2 && a.dt.size(0) == Bsz && a.dt.size(1) == H,
              "ssd_step: dt must be [B,H]=[", Bsz, ",", H, "], got ", a.dt.sizes());
  TORCH_CHECK(a.C.sizes() == a.B.sizes(), "ssd_step: C must match B's shape ", a.B.sizes(),
              ", got ", a.C.sizes());
  TORCH_CHECK(a.A_log.numel() == H, "ssd_step: A_log must have H=", H, " elements, got ",
              a.A_log.numel());
  TORCH_CHECK(a.dt_bias.numel() == H, "ssd_step: dt_bias must have H=", H, " elements, got ",
              a.dt_bias.numel());
  if (a.D.defined())
    TORCH_CHECK(a.D.numel() == H, "ssd_step: D must have H=", H, " elements, got ", a.D.numel());

  c10::cuda::CUDAGuard guard(dev);
  const bool in_place = a.state.scalar_type() == torch::kFloat32 && a.state.is_contiguous();
  torch::Tensor state = in_place ? a.state : a.state.to(torch::kFloat32).contiguous();
  auto x = a.x.contiguous();
  auto dt = a.dt.contiguous();
  auto Bm = a.B.contiguous();
  auto Cm = a.C.contiguous();
  auto A_log = a.A_log.to(torch::kFloat32).contiguous();
  auto dt_bias = a.dt_bias.to(torch::kFloat32).contiguous();
  auto D = a.D.defined() ? a.D.to(torch::kFloat32).contiguous() : torch::Tensor();
  auto y = torch::empty({Bsz, H, P}, x.options().dtype(torch::kFloat32));
  const auto err = cuda::ssd_step(
      glue::dtype_of(x), state.data_ptr<float>(), x.data_ptr(), dt.data_ptr(), A_log.data_ptr<float>(),
      D.defined() ? D.data_ptr<float>() : nullptr, dt_bias.data_ptr<float>(), Bm.data_ptr(),
      Cm.data_ptr(), y.data_ptr<float>(), Bsz, H, P, G, N, static_cast<float>(a.dt_min),
      static_cast<float>(a.dt_max), glue::current_stream());
  check_launch(err, "ssd_step (CUDA kernel)");
  if (!in_place) a.state = state;
  return y;
}

void register_ssd_kernels() {
  fused::MaskKernels k;
  k.build = build;
  k.backward = backward;
  k.states = states;
  k.states_backward = states_backward;
  k.chunk_supported = chunk_supported;
  k.chunk_scan = chunk_scan;
  k.chunk_bwd_off = chunk_bwd_off;
  k.chunk_bwd_diag = chunk_bwd_diag;
  k.chunk_bwd_db = chunk_bwd_db;
  k.chunk_cb = chunk_cb;
  k.chunk_cb_bwd = chunk_cb_bwd;
  k.chunk_prep = chunk_prep;
  k.chunk_states_pass = chunk_states_pass;
  k.chunk_decay_grad = chunk_decay_grad;
  k.dt_prep = dt_prep;
  fused::register_mask_kernels(std::move(k));
}

}  // namespace peftfw::kernels::mamba2::cuda_ops
