source .device/setup.sh >/dev/null 2>&1
# llama.cpp: llama-bench, llama-batched-bench and llama-server, built in the background (nice)
cp -r .device/llamacpp /tmp/llsrc
sed -e 's/-DLLAMA_BUILD_SERVER=OFF/-DLLAMA_BUILD_SERVER=ON/' \
    -e 's/--target llama-bench /--target llama-bench llama-batched-bench llama-server /' \
    -e 's#cp -a build-cuda/bin/llama-bench #cp -a build-cuda/bin/llama-bench build-cuda/bin/llama-batched-bench build-cuda/bin/llama-server #' \
    .device/llamacpp/build_cuda.sh > /tmp/llsrc/build_cuda.sh
(nice -n 19 bash /tmp/llsrc/build_cuda.sh > /tmp/build.out 2>&1; echo built >> /tmp/build.out) &
mkdir -p /tmp/gg
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/gg/pythia-1.4b-$d.gguf >/dev/null; done
for d in f16 q4_0; do timeout 170 python3 benchmarks/batch_decode.py --gguf /tmp/gg/pythia-1.4b-$d.gguf --batches 1,4,16,64 --steps 16 --json $OUT/b3_$d.json --profile 2>&1 | grep -v -E "RESULT|loading"; done
TENSORGPU_BENCH_FULL=1 timeout 170 python3 -m pytest benchmarks/bench_matmul.py -k small_m_sweep -s -q -p no:randomly -p no:cacheprovider --benchmark-only --benchmark-json=$OUT/small_m.json 2>&1 | grep -E "^small-M|best|ms|passed|failed|rror" | tail -40
for i in $(seq 100); do grep -q built /tmp/build.out && break; sleep 2; done; tail -2 /tmp/build.out; ls /tmp/llb/cuda/ | head
for d in f16 q4_0; do LD_LIBRARY_PATH=/tmp/llb/cuda timeout 60 /tmp/llb/cuda/llama-batched-bench -m /tmp/gg/pythia-1.4b-$d.gguf -c 20000 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,16,64 -ngl 99 -fa on 2>/dev/null | tee $OUT/llama_batched_$d.txt | grep -E "^\|" ; done
