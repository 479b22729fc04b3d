# Session 7, run 1: tensor-core tests on the GPU, and per-kernel GPU profiles of TinyLlama-1.1B f16
# decode against pythia-1.4b f16 (where a llama layer's time goes), plus a B = 1 / 64 step profile.
set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
echo "== coop tests"; timeout 100 python3 -m pytest tests/test_kernel_matmul_coop.py -q -p no:cacheprovider 2>&1 | tail -4
echo "== profiles"; timeout 220 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "tinyllama-1.1b:f16 pythia-1.4b:f16" --profile --json $OUT/models.json 2>&1 | grep -v "^load" | grep -v RESULT
echo "== batch q4_0"; timeout 100 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-q4_0.gguf --batches 1,64 --profile --json $OUT/batch-q4_0.json 2>&1 | grep -v -E "RESULT|loading" | tail -40
