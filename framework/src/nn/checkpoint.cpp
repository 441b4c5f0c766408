// Reentrant activation checkpointing (see checkpoint.hpp).
#include "peftfw/nn/checkpoint.hpp"

#include <ATen/Context.h>
#include <torch/torch.h>

#include <mutex>
#include <unordered_map>

namespace peftfw::nn {

namespace {

struct Pending {
  CheckpointFn fn;
  torch::Tensor rng_state;  // of the input's device default generator, before the forward
  c10::Device device = c10::kCPU;
};

// Closures waiting for their backward, keyed by an id kept in the autograd context (the
// context can only hold IValues). Each entry is removed by its backward.
std::mutex g_mutex;
std::unordered_map<int64_t, Pending> g_pending;
int64_t g_next_id = 0;

at::Generator generator_for(const c10::Device& device) {
  return at::globalContext().defaultGenerator(device.is_cuda() ? c10::Device(c10::kCUDA, device.index() < 0 ? 0 : device.index())
                                                               : c10::Device(c10::kCPU));
}

torch::Tensor rng_state(const c10::Device& device) {
  auto gen = generator_for(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_rng_state(const c10::Device& device, const torch::Tensor& state) {
  auto gen = generator_for(device);
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, torch::Tensor input, int64_t id) {
    ctx->save_for_backward({input});
    ctx->saved_data["id"] = id;
    CheckpointFn fn;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      fn = g_pending.at(id).fn;
    }
    torch::NoGradGuard no_grad;
    return fn(input);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const int64_t id = ctx->saved_data["id"].toInt();
    Pending p;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      p = std::move(g_pending.at(id));
      g_pending.erase(id);
    }
    auto input = ctx->get_saved_variables()[0];
    auto x = input.detach().requires_grad_(input.requires_grad());
    auto now = rng_state(p.device);
    set_rng_state(p.device, p.rng_state);
    torch::Tensor out;
    {
      torch::AutoGradMode enable(true);
      out = p.fn(x);
    }
    set_rng_state(p.device, now);
    // Accumulates into the parameters' .grad and into x.grad.
    torch::autograd::backward({out}, {grads[0]});
    return {x.requires_grad() ? x.grad() : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

torch::Tensor checkpoint(CheckpointFn fn, const torch::Tensor& input) {
  if (!torch::GradMode::is_enabled()) return fn(input);
  // Like use_reentrant=True: the output only joins the graph through an input that requires
  // grad, so make the input one (its own gradient is simply not used when it is a leaf).
  auto in = input.requires_grad() ? input : input.detach().requires_grad_(true);
  int64_t id;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    id = g_next_id++;
    g_pending[id] = Pending{std::move(fn), rng_state(in.device()), in.device()};
  }
  return CheckpointFunction::apply(in, id);
}

}  // namespace peftfw::nn
