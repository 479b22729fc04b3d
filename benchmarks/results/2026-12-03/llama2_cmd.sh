source .device/setup.sh >/dev/null 2>&1
mkdir -p /tmp/gg
for d in f16 q8_0 q4_0 q4_k_m; do python3 benchmarks/make_random_llama_gguf.py --dtype $d -o /tmp/gg/tinyllama-1.1b-$d.gguf 2>/dev/null; done
python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype f16 -o /tmp/gg/pythia-1.4b-f16.gguf >/dev/null
timeout 400 python3 benchmarks/run_models.py --dir /tmp/gg --specs "tinyllama-1.1b:f16 tinyllama-1.1b:q8_0 tinyllama-1.1b:q4_0 tinyllama-1.1b:q4_k_m pythia-1.4b:f16" --json $OUT/llama_ours2.json 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    spec, r = l.split(' ', 2)[1:]; r = json.loads(r)
    print(spec, {k: r.get(k) for k in ('decode_session_tok_s', 'decode_tok_s', 'prefill_session_tok_s', 'dispatches_per_layer', 'host_ms_per_step', 'session_tokens_match', 'error')})"
