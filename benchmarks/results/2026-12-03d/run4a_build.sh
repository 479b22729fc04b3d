# Session 7, run 4a: build llama.cpp's CUDA llama-bench on the machine (kept in /tmp/llb for run 4b,
# the next call on the same warm machine), the GGUFs, and the tensor-core tests while it builds.
set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
rm -rf /tmp/llsrc && cp -r .device/llamacpp /tmp/llsrc
( nice -n 19 bash /tmp/llsrc/build_cuda.sh > /tmp/llamacpp_build.log 2>&1; echo done >> /tmp/llamacpp_build.log ) &
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
for d in f16 q4_0; do python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype $d -o /tmp/ggufs/tinyllama-1.1b-$d.gguf >/dev/null; done
timeout 100 python3 -m pytest tests/test_kernel_matmul_coop.py -q -p no:cacheprovider 2>&1 | tail -2
for i in $(seq 400); do grep -q '^done' /tmp/llamacpp_build.log && break; sleep 1; done
ls -la /tmp/llb/cuda/llama-bench && ls /tmp/llsrc/llama.cpp-*-src.tar.xz | sed 's/.*llama.cpp-\(.*\)-src.*/llama.cpp commit \1/'
tail -3 /tmp/llamacpp_build.log
