#!/usr/bin/env bash
# The methods study of docs/methods.md: LoRA (V2 targets), LoRA + SSM co-training, SDT,
# state-offset and initial-state tuning on a tiny Mamba-1 and a tiny Granite hybrid
# (recipes/study/*.toml), each trained, evaluated on its held-out split, then one
# `peftfw compare` table. CPU is enough (a few minutes per run on 2 cores).
#   scripts/methods_study.sh [PEFTFW] [OUT_DIR]     (default: build/bin/peftfw, runs/study)
set -euo pipefail
cd "$(dirname "$0")/.."
peftfw=${1:-build/bin/peftfw}
out=${2:-runs/study}
declare -A extra=(
  [lora]=""
  [lora_ssm]="ssm.train=[\"A_log\",\"D\",\"dt_bias\"]"
  [sdt]="adapter.method=sdt sdt.warmup_iters=10"
  [state_offset]="adapter.method=state_offset adapter.target_modules=[]"
  [initial_state]="adapter.method=initial_state initial_state.conv_window=true adapter.target_modules=[]"
)
# SDT: the reference's out_proj LoRA (plus o_proj on the hybrid's attention layer) and budgets
# that leave something of these tiny layers (Mamba-1: 26 of 256 channels; Granite: 2 of 8 heads).
sdt_targets=(
  [0]='adapter.target_modules=["out_proj"] sdt.channel_freeze=0.9'
  [1]='adapter.target_modules=["out_proj","o_proj"] sdt.channel_freeze=0.75'
)
models=(mamba granite)
dirs=()
for i in 0 1; do
  model=${models[$i]}
  for method in lora lora_ssm sdt state_offset initial_state; do
    dir=$out/$model/$method
    args=(recipes/study/$model.toml "output.dir=$dir" "output.overwrite=true")
    for a in ${extra[$method]}; do args+=("$a"); done
    if [ "$method" = sdt ]; then for a in ${sdt_targets[$i]}; do args+=("$a"); done; fi
    echo "== $model $method" >&2
    "$peftfw" run "${args[@]}" >&2
    "$peftfw" eval "${args[@]:0:2}" "${args[@]:3}" >&2
    dirs+=("$dir")
  done
done
"$peftfw" compare "${dirs[@]}"
