source .device/setup.sh >/dev/null 2>&1
(nice -n 19 bash .device/llamacpp/build_cuda.sh > /tmp/build.out 2>&1; echo built >> /tmp/build.out) &
mkdir -p /tmp/gg
for d in f16 q8_0 q4_0 q4_k_m; do python3 benchmarks/make_random_llama_gguf.py --dtype $d -o /tmp/gg/tinyllama-1.1b-$d.gguf; done
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/gg/pythia-1.4b-$d.gguf >/dev/null; done
timeout 330 python3 benchmarks/run_models.py --dir /tmp/gg --specs "tinyllama-1.1b:f16 tinyllama-1.1b:q8_0 tinyllama-1.1b:q4_0 tinyllama-1.1b:q4_k_m pythia-1.4b:f16 pythia-1.4b:q4_0" --json $OUT/llama_ours.json 2>&1 | grep -E "RESULT|Error|device" | cut -c1-1500
TENSORGPU_PLAIN_GGUF=/tmp/gg/pythia-1.4b-q4_0.gguf TENSORGPU_PLAIN_STEPS=64 timeout 120 python3 -m pytest benchmarks/bench_plain_model.py --benchmark-only -q -s -p no:cacheprovider 2>&1 | grep -E "plain |passed|failed|Error"
for i in $(seq 120); do grep -q built /tmp/build.out && break; sleep 2; done; tail -2 /tmp/build.out
L=/tmp/gg/tinyllama-1.1b; LD_LIBRARY_PATH=/tmp/llb/cuda timeout 150 /tmp/llb/cuda/llama-bench -m $L-f16.gguf,$L-q8_0.gguf,$L-q4_0.gguf,$L-q4_k_m.gguf,/tmp/gg/pythia-1.4b-f16.gguf -p 512 -n 128 -r 3 -ngl 99 -fa 1 -o jsonl > $OUT/llamacpp.jsonl 2>$OUT/llamacpp.err; tail -3 $OUT/llamacpp.err; python3 -c "
import json,sys
for l in open('$OUT/llamacpp.jsonl'):
    r=json.loads(l); print(r.get('model_filename','').split('/')[-1], r.get('n_prompt'), r.get('n_gen'), round(r.get('avg_ts',0),1))"
