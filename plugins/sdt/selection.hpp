// SDT / SDLoRA dimension selection (Galim et al., ICML 2025), ported from the reference code
// furiosa-ai/ssm-peft, mamba-peft/mamba_ssm_peft/peft/sd_lora.py (SdLoraParameter._parse_dims,
// get_importances, select_rows, get_mask, build_train_param). CPU, no autograd.
//
// Layouts. Our A_log is transformers' Mamba-1 layout [D = d_inner (channels), N = d_state]. The
// reference transposes A_log and works on (state, channel) = [N, D]: its warm-up delta
// `sdlora_grad` (the pickled *.pkl) is our delta_A_log.t(), and its masks are our a_mask.t() and
// a_zero_mask.t(). x_proj's B and C slices (x_proj.weight rows dt_rank .. dt_rank+N, then the next
// N rows) are [N, D] in both codes, so bc_mask needs no transpose.
//
// The algorithm (Δ = delta_A_log.t(), float32 [N, D]):
//   - channel importance imp[d] = Σ_n Δ[n,d]²; channels sorted by decreasing importance. The first
//     n_train are trainable, the next n_freeze frozen, the next n_zero zeroed.
//   - per selected channel d, state importance Δ[n,d]², sorted by decreasing importance; the first
//     n_train_states are trainable (each channel has its own states).
//   - budgets: n_freeze = round(frac * size) for a fraction (Python's round: half to even), a count
//     as given; n_train = size - n_freeze - n_zero (trainable_count).
//   - B and C train every state (row) of the selected channels' columns: the reference forces the
//     state budget of B/C to 0.
//   - zeroed channels of A_log are overwritten with 10 (A = -e^10: the state is erased each step).
//     A state zero budget only lowers the number of trainable states; no state is ever zeroed.
//
// Ties (equal importance) go to the lower index (a stable sort of -importance). The reference calls
// torch.argsort(-imp) without stable=True; on CUDA that sort is stable for the channel sort but
// may not be for the per-channel state sort (N <= 32: bitonic), and on CPU it is not stable
// (introsort). Without exact ties every variant gives the same result.
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <string_view>
#include <variant>
#include <vector>

namespace peftfw::sdt {

// A fraction of the dimension (double, in [0, 1]) or a count (int64, in [0, size]), exactly as the
// reference distinguishes JSON floats from ints: 1.0 is everything, 1 is one row.
using Amount = std::variant<double, int64_t>;

struct Budget {
  Amount freeze = int64_t{0};
  Amount zero = int64_t{0};
};

// The value A_log takes in a zeroed channel (reference: torch.masked_fill(param, zero_mask, 10)).
inline constexpr double kZeroFillValue = 10.0;

// An amount resolved to a count: round-half-to-even(frac * size) in double for a fraction, the
// count itself otherwise. Throws InputError (naming `what`, the value and the size) for a fraction
// outside [0, 1] or not finite, or a count outside [0, size].
int64_t resolve(const Amount& amount, int64_t size, std::string_view what = "amount");

// size - resolve(freeze) - resolve(zero). Throws InputError when freeze + zero exceed size (the
// message names both values, what they resolve to and the size; `what` is the singular noun
// of the dimension: "channel", "state"). 0 is a valid answer here;
// select() refuses a layer with nothing to train, as the reference asserts.
int64_t trainable_count(int64_t size, const Budget& budget, std::string_view what = "row");

struct LayerSelection {
  std::vector<int64_t> channels;             // trainable channels, most important first
  std::vector<std::vector<int64_t>> states;  // states[i]: trainable states of channels[i], most important first
  std::vector<int64_t> zeroed_channels;      // the least important channels, in importance order
  torch::Tensor a_mask;                      // bool [D, N]: a_mask[channels[i], states[i][j]]
  torch::Tensor a_zero_mask;                 // bool [D, N]: whole rows of zeroed_channels
  torch::Tensor bc_mask;                     // bool [N, D]: whole columns of channels

  int64_t num_channels() const { return static_cast<int64_t>(channels.size()); }
  int64_t num_states() const { return states.empty() ? 0 : static_cast<int64_t>(states.front().size()); }
  // Lengths of the flat trainable vectors (reference: sdlora_adapter): A_log, and each of B and C.
  int64_t a_trainable() const { return num_channels() * num_states(); }
  int64_t bc_trainable() const { return bc_mask.size(0) * num_channels(); }
};

// Selects from the warm-up delta of A_log, [D, N] floating point (computed in float32, as the
// reference keeps A_log in float32). Throws InputError when the delta is not 2-D, has a non-finite
// value, is all zero (the reference asserts it is not), or a budget leaves no channel or no state
// to train.
LayerSelection select(const torch::Tensor& delta_A_log, const Budget& channel, const Budget& state);

// The flat trainable vector <-> a dense delta, in the row-major order of `mask` (the order of
// torch.masked_scatter / masked_select): the k-th value goes to the k-th true element. scatter_rows
// returns a tensor of mask's shape with values' dtype; gather returns a 1-D tensor. For B and C use
// them with bc_mask [N, D]: row-major (state, channel), as the reference.
torch::Tensor scatter_rows(const torch::Tensor& mask, const torch::Tensor& values);
torch::Tensor gather(const torch::Tensor& mask, const torch::Tensor& dense);

// The same for A_log, whose flat vector is in the reference's row-major (state, channel) order:
// sorted by state index, then channel index (not importance order), i.e. column-major over our
// [D, N] a_mask. The vector is then interchangeable with the reference's sdlora_adapter.
torch::Tensor scatter_a_log(const torch::Tensor& a_mask, const torch::Tensor& values);  // -> [D, N]
torch::Tensor gather_a_log(const torch::Tensor& a_mask, const torch::Tensor& dense);    // [D, N] -> flat

// The effective weights of build_train_param: A_log with zeroed channels set to kZeroFillValue,
// then + alpha * scattered adapter; B or C ([N, D]) + alpha * scattered adapter.
torch::Tensor apply_a_log(const torch::Tensor& a_log, const LayerSelection& selection,
                          const torch::Tensor& adapter, double alpha = 1.0);
torch::Tensor apply_bc(const torch::Tensor& weight, const LayerSelection& selection,
                       const torch::Tensor& adapter, double alpha = 1.0);

}  // namespace peftfw::sdt
