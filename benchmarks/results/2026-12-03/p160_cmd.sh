source .device/setup.sh >/dev/null 2>&1
mkdir -p /tmp/g; python3 .device/make_random_neox_gguf.py --preset pythia-160m --dtype f16 -o /tmp/g/pythia-160m-f16.gguf >/dev/null
for t in new old new old; do if [ $t = old ]; then d=.old; else d=.; fi; echo "=== $t"; (cd $d && timeout 100 python3 benchmarks/run_models.py --dir /tmp/g --specs pythia-160m:f16 --prefill 128 --profile 2>&1 | grep -A16 "decode profile" | head -17; cd $d && timeout 100 python3 benchmarks/run_models.py --dir /tmp/g --specs pythia-160m:f16 --prefill 128 2>&1 | grep RESULT | python3 -c "
import sys, json
for l in sys.stdin:
    r = json.loads(l.split(' ', 2)[2]); print({k: r[k] for k in ('decode_tok_s', 'decode_lag2_tok_s', 'decode_session_tok_s', 'host_ms_per_step', 'dispatches_per_step')})"); done
