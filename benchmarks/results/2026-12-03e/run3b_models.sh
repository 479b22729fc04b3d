# Session 8, run 3b (the call after 3a on the same warm machine, no build running): our prefill 512, decode,
# first-token latency and host time per step on nine random-weight GGUFs, then llama.cpp CUDA on the same
# files (`llama-bench -p 512 -n 128 -r 3 -ngl 99 -fa 1`), then the replayed decode step under py-spy --native.
set -uo pipefail
export PYTHONUNBUFFERED=1
S="pythia-160m:f16 pythia-160m:q4_0 pythia-1.4b:f16 pythia-1.4b:q4_0 redpajama-3b:q4_0 tinyllama-1.1b:f16 tinyllama-1.1b:q8_0 tinyllama-1.1b:q4_0 tinyllama-1.1b:q4_k_m"
timeout 330 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "$S" --json $OUT/models.json 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    _, name, js = l.split(' ', 2); d = json.loads(js)
    print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items() if k in ('load_s', 'prefill_first_s', 'prefill_session_tok_s', 'decode_first_step_s', 'decode_tok_s', 'decode_session_tok_s', 'host_ms_per_step', 'host_ms_split', 'dispatches_per_layer', 'error')})"
F=$(for s in $S; do echo -n "/tmp/ggufs/${s%%:*}-${s##*:}.gguf,"; done)
LD_LIBRARY_PATH=/tmp/llb/cuda timeout 200 /tmp/llb/cuda/llama-bench -m ${F%,} -p 512 -n 128 -r 3 -ngl 99 -fa 1 -o jsonl > $OUT/llamacpp.jsonl 2>/dev/null
python3 -c "
import json
for l in open('$OUT/llamacpp.jsonl'):
    r = json.loads(l); print(r.get('model_filename', '').split('/')[-1], r.get('n_prompt'), r.get('n_gen'), round(r.get('avg_ts', 0), 1), '+-', round(r.get('stddev_ts', 0), 1))
"
for m in pythia-160m-f16 pythia-1.4b-f16; do
  timeout 60 python3 benchmarks/host_profile.py --gguf /tmp/ggufs/$m.gguf --seconds 12 > /tmp/hp_$m.log 2>&1 & P=$!
  for i in $(seq 200); do grep -q WARM /tmp/hp_$m.log && break; sleep 0.2; done
  timeout 30 /tmp/site/bin/py-spy record --native -r 200 -d 5 -f raw -o /tmp/spy_$m.txt -p $P > /dev/null 2>&1 || echo "py-spy: $?"
  wait $P; grep -E "RESULT|rror" /tmp/hp_$m.log
  python3 benchmarks/host_profile.py --fold /tmp/spy_$m.txt
done
tar czf $OUT/spy.tgz /tmp/spy_*.txt 2>/dev/null
