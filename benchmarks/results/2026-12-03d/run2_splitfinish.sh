# Session 7, run 2: the split-K finish in the kernel (matmul TUNING split_finish="last") on the GPU:
# the tensor-core tests, a B = 1 / 64 step (profiled, host split) against the reduce pass, the coop
# K step at B = 64, and warm per-kernel decode profiles of TinyLlama-1.1B / pythia-1.4b f16.
set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
echo "== coop + matmul tests"; timeout 120 python3 -m pytest tests/test_kernel_matmul_coop.py tests/test_kernel_matmul.py -q -p no:cacheprovider -k "coop or split" 2>&1 | tail -4
g=/tmp/ggufs/pythia-1.4b-q4_0.gguf
for t in "matmul.split_finish=pass" "" "coop.bk_small=64"; do
  echo "== batch q4_0 tune=[$t]"; timeout 90 python3 benchmarks/batch_decode.py --gguf $g --batches 1,64 --profile --tune "$t" --json $OUT/batch-q4_0-${t:-default}.json 2>&1 | grep -E "^B=|profile|Session" | cut -c1-400
done
echo "== profiles"; timeout 200 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "tinyllama-1.1b:f16 pythia-1.4b:f16" --profile --json $OUT/models.json 2>&1 | grep -v "^load" | grep -v RESULT
