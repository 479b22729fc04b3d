# Session 8, run 3a: llama.cpp 3f545bec's CUDA llama-bench built on the machine in the background (nice 19;
# kept in /tmp/llb for run 3b, the next call on the same warm machine), the random-weight GGUFs, and
# meanwhile the GPU-timestamped figures: every format's decode GEMV on pythia-1.4b / redpajama-3b shapes
# beside a same-size copy, and HF transformers (eager and compiled) on pythia-160m / 1.4b.
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/ggufs
rm -rf /tmp/llsrc && cp -r .device/llamacpp /tmp/llsrc
( nice -n 19 bash /tmp/llsrc/build_cuda.sh > /tmp/llamacpp_build.log 2>&1; echo done >> /tmp/llamacpp_build.log ) &
for m in pythia-160m:f16 pythia-160m:q4_0 pythia-1.4b:f16 pythia-1.4b:q4_0 redpajama-3b:q4_0; do p=${m%%:*}; d=${m##*:}
  python3 .device/make_random_neox_gguf.py --preset $p --dtype $d -o /tmp/ggufs/$p-$d.gguf >/dev/null; done
for d in f16 q8_0 q4_0 q4_k_m; do python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype $d -o /tmp/ggufs/tinyllama-1.1b-$d.gguf >/dev/null; done
ls -la /tmp/ggufs
echo "== GEMV table"
TENSORGPU_BENCH_FULL=1 TENSORGPU_QGEMV_SHAPES=pythia TENSORGPU_QGEMV_TYPES=float16,q4_0,q8_0,q4_k,q6_k,q5_k,q4_1,q5_0,q5_1,bfloat16 \
  timeout 230 python3 -m pytest benchmarks/bench_quant_gemv.py -k gemv -q -s -p no:cacheprovider --benchmark-max-time=0.01 \
  --benchmark-min-rounds=1 --benchmark-json=$OUT/gemv.json 2>&1 | grep -E 'qgemv|passed|failed' | cut -c1-400 | tee $OUT/gemv.txt
echo "== HF transformers"
timeout 170 python3 .device/baseline_torch_neox.py --models pythia-160m,pythia-1.4b --compile pythia-160m,pythia-1.4b --json $OUT/torch.json 2>&1 | grep -E "RESULT|rror" | cut -c1-300
for i in $(seq 400); do grep -q '^done' /tmp/llamacpp_build.log && break; sleep 1; done
ls -la /tmp/llb/cuda/llama-bench && ls /tmp/llsrc/llama.cpp-*-src.tar.xz | sed 's/.*llama.cpp-\(.*\)-src.*/llama.cpp commit \1/'
tail -2 /tmp/llamacpp_build.log
