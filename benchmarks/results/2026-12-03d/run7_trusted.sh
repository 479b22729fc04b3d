# Session 7, run 7: shader modules without naga's runtime checks (TENSORGPU_TRUSTED_SHADERS=1,
# wgpuDeviceCreateShaderModuleTrusted with ShaderRuntimeChecks None) against the checked ones: decode
# (per-kernel profile + tok/s) and prefill 512, alternating processes.
set -uo pipefail
mkdir -p /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do [ -f /tmp/ggufs/pythia-1.4b-$d.gguf ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
[ -f /tmp/ggufs/tinyllama-1.1b-f16.gguf ] || python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
for t in 0 1 0 1; do
  echo "== TENSORGPU_TRUSTED_SHADERS=$t"
  TENSORGPU_TRUSTED_SHADERS=$t timeout 70 python3 benchmarks/decode_profile.py --dir /tmp/ggufs --specs "pythia-1.4b:q4_0 tinyllama-1.1b:f16" 2>&1 | grep -E "RESULT|^gemv|^attention|^total"
  TENSORGPU_TRUSTED_SHADERS=$t timeout 40 python3 -m models bench -m /tmp/ggufs/pythia-1.4b-f16.gguf -p 512 -n 0 -r 3 2>&1 | grep -E "pp512|tok/s" | tail -2
done
