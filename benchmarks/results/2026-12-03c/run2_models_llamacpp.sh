set -uo pipefail
mkdir -p $OUT /tmp/ggufs
export PYTHONUNBUFFERED=1
# llama.cpp CUDA build in the background (same-run baseline for pp512)
rm -rf /tmp/llsrc && cp -r .device/llamacpp /tmp/llsrc
( nice -n 19 bash /tmp/llsrc/build_cuda.sh > $OUT/llamacpp_build.log 2>&1; echo done >> $OUT/llamacpp_build.log ) &
for d in f16 q4_0; do python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype $d -o /tmp/ggufs/pythia-1.4b-$d.gguf >/dev/null; done
python3 benchmarks/make_random_llama_gguf.py --preset tinyllama-1.1b --dtype f16 -o /tmp/ggufs/tinyllama-1.1b-f16.gguf >/dev/null
echo "== run_models coop OFF"; TENSORGPU_DISABLE_COOPMAT=1 timeout 120 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "pythia-1.4b:f16" --json $OUT/models_nocoop.json 2>&1 | grep -v "^load" | tail -12
echo "== run_models coop ON"; timeout 150 python3 benchmarks/run_models.py --dir /tmp/ggufs --specs "pythia-1.4b:f16 pythia-1.4b:q4_0" --json $OUT/models_coop.json 2>&1 | grep -v "^load" | tail -12
for d in q4_0 f16; do
  [ $d = q4_0 ] && echo "== batch $d coop OFF" && TENSORGPU_DISABLE_COOPMAT=1 timeout 100 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-$d.gguf --batches 1,16,64 --json $OUT/batch-$d-nocoop.json 2>&1 | grep -v -E "RESULT|loading" | tail -6
  echo "== batch $d coop ON"; timeout 100 python3 benchmarks/batch_decode.py --gguf /tmp/ggufs/pythia-1.4b-$d.gguf --batches 1,16,64 --json $OUT/batch-$d-coop.json 2>&1 | grep -v -E "RESULT|loading" | tail -6
done
echo "== bench prefill per FLOP"; for m in pythia-1.4b-f16 tinyllama-1.1b-f16; do timeout 100 python3 -m models bench -m /tmp/ggufs/$m.gguf -p 512 -n 0 -r 3 | tee -a $OUT/bench_pp.md; done
for i in $(seq 200); do grep -q '^done' $OUT/llamacpp_build.log && break; sleep 1; done
if [ -x /tmp/llb/cuda/llama-bench ]; then LD_LIBRARY_PATH=/tmp/llb/cuda timeout 120 /tmp/llb/cuda/llama-bench -m /tmp/ggufs/pythia-1.4b-f16.gguf,/tmp/ggufs/pythia-1.4b-q4_0.gguf,/tmp/ggufs/tinyllama-1.1b-f16.gguf -p 512 -n 128 -r 3 -ngl 99 -fa 1 2>&1 | tail -10; else tail -5 $OUT/llamacpp_build.log; fi
