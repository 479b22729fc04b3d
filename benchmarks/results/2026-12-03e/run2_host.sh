# Session 8, run 2: where the host time goes, by sampling (py-spy 0.4.3, carried in .device/whl).
# (a) the server at 64 and 16 streams (pythia-1.4b q4_0), py-spy attached for 10 s mid-level, all threads;
# (b) replayed decode steps of pythia-160m f16 and pythia-1.4b f16 under py-spy --native (issue 15's layers);
# (c) the server at 1/16/64 streams with Python's switch interval at 5 ms (default) and 0.5 ms.
set -uo pipefail
export PYTHONUNBUFFERED=1
SPY=/tmp/site/bin/py-spy
mkdir -p /tmp/ggufs
for m in pythia-160m:f16 pythia-1.4b:f16 pythia-1.4b:q4_0; do p=${m%%:*}; d=${m##*:}
  [ -f /tmp/ggufs/$p-$d.gguf ] || python3 .device/make_random_neox_gguf.py --preset $p --dtype $d -o /tmp/ggufs/$p-$d.gguf >/dev/null; done
g=/tmp/ggufs/pythia-1.4b-q4_0.gguf
echo "== (a) server profile"
python3 -m models serve --model $g --port 8123 --max-batch 64 --model-name pyth > $OUT/server_a.log 2>&1 & SP=$!
for i in $(seq 120); do python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8123/health').status_code != 200)" 2>/dev/null && break; sleep 1; done
for c in 64 16; do
  timeout 100 python3 benchmarks/bench_serve.py --model $g --url http://127.0.0.1:8123 --model-name pyth --concurrency $c \
    --prompts-per-stream 4 --out $OUT/serve_a_c$c.json > $OUT/bench_a_c$c.log 2>&1 & BP=$!
  sleep 10
  timeout 20 $SPY record -p $SP -d 10 -r 200 --threads --idle -f raw -o $OUT/spy_server_c$c.txt > /dev/null 2>&1 || echo "py-spy failed: $?"
  wait $BP; tail -n 6 $OUT/bench_a_c$c.log
done
kill -TERM $SP; wait $SP
echo "== (b) decode host profile"
for m in pythia-160m-f16 pythia-1.4b-f16; do
  timeout 60 $SPY record --native -r 400 -f raw -o $OUT/spy_decode_$m.txt -- python3 benchmarks/host_profile.py --gguf /tmp/ggufs/$m.gguf --seconds 6 2>&1 | grep -E "RESULT|Error"
  python3 benchmarks/host_profile.py --fold $OUT/spy_decode_$m.txt
done
echo "== (c) switch interval"
for sw in "" "--gil-switch-ms 0.5"; do
  echo "-- server args: '$sw'"
  timeout 150 python3 benchmarks/bench_serve.py --model $g --concurrency 1,16,64 ${sw:+--server-args "$sw"} --out $OUT/serve_c_${sw:+sw05}.json 2>&1 | tail -n 5
done
