# Session 7, run 4b (the call after 4a on the same warm machine, no build running): our prefill 512
# and decode of pythia-1.4b and TinyLlama-1.1B f16 / q4_0, then llama.cpp CUDA on the same files.
set -uo pipefail
mkdir -p $OUT
export PYTHONUNBUFFERED=1
timeout 300 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "pythia-1.4b:f16 pythia-1.4b:q4_0 tinyllama-1.1b:f16 tinyllama-1.1b:q4_0" --json $OUT/models.json 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    _, name, js = l.split(' ', 2); d = json.loads(js)
    print(name, {k: (round(v, 1) if isinstance(v, float) else v) for k, v in d.items() if k in ('prefill_session_tok_s', 'decode_tok_s', 'decode_session_tok_s', 'host_ms_per_step', 'dispatches_per_layer')})"
LD_LIBRARY_PATH=/tmp/llb/cuda timeout 200 /tmp/llb/cuda/llama-bench -m /tmp/ggufs/pythia-1.4b-f16.gguf,/tmp/ggufs/pythia-1.4b-q4_0.gguf,/tmp/ggufs/tinyllama-1.1b-f16.gguf,/tmp/ggufs/tinyllama-1.1b-q4_0.gguf -p 512 -n 128 -r 3 -ngl 99 -fa 1 -o jsonl > $OUT/llamacpp.jsonl 2>/dev/null
python3 -c "
import json
for l in open('$OUT/llamacpp.jsonl'):
    r = json.loads(l); print(r.get('model_filename', '').split('/')[-1], r.get('n_prompt'), r.get('n_gen'), round(r.get('avg_ts', 0), 1), '+-', round(r.get('stddev_ts', 0), 1))
"
