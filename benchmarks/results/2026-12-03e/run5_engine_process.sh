# Session 8, run 5: the server with its engine on a thread (default) against `--engine-process` (the engine in
# a child process: no shared GIL), pythia-1.4b q4_0, 1/16/64 streams, 128-token prompts and outputs.
set -uo pipefail
export PYTHONUNBUFFERED=1
mkdir -p /tmp/ggufs
g=/tmp/ggufs/pythia-1.4b-q4_0.gguf
[ -f $g ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype q4_0 -o $g >/dev/null
for form in thread process; do
  echo "== engine $form"
  timeout 110 python3 benchmarks/bench_serve.py --model $g --concurrency 1,16,64 \
    $( [ $form = process ] && echo --server-args=--engine-process ) --out $OUT/serve_$form.json 2>&1 | tail -n 4
done
