#!/usr/bin/env bash
# FSDP2 on the GPUs of one machine (issue 11 item 4), at most 8 minutes: ViT-B/16 and GPT-2 125M, each without SAM,
# with SAM and with LLQR+SAM, bf16, through Accelerate's FSDP2 path (recipes/accelerate_configs/fsdp2.yaml), then
# the same through DDP (ddp.yaml) for the loss check. Writes <out>/<backend>-<model>.json, a log per launch and the
# table <out>/fsdp2_gpu.md.
#   bash recipes/benchmarks/fsdp2_gpu.sh runs/fsdp2_gpu      # NPROC=<n> to use n GPUs (default: all)
# hf_llqrsam runs from this checkout (PYTHONPATH); it needs transformers >= 5.23: on a machine that cannot install,
# put the wheels in a folder and pass WHEELS=<folder> (installed with --no-deps first).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/fsdp2_gpu}"
nproc="${NPROC:-$(nvidia-smi -L | wc -l)}"
python="${PYTHON:-python3}"
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then "$python" -m pip install --quiet --no-deps "$WHEELS"/*.whl; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__, 'GPUs', torch.cuda.device_count())"
start=$(date +%s)
for model in vit-b16 gpt2-125m; do
  for backend in fsdp2 ddp; do
    # one launch per model and backend: Accelerate's FSDP plugin fixes the layers it shards on the first model
    log="$out/$backend-$model.log"
    if timeout 110 "$python" -m accelerate.commands.launch --config_file "recipes/accelerate_configs/$backend.yaml" \
        --num_processes "$nproc" --main_process_port 0 recipes/benchmarks/fsdp2_gpu.py \
        --backend "$backend" --model "$model" --output_dir "$out" >"$log" 2>&1; then
      echo "$model $backend: done after $(( $(date +%s) - start )) s"
    else
      echo "$model $backend: FAILED after $(( $(date +%s) - start )) s; the end of $log:"
      tail -n 20 "$log"
    fi
  done
done
"$python" recipes/benchmarks/fsdp2_gpu.py --report --output_dir "$out"
