// Reentrant activation checkpointing (see checkpoint.hpp).
#include "peftfw/nn/checkpoint.hpp"

#include <ATen/Context.h>
#include <torch/torch.h>

#include <atomic>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace peftfw::nn {

namespace {

struct Pending {
  CheckpointFn fn;
  std::vector<torch::Tensor> kept;  // outputs kept by ops in the first run, in call order
  int64_t wide_bytes = 0;           // of those, the bytes held against the wide budget
  torch::Tensor rng_state;  // of the input's device default generator, before the forward
  c10::Device device = c10::kCPU;
};

// Closures waiting for their backward, keyed by an id kept in the autograd context (the
// context can only hold IValues). Each entry is removed by its backward.
std::mutex g_mutex;
std::unordered_map<int64_t, Pending> g_pending;
int64_t g_next_id = 0;
KeepPolicy g_policy = KeepPolicy::kNone;
std::atomic<int64_t> g_kept{0}, g_taken{0};
std::atomic<int64_t> g_wide_budget{0}, g_wide_held{0};  // bytes: the limit, and kept but not yet taken

// What the running checkpointed function does with kept outputs: fills `kept` in its
// first run, hands them back in order (from `next`) in its rerun.
struct KeepScope {
  enum Mode { kOff, kRecord, kReplay } mode = kOff;
  std::vector<torch::Tensor>* kept = nullptr;
  size_t next = 0;
  int64_t* wide_bytes = nullptr;  // the run's Pending::wide_bytes
};
thread_local KeepScope t_scope;

// Installs a scope for one run of a checkpointed function, restoring the outer one after.
class ScopeGuard {
 public:
  ScopeGuard(KeepScope::Mode mode, std::vector<torch::Tensor>* kept, int64_t* wide_bytes) : saved_(t_scope) {
    t_scope = KeepScope{mode, kept, 0, wide_bytes};
  }
  ~ScopeGuard() { t_scope = saved_; }
  ScopeGuard(const ScopeGuard&) = delete;
  ScopeGuard& operator=(const ScopeGuard&) = delete;

 private:
  KeepScope saved_;
};

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
    std::vector<torch::Tensor>* kept;
    int64_t* wide_bytes;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      auto& p = g_pending.at(id);
      fn = p.fn;
      kept = &p.kept;  // unordered_map entries stay put while others come and go
      wide_bytes = &p.wide_bytes;
    }
    torch::NoGradGuard no_grad;
    ScopeGuard scope(KeepScope::kRecord, kept, wide_bytes);
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
    // This run's kept wide outputs leave the budget with this function, even if the rerun throws.
    struct Release {
      int64_t bytes;
      ~Release() { g_wide_held -= bytes; }
    } release{p.wide_bytes};
    auto input = ctx->get_saved_variables()[0];
    auto x = input.detach().requires_grad_(input.requires_grad());
    auto now = rng_state(p.device);
    set_rng_state(p.device, p.rng_state);
    torch::Tensor out;
    {
      torch::AutoGradMode enable(true);
      ScopeGuard scope(KeepScope::kReplay, &p.kept, nullptr);
      out = p.fn(x);
      TORCH_CHECK(t_scope.next == p.kept.size(), "checkpoint rerun used ", t_scope.next, " of the ",
                  p.kept.size(), " outputs kept by its first run (the two runs took different paths)");
    }
    set_rng_state(p.device, now);
    // Accumulates into the parameters' .grad and into x.grad.
    torch::autograd::backward({out}, {grads[0]});
    return {x.requires_grad() ? x.grad() : torch::Tensor(), torch::Tensor()};
  }
};

}  // namespace

void set_keep_policy(KeepPolicy policy) { g_policy = policy; }
KeepPolicy keep_policy() { return g_policy; }

bool keeps_projection(int64_t in_features, int64_t out_features) {
  return g_policy == KeepPolicy::kNarrowProjections && in_features >= 2 * out_features;
}

torch::Tensor take_kept_output(int64_t rows, int64_t cols) {
  if (t_scope.mode != KeepScope::kReplay) return {};
  TORCH_CHECK(t_scope.next < t_scope.kept->size(), "checkpoint rerun asked for kept output ", t_scope.next,
              " but the first run kept only ", t_scope.kept->size(), " (the two runs took different paths)");
  const size_t at = t_scope.next++;
  auto out = std::move((*t_scope.kept)[at]);
  if (!out.defined()) return out;
  TORCH_CHECK(out.dim() >= 1 && out.size(-1) == cols && out.numel() == rows * cols, "checkpoint rerun: kept output ",
              at, " has shape ", out.sizes(), " but the op asking for it computes ", rows, " rows of ", cols,
              " (the two runs took different paths)");
  ++g_taken;
  return out;
}

void keep_output(const torch::Tensor& out) {
  if (t_scope.mode != KeepScope::kRecord) return;
  t_scope.kept->push_back(out);
  ++g_kept;
}

void set_wide_keep_budget(int64_t bytes) { g_wide_budget = bytes; }

bool may_keep_wide(int64_t in_features, int64_t out_features) {
  return g_policy == KeepPolicy::kNarrowProjections && g_wide_budget.load() > 0 && !keeps_projection(in_features, out_features);
}

void keep_output_if_room(const torch::Tensor& out) {
  if (t_scope.mode != KeepScope::kRecord) return;
  const int64_t bytes = static_cast<int64_t>(out.nbytes()), budget = g_wide_budget.load();
  // Check and reserve in one step, so that two threads cannot both take the last room.
  int64_t held = g_wide_held.load();
  bool room = held + bytes <= budget;
  while (room && !g_wide_held.compare_exchange_weak(held, held + bytes)) room = held + bytes <= budget;
  t_scope.kept->push_back(room ? out : torch::Tensor());
  if (room) {
    *t_scope.wide_bytes += bytes;
    ++g_kept;
  }
}

bool may_keep(int64_t in_features, int64_t out_features) {
  return keeps_projection(in_features, out_features) || may_keep_wide(in_features, out_features);
}

void keep_projection_output(int64_t in_features, int64_t out_features, const torch::Tensor& out) {
  if (keeps_projection(in_features, out_features)) keep_output(out);
  else keep_output_if_room(out);
}

KeepStats keep_stats() { return {g_kept.load(), g_taken.load()}; }

torch::Tensor checkpoint(CheckpointFn fn, const torch::Tensor& input) {
  if (!torch::GradMode::is_enabled()) return fn(input);
  // Like use_reentrant=True: the output only joins the graph through an input that requires
  // grad, so make the input one (its own gradient is simply not used when it is a leaf).
  auto in = input.requires_grad() ? input : input.detach().requires_grad_(true);
  int64_t id;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    id = g_next_id++;
    g_pending[id] = Pending{std::move(fn), {}, 0, rng_state(in.device()), in.device()};
  }
  return CheckpointFunction::apply(in, id);
}

}  // namespace peftfw::nn
