# Session 8, run 5b (the call after run 5, same warm machine): 64 streams alone, the engine in its own process
# first, then on a thread.
source .device/setup.sh >/dev/null && g=/tmp/ggufs/pythia-1.4b-q4_0.gguf && for form in process thread; do echo "== $form"; timeout 55 python3 benchmarks/bench_serve.py --model $g --concurrency 64 $( [ $form = process ] && echo --server-args=--engine-process ) --out $OUT/serve64_$form.json 2>&1 | tail -n 2 | head -1; done
