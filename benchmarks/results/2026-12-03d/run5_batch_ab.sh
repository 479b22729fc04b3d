# Session 7, run 5: same-machine A/B of a B = 64 decode step (pythia-1.4b): workgroups the tensor-core
# split-K aims for (coop.target_wgs, default 264) and keys per workgroup of the batched decode attention.
set -uo pipefail
mkdir -p /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in q4_0 f16; do [ -f /tmp/ggufs/pythia-1.4b-$d.gguf ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
run() { echo "== $1 [$2]"; timeout 60 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-$1.gguf --batches 1,64 --steps 16 --gen 32 --profile --tune "$2" 2>&1 | grep -E "^B=|profile B=64" | cut -c1-330; }
for t in "" "coop.target_wgs=528" "coop.target_wgs=1056" "attention.chunk=128" "attention.chunk=32"; do run q4_0 "$t"; done
for t in "" "coop.target_wgs=528"; do run f16 "$t"; done
