source .device/setup.sh >/dev/null 2>&1
cp -r .device/llamacpp /tmp/llsrc
sed -e 's/--target llama-bench /--target llama-bench llama-batched-bench /' \
    -e 's#cp -a build-cuda/bin/llama-bench #cp -a build-cuda/bin/llama-bench build-cuda/bin/llama-batched-bench #' \
    .device/llamacpp/build_cuda.sh > /tmp/llsrc/build_cuda.sh
( nice -n 19 bash /tmp/llsrc/build_cuda.sh > /tmp/build.out 2>&1; echo built >> /tmp/build.out
  cd /tmp/llb/llama.cpp && cmake -B build-cuda -DLLAMA_BUILD_SERVER=ON > /tmp/srv.out 2>&1 && nice -n 19 cmake --build build-cuda --target llama-server -j16 >> /tmp/srv.out 2>&1 && cp -a build-cuda/bin/llama-server /tmp/llb/cuda/; echo srvdone >> /tmp/srv.out ) &
mkdir -p /tmp/gg
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/gg/pythia-1.4b-$d.gguf >/dev/null; done
for d in f16 q4_0; do timeout 170 python3 benchmarks/bench_serve.py --model /tmp/gg/pythia-1.4b-$d.gguf --concurrency 1,4,16,64 --out $OUT/serve_$d.json --log $OUT/server_$d.log 2>&1 | tail -n 9; done
for i in $(seq 90); do grep -q built /tmp/build.out && break; sleep 2; done; tail -1 /tmp/build.out
for d in f16 q4_0; do LD_LIBRARY_PATH=/tmp/llb/cuda timeout 50 /tmp/llb/cuda/llama-batched-bench -m /tmp/gg/pythia-1.4b-$d.gguf -c 20000 -b 2048 -ub 512 -npp 128 -ntg 128 -npl 1,4,16,64 -ngl 99 -fa on 2>/dev/null | tee $OUT/llama_batched_$d.txt | grep -E "^\|" ; done
for i in $(seq 60); do grep -q srvdone /tmp/srv.out && break; sleep 2; done; tail -3 /tmp/srv.out
if [ -x /tmp/llb/cuda/llama-server ]; then
  LD_LIBRARY_PATH=/tmp/llb/cuda /tmp/llb/cuda/llama-server -m /tmp/gg/pythia-1.4b-q4_0.gguf -ngl 99 -np 64 -c 32768 -fa on --port 8091 > $OUT/llama_server.log 2>&1 &
  for i in $(seq 60); do curl -s localhost:8091/health | grep -q ok && break; sleep 1; done
  timeout 100 python3 benchmarks/bench_serve.py --model /tmp/gg/pythia-1.4b-q4_0.gguf --url http://127.0.0.1:8091 --model-name x --concurrency 1,16,64 --out $OUT/serve_llamacpp_q4_0.json 2>&1 | tail -n 7
fi
