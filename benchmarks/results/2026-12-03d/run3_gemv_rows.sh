# Session 7, run 3: same-run A/B of GEMV rows per workgroup on TinyLlama-1.1B (the SwiGLU down
# projection recomputes silu(gate) * up per workgroup) and pythia-1.4b, warm per-kernel profiles.
set -uo pipefail
mkdir -p /tmp/ggufs
export PYTHONUNBUFFERED=1
python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype f16 -o /tmp/ggufs/pythia-1.4b-f16.gguf >/dev/null
for d in f16 q4_0; do python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype $d -o /tmp/ggufs/tinyllama-1.1b-$d.gguf >/dev/null; done
timeout 250 python3 benchmarks/decode_profile.py --dir /tmp/ggufs --specs "tinyllama-1.1b:f16 tinyllama-1.1b:q4_0" \
  --tune "gemv.glu_rows=4;gemv.glu_rows=8;gemv.glu_rows=16;gemv.rows=2;gemv.rows=4;gemv.rows=4,gemv.glu_rows=8" 2>&1 | grep -E "===|RESULT|gemv|attention|argmax|total"
timeout 120 python3 benchmarks/decode_profile.py --dir /tmp/ggufs --specs "pythia-1.4b:f16" --tune "gemv.rows=2;gemv.rows=4" 2>&1 | grep -E "===|RESULT|gemv|attention|argmax|total"
