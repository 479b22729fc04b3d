source .device/setup.sh >/dev/null 2>&1
mkdir -p /tmp/gg
python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype q4_0 -o /tmp/gg/pythia-1.4b-q4_0.gguf >/dev/null
timeout 120 python3 benchmarks/bench_serve.py --model /tmp/gg/pythia-1.4b-q4_0.gguf --concurrency 1,16,64 --out $OUT/serve2_q4_0.json --log $OUT/server2_q4_0.log 2>&1 | tail -n 6
timeout 90 python3 benchmarks/batch_decode.py --gguf /tmp/gg/pythia-1.4b-q4_0.gguf --batches 1,16,64 --steps 16 --json $OUT/b4_q4_0.json 2>&1 | grep -v -E "RESULT|loading"
