#!/usr/bin/env python3
"""Oracle for peftfw/eval/generate: token ids from tests/tools/generate_tool against transformers' model.generate.

    .venv/bin/python tests/oracles/generate_oracle.py --tool build/bin/generate_tool \
        --oracle build/oracle/granite --workdir build/tests/generate_oracle

Uses the tiny checkpoints of granite_oracle.py. Prompts of different lengths are cut from each case's
reference.safetensors input_ids. Checks, each one generate_tool call (32 new tokens):

* greedy, one prompt at a time, against ``model.generate(do_sample=False)``;
* greedy, all prompts in one left-padded batch, against a left-padded batched ``model.generate``;
* a stop id in a batch: transformers' rows cut before their first eos must equal peftfw's rows (transformers keeps
  the eos and pads after it; peftfw leaves the stop token out);
* sampling (temperature 0.8, top-p 0.9, a seed), alone and batched, against ``model.generate(do_sample=True,
  top_k=0)`` after ``torch.manual_seed(seed)``: both draw with torch.multinomial from a CPU generator seeded alike;
* a stop string: transformers' greedy ids, decoded as bytes, cut in Python where the string first completes.

The shipped checkpoints (embedding multiplier 12, residual multiplier 0.22) make the random model repeat its last
prompt token forever, which would let a broken cache pass. The checks therefore run on copies in WORKDIR with both
multipliers set to 1 (same weights), whose greedy outputs vary from token to token.

The checkpoints' eos (2) would end rows early on the transformers side only, so it is switched off there
(generation_config.eos_token_id = None) and the tool gets no stop id, except in the stop-id check.

Batched padding checks run only on the NoPE cases (dense_nope, moe): transformers' generate derives position ids
from the attention mask while peftfw's (and transformers' plain) forward counts positions from the left edge, so a
RoPE model's padded rows legitimately differ. dense_rope is checked with single unpadded prompts.

Prints one line per failure and ``generate oracle: N passed, M failed``; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

import torch

torch.set_num_threads(2)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import GraniteMoeHybridForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

PAD_ID = 0
NEW_TOKENS = 32
SAMPLING = dict(temperature=0.8, top_p=0.9, seed=1234)
NOPE_CASES = ["dense_nope", "moe"]
ROPE_CASES = ["dense_rope"]


class Tally:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, got, want):
        if got == want:
            self.passed += 1
            return
        self.failed += 1
        print(f"FAIL {name}")
        for i, (g, w) in enumerate(zip(got, want)):
            if g != w:
                j = next((k for k in range(min(len(g), len(w))) if g[k] != w[k]), min(len(g), len(w)))
                print(f"  row {i}: first difference at new token {j}\n    peftfw:       {g}\n    transformers: {w}")
        if len(got) != len(want):
            print(f"  {len(got)} rows from peftfw, {len(want)} expected")


def varied_copy(case_dir, workdir, case):
    """The case's checkpoint with embedding and residual multipliers 1 (see the module docstring)."""
    out = os.path.join(workdir, case)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(case_dir, "config.json")) as f:
        config = json.load(f)
    config["embedding_multiplier"] = 1.0
    config["residual_multiplier"] = 1.0
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in ("model.safetensors", "generation_config.json"):
        shutil.copyfile(os.path.join(case_dir, name), os.path.join(out, name))
    return out


def prompts_of(reference):
    """Four prompts of lengths 21, 14, 7 and 3 from the case's two reference rows."""
    ids = reference["input_ids"].tolist()
    return [ids[0][:21], ids[1][:14], ids[0][4:11], ids[1][:3]]


def run_tool(tool, case_dir, prompts, *options):
    spec = ";".join(",".join(str(t) for t in p) for p in prompts)
    cmd = [tool, str(case_dir), spec, str(NEW_TOKENS), *[str(o) for o in options]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{proc.stderr}")
    return json.loads(proc.stdout)


@torch.no_grad()
def hf_generate(model, prompts, eos=None, sampling=None):
    """New tokens of each prompt from model.generate on a left-padded batch (no padding for one prompt)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    kwargs = dict(do_sample=False)
    if sampling:
        torch.manual_seed(sampling["seed"])
        kwargs = dict(do_sample=True, temperature=sampling["temperature"], top_p=sampling["top_p"], top_k=0)
    model.generation_config.eos_token_id = eos
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD_ID, eos_token_id=eos, **kwargs
    )
    new = out[:, width:].tolist()
    if eos is None and any(len(r) != NEW_TOKENS for r in new):
        raise RuntimeError(f"transformers generated {len(new[0])} tokens, expected {NEW_TOKENS}")
    return new


def cut_at(row, stop_id):
    return row[: row.index(stop_id)] if stop_id in row else row


def pick_stop_id(rows):
    """A token that ends some row after it has produced at least one token."""
    for row in rows:
        for j in range(1, len(row)):
            if row[j] not in row[:j]:
                return row[j]
    return rows[0][0]


def stop_string_expectation(rows):
    """A printable two-byte stop string from the rows' tokens, and each row's expected ids and text."""
    stop = None
    for row in rows:
        for j in range(len(row) - 1):
            if all(32 <= t < 127 for t in row[j : j + 2]):
                stop = "".join(chr(t) for t in row[j : j + 2])
                break
        if stop:
            break
    if stop is None:
        return None, None, None
    ids, texts = [], []
    for row in rows:
        cut, text = row, "".join(chr(t) for t in row)
        for j in range(len(row)):
            prefix = "".join(chr(t) for t in row[: j + 1])
            if stop in prefix:
                cut, text = row[: j + 1], prefix[: prefix.index(stop)]
                break
        ids.append(cut)
        texts.append(text)
    return stop, ids, texts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tool", required=True, help="generate_tool executable")
    ap.add_argument("--oracle", required=True, help="granite_oracle.py output folder (build/oracle/granite)")
    ap.add_argument("--workdir", required=True, help="scratch folder (the transformers outputs are written here)")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    tally = Tally()
    record = {}
    sampling_options = ["--temperature", SAMPLING["temperature"], "--top-p", SAMPLING["top_p"]]
    sampling_options += ["--seed", SAMPLING["seed"]]

    for case in NOPE_CASES + ROPE_CASES:
        prompts = prompts_of(load_file(os.path.join(args.oracle, case, "reference.safetensors")))
        case_dir = varied_copy(os.path.join(args.oracle, case), args.workdir, case)
        model = GraniteMoeHybridForCausalLM.from_pretrained(case_dir).eval()
        record[case] = {"prompts": prompts}
        record[case]["greedy_alone"] = []

        for i, prompt in enumerate(prompts):
            want = hf_generate(model, [prompt])
            record[case]["greedy_alone"] += want
            got = run_tool(args.tool, case_dir, [prompt])["outputs"]
            tally.check(f"{case}: greedy, prompt {i} alone (length {len(prompt)})", got, want)
        want = hf_generate(model, [prompts[0]], sampling=SAMPLING)
        got = run_tool(args.tool, case_dir, [prompts[0]], *sampling_options)["outputs"]
        record[case]["sampled_alone"] = want
        tally.check(f"{case}: sampling, prompt 0 alone", got, want)
        if case in ROPE_CASES:
            continue

        greedy = hf_generate(model, prompts)
        record[case]["greedy_batched"] = greedy
        got = run_tool(args.tool, case_dir, prompts)["outputs"]
        tally.check(f"{case}: greedy, {len(prompts)} prompts left-padded in one batch", got, greedy)

        stop_id = pick_stop_id(greedy)
        want = [cut_at(r, stop_id) for r in hf_generate(model, prompts, eos=stop_id)]
        record[case]["stop_id"] = {"id": stop_id, "outputs": want}
        got = run_tool(args.tool, case_dir, prompts, "--stop-id", stop_id)["outputs"]
        tally.check(f"{case}: greedy batch with stop id {stop_id}", got, want)

        want = hf_generate(model, prompts, sampling=SAMPLING)
        record[case]["sampled_batched"] = want
        got = run_tool(args.tool, case_dir, prompts, *sampling_options)["outputs"]
        tally.check(f"{case}: sampling, {len(prompts)} prompts in one batch", got, want)

        stop, want_ids, want_texts = stop_string_expectation(greedy)
        if stop is None:
            tally.check(f"{case}: stop string (no printable token pair in the greedy outputs)", [], [[]])
        else:
            record[case]["stop_string"] = {"stop": stop, "outputs": want_ids, "texts": want_texts}
            result = run_tool(args.tool, case_dir, prompts, "--stop-string", stop)
            tally.check(f"{case}: stop string {stop!r}, ids", result["outputs"], want_ids)
            tally.check(f"{case}: stop string {stop!r}, texts", result["texts"], want_texts)

    with open(os.path.join(args.workdir, "transformers_outputs.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(f"generate oracle: {tally.passed} passed, {tally.failed} failed")
    return 1 if tally.failed else 0


if __name__ == "__main__":
    sys.exit(main())
