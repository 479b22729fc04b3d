# Session 7, run 6: is the engine's slow B = 1 step (4.8 ms of it waiting for the readback) Python's GIL
# switch interval (5 ms)? The same B = 1 steps with the default interval and with 0.5 ms, three processes each.
set -uo pipefail
export PYTHONUNBUFFERED=1
g=/tmp/ggufs/pythia-1.4b-q4_0.gguf
[ -f $g ] || python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype q4_0 -o $g >/dev/null
for i in 1 2 3; do for sw in 0.005 0.0005; do
  echo "== switchinterval $sw"
  timeout 40 python3 -c "import sys, runpy; sys.setswitchinterval($sw); sys.argv = ['batch_decode.py', '--gguf', '$g', '--batches', '1', '--steps', '32', '--gen', '16']; sys.path.insert(0, 'benchmarks'); runpy.run_path('benchmarks/batch_decode.py', run_name='__main__')" 2>&1 | grep -E "^B=|Session" | cut -c1-300
done; done
