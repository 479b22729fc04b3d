source .device/setup.sh >/dev/null 2>&1
mkdir -p /tmp/gg
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/gg/pythia-1.4b-$d.gguf >/dev/null; done
run() { timeout 150 python3 benchmarks/batch_decode.py --gguf /tmp/gg/pythia-1.4b-$1.gguf --batches 1,4,16,64 --steps 16 --json $OUT/b2_$1_$2.json $3 2>&1 | grep -v -E "RESULT|loading"; }
run f16 A --profile
run q4_0 A --profile
run q4_0 B "--tune quant.gemv_max_m=64,quant.gemv_m_chunk=8"
run q4_0 C "--tune quant.gemv_max_m=64,quant.gemv_m_chunk=4"
run f16 B "--tune matmul.gemv_max_m=16"
run f16 C "--tune matmul.gemv_max_m=64"
