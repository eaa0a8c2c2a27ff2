#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one go, within about 8 minutes on an H100/H200 (the
# timeouts below allow 9.5 at most: one device command may run 10). The timeouts were cut to make room
# for issue 24's two (7 and 8) without a GPU run to size them: a bench that runs past its timeout is
# reported ("exit 124") and the others still run.
# Run it from the repository root on a lent GPU machine (device tool: `bash bench/gpu.sh`); it writes
# JSON under bench/results/ named after the GPU (and copies it to $OUT when that is set), to commit.
#
# The GPU image has torch, transformers, safetensors, pyyaml, pyarrow and peft; nothing can be fetched
# there, so the benches use models built from a config with random weights (no download): throughput
# and memory are the architecture's.
#   1. bench/pack.py: the same 8 trials with pack K = 1, 2, 4, 8 on SmolLM2-135M's architecture in
#      bf16, 8 x 64 tokens per trial, all-linear r = 8 and mixed ranks 1..64 (trials/hour, step time
#      per trial, peak memory, ratios to K = 1).
#   2. bench/vs_trainer.py: the same trial by lora-sweep and by transformers.Trainer with a PEFT model
#      (SmolLM2-135M-shaped, bf16, 16 x 128 random tokens, q,v r=8, 100 steps, 2 seeds; the Trainer with
#      its default random batches and with group_by_length): step time, tokens/s, peak memory, final
#      validation loss, ratios.
#   3. bench/checkpointing.py: gradient checkpointing off / on, SmolLM2-135M-shaped, bf16, 8 x 256 tokens,
#      all-linear r = 8 (peak CUDA memory, step time, loss difference).
#   4. bench/oom_retry.py: a batch of 64 x 256 tokens under a memory limit of 1.6x what micro-batch 8
#      needs: the trial halves its micro-batch until it fits and trains as if run with it directly.
#   5. bench/quantized.py: a bf16, a 4-bit (NF4) and an 8-bit (LLM.int8) SmolLM2-135M-shaped base, 10 LoRA
#      steps of 8 x 256 tokens each, the adapter reloaded by PEFT on the same quantized base (weights and
#      peak memory against bf16, step time, PEFT logits difference). bitsandbytes is not in the image: the
#      bench then reports itself skipped, unless a copy travels in bench/vendor (`pip install --no-deps
#      --target bench/vendor bitsandbytes==0.50.2`, keeping only the libbitsandbytes_cuda*.so that matches
#      the image's torch.version.cuda, ~25 MB).
#   6. bench/layer.py: lora_core's layer against PEFT and the no-LoRA lower bound on GPT-2-shaped layers.
#   7. bench/attention_check.py (issue 24): per-trial attention dropout on CUDA (the counter hash): a pack
#      of two gives each trial the masks and logits it gets alone, two seeds differ, the dropped share
#      matches the rate (tiny BERT and GQA Llama from configs; exit 1 if a check fails).
#   8. bench/pack.py --attention (issue 24): step time with per-trial attention dropout (rate 0.1, eager
#      attention in training) against attention dropout off (SDPA), alone and at K = 4, side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d bench/vendor ]; then export PYTHONPATH="$PWD/bench/vendor${PYTHONPATH:+:$PYTHONPATH}"; fi
mkdir -p bench/results
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name(0).lower().replace('nvidia ', '').replace(' ', '-'))")
echo "# GPU: $gpu"
status=0
# run NAME SECONDS CMD...: one bench under a timeout; its JSON is copied to $OUT as soon as it is written, so
# what finished comes back even if a later bench runs past the device's 10-minute limit on one command
run() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" --out "bench/results/$name-$gpu.json" || { echo "# $name: exit $?"; status=1; }
    echo "# $name: $((SECONDS - t0)) s"
    if [ -n "${OUT:-}" ] && [ -f "bench/results/$name-$gpu.json" ]; then cp "bench/results/$name-$gpu.json" "$OUT"/; fi
}
# the timeouts add up to 570 s, under the device's 600 s for one command
run attention-check 25 $PY bench/attention_check.py --device cuda
run pack 140 $PY bench/pack.py --model smollm2-shaped --device cuda --cases all-linear-r8,mixed --trials 8 \
    --steps 20 --repeats 1 --no-legacy
run pack-attention 70 $PY bench/pack.py --model smollm2-shaped --device cuda --cases all-linear-r8 --trials 4 \
    --steps 10 --repeats 1 --packs 1,4 --attention --attention-rate 0.1
run vs-trainer 120 $PY bench/vs_trainer.py --cases smollm2-shaped --seeds 0,1 --steps smollm2-shaped=100 --device cuda \
    --sides ours,trainer,trainer-grouped
run checkpointing 50 $PY bench/checkpointing.py --model smollm2-shaped --device cuda --steps 10 --batch 8 --length 256
run oom-retry 40 $PY bench/oom_retry.py
run quantized 80 $PY bench/quantized.py --model smollm2-shaped --device cuda --steps 10 --batch 8 --length 256
run layer 45 $PY bench/layer.py --models gpt2-shaped --device cuda --repeats 5
exit $status
