source .device/setup.sh >/dev/null 2>&1; set -x
mkdir -p /tmp/ggufs
for spec in pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q4_0 redpajama-3b:f16; do m=${spec%%:*}; d=${spec##*:}; python3 .device/make_random_neox_gguf.py --preset $m --dtype $d -o /tmp/ggufs/$m-$d.gguf >/dev/null; done
S="pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q4_0 redpajama-3b:f16"
(cd .old && timeout 250 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "$S" --json $OUT/old2.json 2>&1 | grep -E "RESULT|Error|device")
timeout 250 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "$S" --json $OUT/new2.json 2>&1 | grep -E "RESULT|Error|device"
TENSORGPU_PLAIN_GGUF=/tmp/ggufs/pythia-1.4b-q4_0.gguf TENSORGPU_PLAIN_STEPS=64 timeout 150 python3 -m pytest benchmarks/bench_plain_model.py --benchmark-only -q -s -p no:cacheprovider 2>&1 | grep -E "plain |passed|failed|Error"
