set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
TENSORGPU_BENCH_FULL=1 TENSORGPU_SMALLM_M=512 timeout 120 python3 -m pytest benchmarks/bench_matmul.py -k "small_m_sweep and float16" -s -q \
   -p no:randomly -p no:cacheprovider --benchmark-only --benchmark-json=$OUT/small_m_512.json 2>&1 | grep -E "M=512:|x[0-9]+: |passed|failed" | tail -12
for bk in 32 64; do for m in pythia-1.4b-f16 tinyllama-1.1b-f16; do echo "bk=$bk $m"; TENSORGPU_COOP_BK=$bk timeout 100 python3 -m models bench -m /tmp/ggufs/$m.gguf -p 512 -n 128 -r 5 | grep -E "pp512|tg128" | tee -a $OUT/bench_pp.md; done; done
for d in f16 q4_0; do echo "== batch $d"; timeout 120 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-$d.gguf --batches 1,16,64 --json $OUT/batch-$d.json 2>&1 | grep -v -E "RESULT|loading" | tail -5; done
echo "== serve q4_0"; timeout 260 python3 benchmarks/bench_serve.py --model /tmp/ggufs/pythia-1.4b-q4_0.gguf --concurrency 1,16,64 --out $OUT/serve-q4_0.json 2>&1 | tail -8
