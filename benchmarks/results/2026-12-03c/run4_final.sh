set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
timeout 60 python3 -m pytest tests/test_kernel_matmul_coop.py -q -p no:cacheprovider 2>&1 | tail -2
timeout 200 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "pythia-1.4b:f16 pythia-1.4b:q4_0 tinyllama-1.1b:f16" --json $OUT/models.json 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    _, name, js = l.split(' ', 2); d = json.loads(js)
    print(name, {k: d.get(k) for k in ('prefill_session_tok_s', 'decode_tok_s', 'decode_session_tok_s', 'host_ms_per_step')})"
for d in q4_0 f16; do echo "== batch $d"; timeout 100 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-$d.gguf --batches 1,64 --profile --json $OUT/batch-$d.json 2>&1 | grep -v -E "RESULT|loading" | tail -6; done
