#!/usr/bin/env python3
"""Oracle for SDT / SDLoRA dimension selection (plugins/sdt/selection.cpp).

Re-implements, from the reference code's algorithm (furiosa-ai/ssm-peft,
mamba-peft/mamba_ssm_peft/peft/sd_lora.py: SdLoraParameter._parse_dims, get_importances,
select_rows, get_mask, build_train_param), the selection for one Mamba-1 layer, in the
reference's own layout and torch ops: A_log and its warm-up delta are (state, channel) = [N, D]
(the reference transposes A_log), x_proj_B / x_proj_C weights are [N, D].

    python3 tests/oracles/sdt_selection.py --seed S --channels D --states N \
        --freeze-channels F --freeze-states G [--zero-channels Z] [--zero-states Y] [--ties] --out FILE.json
    python3 tests/oracles/sdt_selection.py --self-check   # the study's budget examples only (also run always)

Budgets: a value with '.', 'e' or 'E' is a fraction (a JSON float in the reference's config:
round(frac * size), Python rounding), otherwise a count (a JSON int): "1.0" is everything, "1"
one row.

The warm-up delta (no global RNG is touched): g = torch.Generator().manual_seed(S), then
torch.randn((N, D), generator=g, dtype=torch.float32), i.e. directly in the reference's
(state, channel) layout; our [D, N] delta_A_log is its transpose. --ties then snaps it to
multiples of 0.5 in [-1, 1] (torch.round(2 * x).clamp(-2, 2) / 2) so that many channels and
states have equal importance.

Sorting: the reference calls torch.argsort(-importance) (stable=False). The oracle uses
stable=True, i.e. ties to the lower index, which is what peftfw implements and what the
reference's CUDA channel sort does; "literal_argsort_agrees" says whether the literal
stable=False call on this machine (CPU: not stable) selects the same dims.

Output JSON (all indices 0-based):
  config: the arguments (budgets keep their int/float type)
  delta_state_channel: [N][D] float32 values written as exact doubles
  num_train / num_freeze / num_zero: {"state", "channel"} for A_log, as _parse_dims gives them;
      num_train_bc likewise for x_proj_B / x_proj_C (state budget forced to 0)
  channels: trainable channels, importance order; states: per channel, importance order;
  zeroed_channels: importance order; channel_importance: [D]; channel_tie_groups: how many
      distinct importance values are shared by more than one channel
  a_fill_order: flat indices s * D + c of the A_log mask in (state, channel) row-major order,
      i.e. where masked_scatter puts sdlora_adapter[k]
  a_zero_channels: sorted channels of the zero mask
  bc_columns: sorted channels whose whole B/C column is trainable; bc_fill_order: as a_fill_order
  trainable: lengths of the flat adapters {"A_log", "x_proj_B", "x_proj_C"}
  apply: build_train_param on base = the delta itself as a stand-in A_log and adapter
      [0.25, 0.5, ...] (k+1)/4: "a_log_effective_state_channel" [N][D], and for B with base 0
      "b_effective" [N][D]
"""
import argparse
import json
import sys

import torch


def parse_amount(text):
    return float(text) if any(ch in text for ch in ".eE") else int(text)


def parse_dims(num, shape, is_a_log):
    """_parse_dims: num = {"state": ., "channel": .}; shape = (N, D) in the reference layout."""
    dims = [num["state"], num["channel"]]
    for i in range(2):
        if isinstance(dims[i], float):
            dims[i] = int(round(dims[i] * shape[i]))  # Python round: halves to even
    if not is_a_log:
        dims[0] = 0  # "we freeze states only for A_log and not for B or C"
    return dims


class Layer:
    """One SdLoraParameter's selection state (A_log if is_a_log, else x_proj_B / x_proj_C)."""

    def __init__(self, shape, num_freeze, num_zero, is_a_log, stable=True):
        self.shape = shape
        self.is_a_log = is_a_log
        self.stable = stable
        self.num_freeze = parse_dims(num_freeze, shape, is_a_log)
        self.num_zero = parse_dims(num_zero, shape, is_a_log)
        self.num_train = [shape[i] - self.num_zero[i] - self.num_freeze[i] for i in range(2)]
        for i, name in enumerate(("state", "channel")):
            if self.num_train[i] < 0:
                raise ValueError(f"impossible {name} budget: {self.num_freeze[i]} + {self.num_zero[i]} > {shape[i]}")
        # create_param: the flat adapter must not be empty
        assert self.num_train[0] * self.num_train[1] > 0, "nothing to train"

    def importances(self, x, dim, per_row=False):
        norms = x.square()
        if per_row:
            return torch.argsort(-norms, dim=dim, stable=self.stable)
        return torch.argsort(-norms.sum(1 - dim), stable=self.stable)

    def select_rows(self, x, dim, row_type, per_row=False):
        imp = self.importances(x, dim, per_row)
        t, f, z = self.num_train[dim], self.num_freeze[dim], self.num_zero[dim]
        return {"train": imp[0:t], "freeze": imp[t:t + f], "zero": imp[t + f:t + f + z]}[row_type]

    def mask(self, grad, mask_type):
        assert torch.sum(grad) != 0  # get_grad_for_sel
        mask = torch.zeros(self.shape, dtype=torch.bool)
        channels = self.select_rows(grad, 1, mask_type)
        if mask_type == "train":
            states = self.select_rows(grad[:, channels], 0, "train", per_row=True)
            n = states.shape[0]
            mask.T[channels.repeat(n), states.reshape(-1)] = True
        else:
            assert mask_type == "zero" and self.is_a_log
            mask.index_fill_(1, channels, True)
        return mask

    def build_train_param(self, param, adapter, grad, alpha=1):
        train_mask = self.mask(grad, "train")
        if self.is_a_log:
            zero_mask = self.mask(grad, "zero")
            assert torch.sum(train_mask & zero_mask).item() == 0
            param = torch.masked_fill(param, zero_mask, 10)
        bias = torch.masked_scatter(torch.zeros_like(param), train_mask, adapter)
        return param + alpha * bias


def fill_order(mask):
    """Where masked_scatter puts adapter[k]: found by scattering 1..K and reading the positions back."""
    count = int(mask.sum())
    probe = torch.masked_scatter(torch.zeros(mask.shape, dtype=torch.float64), mask,
                                 torch.arange(1, count + 1, dtype=torch.float64))
    flat = probe.reshape(-1)
    positions = torch.nonzero(flat).reshape(-1)
    order = positions[torch.argsort(flat[positions])]
    assert torch.equal(order, torch.nonzero(mask.reshape(-1)).reshape(-1))  # row-major
    return order.tolist()


def selection(delta, num_freeze, num_zero, stable):
    N, D = delta.shape
    a = Layer((N, D), num_freeze, num_zero, True, stable)
    channels = a.select_rows(delta, 1, "train")
    states = a.select_rows(delta[:, channels], 0, "train", per_row=True)  # [n_states, n_channels]
    zeroed = a.select_rows(delta, 1, "zero")
    return a, channels.tolist(), states.T.tolist(), zeroed.tolist()


def self_check():
    """The budget examples of the study (sdlora_study.md 1.5)."""
    def trainable(size, frac):
        return size - parse_dims({"state": 0, "channel": frac}, (16, size), True)[1]
    assert trainable(1536, 0.99) == 15  # mamba-130m d0.99
    assert trainable(4096, 0.99) == 41  # mamba-1.4b
    assert trainable(5120, 0.99) == 51  # mamba-2.8b
    for frac, states in ((0.75, 4), (0.9, 2), (0.95, 1)):
        assert 16 - parse_dims({"state": frac, "channel": 0}, (16, 1536), True)[0] == states
    assert parse_dims({"state": 0, "channel": 0.25}, (16, 10), True)[1] == 2  # round(2.5) = 2
    assert parse_dims({"state": 0, "channel": 0.25}, (16, 14), True)[1] == 4  # round(3.5) = 4
    assert parse_dims({"state": 0.75, "channel": 0}, (16, 1536), False)[0] == 0  # B/C: no state budget


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int)
    ap.add_argument("--channels", type=int, help="D = d_inner")
    ap.add_argument("--states", type=int, help="N = d_state")
    ap.add_argument("--freeze-channels", type=parse_amount)
    ap.add_argument("--freeze-states", type=parse_amount)
    ap.add_argument("--zero-channels", type=parse_amount, default=0)
    ap.add_argument("--zero-states", type=parse_amount, default=0)
    ap.add_argument("--ties", action="store_true", help="snap the delta to multiples of 0.5 in [-1, 1]")
    ap.add_argument("--out")
    ap.add_argument("--self-check", action="store_true", help="only check the study's budget examples")
    args = ap.parse_args()
    self_check()
    if args.self_check:
        print("sdt_selection: budget self-check passed")
        return 0
    missing = [n for n in ("seed", "channels", "states", "freeze_channels", "freeze_states", "out")
               if getattr(args, n) is None]
    if missing:
        ap.error("missing " + ", ".join("--" + n.replace("_", "-") for n in missing))

    N, D = args.states, args.channels
    g = torch.Generator().manual_seed(args.seed)
    delta = torch.randn((N, D), generator=g, dtype=torch.float32)
    if args.ties:
        delta = torch.round(2 * delta).clamp(-2, 2) / 2
    num_freeze = {"state": args.freeze_states, "channel": args.freeze_channels}
    num_zero = {"state": args.zero_states, "channel": args.zero_channels}

    a, channels, states, zeroed = selection(delta, num_freeze, num_zero, stable=True)
    _, channels_lit, states_lit, zeroed_lit = selection(delta, num_freeze, num_zero, stable=False)
    bc = Layer((N, D), num_freeze, num_zero, False)

    a_mask = a.mask(delta, "train")
    zero_mask = a.mask(delta, "zero")
    bc_mask = bc.mask(delta, "train")  # the A_log delta ranks B/C's channels too
    assert torch.all(bc_mask.any(0) == bc_mask.all(0)), "B/C columns are all-or-nothing"

    importance = delta.square().sum(0)
    _, counts = torch.unique(importance, return_counts=True)
    k_a, k_bc = int(a_mask.sum()), int(bc_mask.sum())
    assert k_a == a.num_train[0] * a.num_train[1] and k_bc == bc.num_train[0] * bc.num_train[1]

    adapter_a = torch.arange(1, k_a + 1, dtype=torch.float32) / 4
    adapter_bc = torch.arange(1, k_bc + 1, dtype=torch.float32) / 4
    a_eff = a.build_train_param(delta.clone(), adapter_a, delta)
    b_eff = bc.build_train_param(torch.zeros(N, D), adapter_bc, delta)

    out = {
        "config": {"seed": args.seed, "channels": D, "states": N, "ties": args.ties,
                   "num_freeze": num_freeze, "num_zero": num_zero},
        "delta_state_channel": delta.tolist(),
        "num_train": {"state": a.num_train[0], "channel": a.num_train[1]},
        "num_freeze": {"state": a.num_freeze[0], "channel": a.num_freeze[1]},
        "num_zero": {"state": a.num_zero[0], "channel": a.num_zero[1]},
        "num_train_bc": {"state": bc.num_train[0], "channel": bc.num_train[1]},
        "channels": channels,
        "states": states,
        "zeroed_channels": zeroed,
        "channel_importance": importance.tolist(),
        "channel_tie_groups": int((counts > 1).sum()),
        "literal_argsort_agrees": channels == channels_lit and states == states_lit and zeroed == zeroed_lit,
        "a_fill_order": fill_order(a_mask),
        "a_zero_channels": torch.nonzero(zero_mask.any(0)).reshape(-1).tolist(),
        "bc_columns": torch.nonzero(bc_mask.any(0)).reshape(-1).tolist(),
        "bc_fill_order": fill_order(bc_mask),
        "trainable": {"A_log": k_a, "x_proj_B": k_bc, "x_proj_C": k_bc},
        "apply": {"a_log_effective_state_channel": a_eff.tolist(), "b_effective": b_eff.tolist()},
    }
    with open(args.out, "w") as f:
        json.dump(out, f)
    print(f"sdt_selection: D={D} N={N} -> {len(channels)} channels x {a.num_train[0]} states, "
          f"{len(zeroed)} zeroed, A_log {k_a} + B/C {k_bc} each; wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
