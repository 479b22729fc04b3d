source .device/setup.sh >/dev/null 2>&1
sed 's/--target llama-bench /--target llama-bench llama-batched-bench /; s#cp -a build-cuda/bin/llama-bench #cp -a build-cuda/bin/llama-bench build-cuda/bin/llama-batched-bench #' .device/llamacpp/build_cuda.sh > /tmp/bcuda.sh
cp -r .device/llamacpp /tmp/llsrc && cp /tmp/bcuda.sh /tmp/llsrc/build_cuda.sh
(nice -n 19 bash /tmp/llsrc/build_cuda.sh > /tmp/build.out 2>&1; echo built >> /tmp/build.out) &
mkdir -p /tmp/gg
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/gg/pythia-1.4b-$d.gguf >/dev/null; done
for d in f16 q4_0; do timeout 200 python3 benchmarks/batch_decode.py --gguf /tmp/gg/pythia-1.4b-$d.gguf --batches 1,4,16,64 --json $OUT/batch_$d.json 2>&1 | grep -v RESULT; done
for i in $(seq 150); do grep -q built /tmp/build.out && break; sleep 2; done; tail -2 /tmp/build.out
for d in f16 q4_0; do LD_LIBRARY_PATH=/tmp/llb/cuda timeout 120 /tmp/llb/cuda/llama-batched-bench -m /tmp/gg/pythia-1.4b-$d.gguf -c 20000 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,16,64 -ngl 99 -fa on 2>/dev/null | tee $OUT/llama_batched_$d.txt | grep -E "^\|" ; done
