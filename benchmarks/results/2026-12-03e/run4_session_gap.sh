# Session 8, run 4: is TinyLlama's Session decode below our own pipelined loop (run 3b: 509 vs 753 tok/s, f16)
# reproducible? Two processes, the models in opposite orders.
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/ggufs
python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype f16 -o /tmp/ggufs/pythia-1.4b-f16.gguf >/dev/null
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
for S in "tinyllama-1.1b:f16 pythia-1.4b:f16" "pythia-1.4b:f16 tinyllama-1.1b:f16"; do
  echo "== $S"
  timeout 150 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "$S" 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    _, name, js = l.split(' ', 2); d = json.loads(js)
    print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items() if k in ('decode_tok_s', 'decode_blocking_tok_s', 'decode_lag2_tok_s', 'decode_session_tok_s', 'prefill_session_tok_s', 'host_ms_per_step')})"
done
