# Session 8, run 1: (a) the tensor-core tests on the GPU, including K parts (test_coop_k_parts), never run
# on a GPU before; (b) prefill 512 with matmul_coop.TUNING k_parts off (default) / on, alternating processes;
# (c) the engine's B = 1 step in engines of 64, 1 and 8 slots (the slow-readback bisect); (d) TinyLlama's
# small GEMVs under other workgroup shapes (warm per-kernel decode profile).
set -uo pipefail
mkdir -p /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do [ -f /tmp/ggufs/pythia-1.4b-$d.gguf ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
[ -f /tmp/ggufs/tinyllama-1.1b-f16.gguf ] || python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
echo "== (a) tensor-core tests"
timeout 150 python3 -m pytest tests/test_kernel_matmul_coop.py -q -p no:cacheprovider -x 2>&1 | tail -n 6
echo "== (b) prefill k_parts"
for kp in 0 1 0 1; do
  echo "-- coop.k_parts=$kp"
  timeout 45 python3 -c "
import sys, runpy; sys.path.insert(0, 'benchmarks'); import tuning; tuning.apply('coop.k_parts=$kp')
sys.argv = ['models', 'bench', '-m', '/tmp/ggufs/pythia-1.4b-f16.gguf', '-p', '512', '-n', '0', '-r', '3']
runpy.run_module('models', run_name='__main__')" 2>&1 | grep -E "pp512|tok/s|Error|error" | tail -2
done
echo "== (c) B = 1 step by engine size"
for mb in 64 1 64 8; do
  echo "-- max-batch $mb"
  timeout 45 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-q4_0.gguf --batches 1 --max-batch $mb --ctx 512 --steps 48 --gen 16 2>&1 | grep -E "^B=|Session|wait|map" | cut -c1-300
done
echo "== (d) TinyLlama small GEMVs"
timeout 110 python3 benchmarks/decode_profile.py --dir /tmp/ggufs --specs "tinyllama-1.1b:f16" \
  --tune "gemv.threads=64;gemv.threads=256;gemv.rows=2" 2>&1 | grep -E "===|RESULT|gemv|attention|total"
