// SDT / SDLoRA dimension selection: see selection.hpp for the algorithm and the layouts.
#include "selection.hpp"

#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>

#include "peftfw/error.hpp"

namespace peftfw::sdt {
namespace {

// The shortest decimal that reads back as the same double (as Python's repr prints it).
std::string number(double x) {
  std::ostringstream out;
  for (int precision = 1; precision <= 17; ++precision) {
    out.str("");
    out.precision(precision);
    out << x;
    if (std::strtod(out.str().c_str(), nullptr) == x) break;
  }
  std::string s = out.str();
  // A fraction always shows as one: 1.0, not 1 (which would read as a count).
  if (std::isfinite(x) && s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string shape(const torch::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// Python's round() of a float: to the nearest integer, halves to the even one.
double round_half_even(double x) {
  const double down = std::floor(x);
  const double rest = x - down;  // exact
  if (rest > 0.5) return down + 1.0;
  if (rest < 0.5) return down;
  return std::fmod(down, 2.0) == 0.0 ? down : down + 1.0;
}

// "0.99 (round(0.99 * 1536) = 1521)" or "20".
std::string describe(const Amount& amount, int64_t size, int64_t resolved) {
  if (const double* frac = std::get_if<double>(&amount)) {
    return number(*frac) + " (round(" + number(*frac) + " * " + std::to_string(size) + ") = " +
           std::to_string(resolved) + ")";
  }
  return std::to_string(std::get<int64_t>(amount));
}

std::vector<int64_t> to_vector(const torch::Tensor& t) {
  const torch::Tensor c = t.to(torch::kLong).contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

void check_bool_mask(const torch::Tensor& mask, const char* what) {
  if (!mask.defined() || mask.scalar_type() != torch::kBool) {
    throw InputError(std::string("sdt: ") + what + " must be a bool tensor");
  }
}

}  // namespace

int64_t resolve(const Amount& amount, int64_t size, std::string_view what) {
  if (const double* frac = std::get_if<double>(&amount)) {
    if (!std::isfinite(*frac) || *frac < 0.0 || *frac > 1.0) {
      throw InputError("sdt: " + std::string(what) + " fraction " + number(*frac) +
                       " must lie in [0, 1] (of " + std::to_string(size) + ")");
    }
    // int(round(frac * size)) in the reference: the product in double, then Python's rounding.
    return static_cast<int64_t>(round_half_even(*frac * static_cast<double>(size)));
  }
  const int64_t count = std::get<int64_t>(amount);
  if (count < 0 || count > size) {
    throw InputError("sdt: " + std::string(what) + " count " + std::to_string(count) + " must lie in [0, " +
                     std::to_string(size) + "]");
  }
  return count;
}

int64_t trainable_count(int64_t size, const Budget& budget, std::string_view what) {
  const std::string name(what);
  const int64_t freeze = resolve(budget.freeze, size, name + " freeze");
  const int64_t zero = resolve(budget.zero, size, name + " zero");
  if (freeze + zero > size) {
    throw InputError("sdt: impossible " + name + " budget: freeze " + describe(budget.freeze, size, freeze) +
                     " + zero " + describe(budget.zero, size, zero) + " = " + std::to_string(freeze + zero) +
                     " is more than the " + std::to_string(size) + " " + name + "s");
  }
  return size - freeze - zero;
}

LayerSelection select(const torch::Tensor& delta_A_log, const Budget& channel, const Budget& state) {
  if (!delta_A_log.defined() || delta_A_log.dim() != 2 || !delta_A_log.is_floating_point()) {
    throw InputError("sdt: delta_A_log must be a 2-D floating-point tensor [d_inner, d_state], got " +
                     (delta_A_log.defined() ? shape(delta_A_log) : std::string("an undefined tensor")));
  }
  const int64_t D = delta_A_log.size(0);
  const int64_t N = delta_A_log.size(1);
  // The reference's (state, channel) layout, in float32 (A_log and its delta stay float32 there).
  const torch::Tensor delta = delta_A_log.detach().to(torch::kCPU, torch::kFloat).t().contiguous();  // [N, D]
  const int64_t non_finite = (~torch::isfinite(delta)).sum().item<int64_t>();
  if (non_finite > 0) {
    throw InputError("sdt: delta_A_log " + shape(delta_A_log) + " has " + std::to_string(non_finite) +
                     " non-finite values (NaN or inf): the warm-up diverged");
  }
  if (delta.numel() == 0 || !delta.ne(0).any().item<bool>()) {
    throw InputError("sdt: delta_A_log " + shape(delta_A_log) +
                     " is all zero: the warm-up did not change A_log, so no channel can be ranked "
                     "(was A_log's warm-up delta trained?)");
  }

  const int64_t n_channels = trainable_count(D, channel, "channel");
  const int64_t n_frozen = resolve(channel.freeze, D, "channel freeze");
  const int64_t n_zeroed = resolve(channel.zero, D, "channel zero");
  const int64_t n_states = trainable_count(N, state, "state");
  if (n_channels == 0 || n_states == 0) {
    const bool no_channel = n_channels == 0;
    const Budget& b = no_channel ? channel : state;
    const int64_t size = no_channel ? D : N;
    throw InputError(std::string("sdt: the ") + (no_channel ? "channel" : "state") + " budget (freeze " +
                     describe(b.freeze, size, resolve(b.freeze, size)) + ", zero " +
                     describe(b.zero, size, resolve(b.zero, size)) + ") leaves none of the " +
                     std::to_string(size) + (no_channel ? " channels" : " states") + " to train");
  }

  // get_importances / select_rows: argsort of -importance, ties to the lower index.
  const torch::Tensor square = delta.square();
  const torch::Tensor channel_order = torch::argsort(square.sum(0).neg(), /*stable=*/true, /*dim=*/0);
  const torch::Tensor train_channels = channel_order.slice(0, 0, n_channels);
  const torch::Tensor zero_channels = channel_order.slice(0, n_channels + n_frozen, n_channels + n_frozen + n_zeroed);
  // Per selected channel (column), its states by decreasing Δ²: [n_states, n_channels].
  const torch::Tensor state_order =
      torch::argsort(square.index_select(1, train_channels).neg(), /*stable=*/true, /*dim=*/0).slice(0, 0, n_states);

  LayerSelection sel;
  sel.channels = to_vector(train_channels);
  sel.zeroed_channels = to_vector(zero_channels);
  for (int64_t j = 0; j < n_channels; ++j) sel.states.push_back(to_vector(state_order.select(1, j)));

  const auto bool_options = torch::TensorOptions().dtype(torch::kBool);
  sel.a_mask = torch::zeros({D, N}, bool_options);
  sel.a_mask.index_put_({train_channels.repeat({n_states}), state_order.reshape({-1})}, true);
  sel.a_zero_mask = torch::zeros({D, N}, bool_options);
  sel.a_zero_mask.index_fill_(0, zero_channels, true);
  sel.bc_mask = torch::zeros({N, D}, bool_options);
  sel.bc_mask.index_fill_(1, train_channels, true);
  return sel;
}

torch::Tensor scatter_rows(const torch::Tensor& mask, const torch::Tensor& values) {
  check_bool_mask(mask, "the mask of scatter_rows");
  const int64_t count = mask.sum().item<int64_t>();
  if (!values.defined() || values.dim() != 1 || values.numel() != count) {
    throw InputError("sdt: the trainable vector must be 1-D with " + std::to_string(count) +
                     " values (the mask's true elements), got " +
                     (values.defined() ? shape(values) : std::string("an undefined tensor")));
  }
  const torch::Tensor m = mask.contiguous();
  return torch::zeros(m.sizes(), values.options()).masked_scatter_(m, values.contiguous());
}

torch::Tensor gather(const torch::Tensor& mask, const torch::Tensor& dense) {
  check_bool_mask(mask, "the mask of gather");
  if (!dense.defined() || dense.sizes() != mask.sizes()) {
    throw InputError("sdt: gather needs a dense tensor of the mask's shape " + shape(mask) + ", got " +
                     (dense.defined() ? shape(dense) : std::string("an undefined tensor")));
  }
  return dense.contiguous().masked_select(mask.contiguous());
}

torch::Tensor scatter_a_log(const torch::Tensor& a_mask, const torch::Tensor& values) {
  check_bool_mask(a_mask, "a_mask");
  return scatter_rows(a_mask.t(), values).t().contiguous();
}

torch::Tensor gather_a_log(const torch::Tensor& a_mask, const torch::Tensor& dense) {
  check_bool_mask(a_mask, "a_mask");
  if (!dense.defined() || dense.sizes() != a_mask.sizes()) {
    throw InputError("sdt: gather_a_log needs a dense tensor of a_mask's shape " + shape(a_mask) + ", got " +
                     (dense.defined() ? shape(dense) : std::string("an undefined tensor")));
  }
  return gather(a_mask.t(), dense.t());
}

torch::Tensor apply_a_log(const torch::Tensor& a_log, const LayerSelection& selection, const torch::Tensor& adapter,
                          double alpha) {
  if (!a_log.defined() || a_log.sizes() != selection.a_mask.sizes()) {
    throw InputError("sdt: A_log must have the selection's shape " + shape(selection.a_mask) + ", got " +
                     (a_log.defined() ? shape(a_log) : std::string("an undefined tensor")));
  }
  const torch::Tensor bias = scatter_a_log(selection.a_mask, adapter.to(a_log.scalar_type()));
  return a_log.masked_fill(selection.a_zero_mask, kZeroFillValue) + alpha * bias;
}

torch::Tensor apply_bc(const torch::Tensor& weight, const LayerSelection& selection, const torch::Tensor& adapter,
                       double alpha) {
  if (!weight.defined() || weight.sizes() != selection.bc_mask.sizes()) {
    throw InputError("sdt: the B or C weight must have the shape " + shape(selection.bc_mask) + ", got " +
                     (weight.defined() ? shape(weight) : std::string("an undefined tensor")));
  }
  return weight + alpha * scatter_rows(selection.bc_mask, adapter.to(weight.scalar_type()));
}

}  // namespace peftfw::sdt
