#!/bin/bash
# The GPU-machine benchmark run (see README "Benchmarks on the GPU machine").
# Usage, on the GPU machine from the repo root (after `source .device/setup.sh`):
#   bash benchmarks/gpu.sh [kernels] [models] [baseline] [llamacpp] [serve] [batch] [bench] [coop] [profile]
#   (default: kernels models baseline llamacpp)
# profile: warm per-kernel decode profiles (benchmarks/decode_profile.py) of $PROFILE_SPECS (default
# TinyLlama-1.1B and pythia-1.4b f16), each setting of $TUNE (";"-separated knob settings and off:rule
# graph rules, e.g. TUNE="gemv.rows=4;off:fold_glu_into_gemv") measured after the defaults in one process.
# coop: the tensor-core matmuls' NumPy tests on this GPU (tests/test_kernel_matmul_coop.py), then the
# small-M sweep at M = 16, 64, 512 with every coop variant beside the WGSL tiles (into $OUT/coop_sweep.json).
# For clean host-bound figures run it without llamacpp, whose build runs in the background of every step.
# llamacpp: llama.cpp's CUDA llama-bench (-p 512 -n 128 -fa 1) on the same GGUFs as the models step, and its
# llama-batched-bench (B = 1/4/16/64) on pythia-1.4b f16/q4_0, built on the machine from the tarball in
# .device/llamacpp (`build_cuda.sh`, ~4.5 min, started first in the background); into $OUT/llamacpp*.
# batch: benchmarks/batch_decode.py (one engine step of B = 1/4/16/64 sequences) on pythia-1.4b f16/q4_0.
# bench: `tensorgpu bench` (llama-bench's table: pp512 / tg128 through Session) on the GGUFs the
# models step made, into $OUT/bench.md.
# Writes everything under $OUT (default /tmp/tg-bench): kernels.json (pytest-benchmark),
# models.json (our prefill/decode), torch.json (PyTorch baseline), serve-*.json (the OpenAI server
# through HTTP at 1/4/16/64 streams, benchmarks/bench_serve.py), clocks.log, and a log.
# `serve` needs the serve extra's packages there: fastapi uvicorn prometheus_client httpx.
set -uo pipefail
OUT=${OUT:-/tmp/tg-bench}
mkdir -p "$OUT"
what=${*:-kernels models baseline llamacpp}
export TENSORGPU_BENCH_FULL=1 PYTHONUNBUFFERED=1
clocks() { nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader >> "$OUT/clocks.log" 2>&1 || true; }
clocks
( while sleep 5; do clocks; done ) & CLK=$!
trap 'kill $CLK 2>/dev/null' EXIT
if [[ " $what " == *" llamacpp "* ]]; then   # the build overlaps our own steps
  rm -rf /tmp/llsrc && cp -r .device/llamacpp /tmp/llsrc
  sed -e 's/--target llama-bench /--target llama-bench llama-batched-bench /' \
      -e 's#cp -a build-cuda/bin/llama-bench #cp -a build-cuda/bin/llama-bench build-cuda/bin/llama-batched-bench #' \
      .device/llamacpp/build_cuda.sh > /tmp/llsrc/build_cuda.sh
  ( nice -n 19 bash /tmp/llsrc/build_cuda.sh > "$OUT/llamacpp_build.log" 2>&1; echo done >> "$OUT/llamacpp_build.log" ) &
fi
python3 -c "import tensorgpu as tg; d = tg.device(); print('adapter:', d['name'], d['backend'], 'f16' if d['f16'] else 'no-f16', 'subgroups' if d['subgroups'] else '', 'tensor-cores' if d['coopmat'] else 'no-tensor-cores', 'trusted-shaders' if d['trusted_shaders'] else 'checked-shaders')"
if [[ " $what " == *" coop "* ]]; then
  timeout "${T_COOP_TESTS:-150}" python3 -m pytest tests/test_kernel_matmul_coop.py -q -p no:cacheprovider 2>&1 | tail -n 15
  TENSORGPU_SMALLM_M=${COOP_M:-16,64,512} timeout "${T_COOP:-330}" python3 -m pytest benchmarks/bench_matmul.py -k small_m_sweep \
    -s -q -p no:randomly -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/coop_sweep.json" 2>&1 \
    | grep -E "M=|x[0-9]+: |passed|failed" | tail -n 40
fi
if [[ " $what " == *" profile "* ]]; then
  mkdir -p /tmp/ggufs
  for spec in ${PROFILE_SPECS:-tinyllama-1.1b:f16 pythia-1.4b:f16}; do
    m=${spec%%:*}; d=${spec##*:}; f=/tmp/ggufs/$m-$d.gguf
    [ -f "$f" ] && continue
    case $m in
      tinyllama*) python3 benchmarks/make_random_llama_gguf.py --preset "$m" --dtype "$d" -o "$f" >/dev/null ;;
      *) python3 .device/make_random_neox_gguf.py --preset "$m" --dtype "$d" -o "$f" >/dev/null ;;
    esac
  done
  timeout "${T_PROFILE:-300}" python3 benchmarks/decode_profile.py --dir /tmp/ggufs --specs "${PROFILE_SPECS:-tinyllama-1.1b:f16 pythia-1.4b:f16}" \
    --tune "${TUNE:-}" 2>&1 | tee "$OUT/profile.txt" | grep -E "===|RESULT|total"
fi
if [[ " $what " == *" kernels "* ]]; then
  # each benchmark warms the GPU >= 300 ms before timing (kernels/probe.py: warm_up)
  timeout "${T_KERNELS:-300}" python3 -m pytest benchmarks/ -q -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/kernels.json" \
    -k "${BENCH_K:-not sweep and not decode and not prefill}" 2>&1 | tail -n 60
fi
if [[ " $what " == *" models "* ]]; then
  mkdir -p /tmp/ggufs
  for spec in ${MODELS:-pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q8_0 pythia-1.4b:q4_0 redpajama-3b:f16 redpajama-3b:q4_0}; do
    m=${spec%%:*}; d=${spec##*:}
    if [ "$d" = q4_k_m ]; then   # k-quants: random blocks with the f16 file's shapes (benchmarks/make_kmix_gguf.py)
      [ -f /tmp/ggufs/$m-f16.gguf ] || python3 .device/make_random_neox_gguf.py --preset "$m" --dtype f16 -o /tmp/ggufs/$m-f16.gguf >/dev/null
      [ -f /tmp/ggufs/$m-$d.gguf ] || python3 benchmarks/make_kmix_gguf.py /tmp/ggufs/$m-f16.gguf /tmp/ggufs/$m-$d.gguf 2>/dev/null
      continue
    fi
    [ -f /tmp/ggufs/$m-$d.gguf ] || python3 .device/make_random_neox_gguf.py --preset "$m" --dtype "$d" -o /tmp/ggufs/$m-$d.gguf >/dev/null
  done
  timeout "${T_MODELS:-400}" python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "${MODELS:-pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q8_0 pythia-1.4b:q4_0 redpajama-3b:f16 redpajama-3b:q4_0}" --json "$OUT/models.json" ${PROFILE:+--profile}
fi
if [[ " $what " == *" bench "* ]]; then
  for spec in ${MODELS:-pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q8_0 pythia-1.4b:q4_0 redpajama-3b:f16 redpajama-3b:q4_0}; do
    f=/tmp/ggufs/${spec/:/-}.gguf
    if [ -f "$f" ]; then timeout "${T_BENCH:-300}" python3 -m models bench -m "$f" -r "${BENCH_REPS:-5}" | tee -a "$OUT/bench.md"
    else echo "bench: $f is missing (run the models step first)"; fi
  done
fi
if [[ " $what " == *" baseline "* ]]; then
  timeout "${T_BASELINE:-400}" python3 .device/baseline_torch_neox.py --models "${TORCH_MODELS:-pythia-160m,pythia-1.4b,redpajama-3b}" \
    --compile "${TORCH_COMPILE:-pythia-160m,pythia-1.4b,redpajama-3b}" --prims --json "$OUT/torch.json" 2>&1 | grep -E "RESULT|Error|error" | tail -n 60
fi
if [[ " $what " == *" serve "* ]]; then
  # 128-token random prompts, 128 greedy tokens each (ignore_eos), 2 requests per stream per level
  mkdir -p /tmp/ggufs
  for d in ${SERVE_DTYPES:-f16 q4_0}; do
    g=/tmp/ggufs/pythia-1.4b-$d.gguf
    [ -f "$g" ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype "$d" -o "$g" >/dev/null
    timeout "${T_SERVE:-500}" python3 benchmarks/bench_serve.py --model "$g" --concurrency "${SERVE_CONCURRENCY:-1,4,16,64}" \
      ${SERVE_ARGS:+--server-args "$SERVE_ARGS"} \
      --out "$OUT/serve-pythia-1.4b-$d.json" 2>&1 | tail -n 12
  done
fi
if [[ " $what " == *" batch "* ]]; then
  mkdir -p /tmp/ggufs
  for d in ${BATCH_DTYPES:-f16 q4_0}; do
    g=/tmp/ggufs/pythia-1.4b-$d.gguf
    [ -f "$g" ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype "$d" -o "$g" >/dev/null
    timeout "${T_BATCH:-200}" python3 benchmarks/batch_decode.py --gguf "$g" --batches "${BATCHES:-1,4,16,64}" \
      ${BATCH_MAX:+--max-batch $BATCH_MAX} --json "$OUT/batch-pythia-1.4b-$d.json" \
      2>&1 | grep -v -E "RESULT|loading"
  done
fi
if [[ " $what " == *" llamacpp "* ]]; then
  for i in $(seq "${T_LLAMACPP_BUILD:-300}"); do grep -q '^done' "$OUT/llamacpp_build.log" && break; sleep 1; done
  ls /tmp/llsrc/llama.cpp-*-src.tar.xz | sed 's/.*llama.cpp-\(.*\)-src.*/llama.cpp commit \1/' | tee "$OUT/llamacpp.txt"
  if [ -x /tmp/llb/cuda/llama-bench ]; then
    ggufs=$(ls /tmp/ggufs/*.gguf 2>/dev/null | paste -sd, -)
    [ -n "$ggufs" ] && LD_LIBRARY_PATH=/tmp/llb/cuda timeout "${T_LLAMACPP:-300}" /tmp/llb/cuda/llama-bench -m "$ggufs" \
      -p 512 -n 128 -r 3 -ngl 99 -fa 1 -o jsonl > "$OUT/llamacpp.jsonl" 2>> "$OUT/llamacpp.txt"
    for d in f16 q4_0; do
      g=/tmp/ggufs/pythia-1.4b-$d.gguf
      [ -f "$g" ] && LD_LIBRARY_PATH=/tmp/llb/cuda timeout 120 /tmp/llb/cuda/llama-batched-bench -m "$g" -c 20000 -b 2048 \
        -ub 512 -npp 128 -ntg 128 -npl 1,4,16,64 -ngl 99 -fa on 2>/dev/null | grep -E "^\|" | tee -a "$OUT/llamacpp_batched.md"
    done
    python3 -c "
import json
for l in open('$OUT/llamacpp.jsonl'):
    r = json.loads(l); print(r.get('model_filename', '').split('/')[-1], r.get('n_prompt'), r.get('n_gen'), round(r.get('avg_ts', 0), 1))
" 2>/dev/null
  else
    echo "llamacpp: the build did not finish (see $OUT/llamacpp_build.log)"; tail -n 5 "$OUT/llamacpp_build.log"
  fi
fi
