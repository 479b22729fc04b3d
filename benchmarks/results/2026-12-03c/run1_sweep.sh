set -uo pipefail
mkdir -p $OUT
python3 -c "import tensorgpu as tg; d = tg.device(); print('adapter:', d['name'], 'coopmat', d['coopmat']); from tensorgpu import wgpu_unlock; print(wgpu_unlock.STATE)"
timeout 150 python3 -m pytest tests/test_kernel_matmul_coop.py -q -x -p no:cacheprovider 2>&1 | tail -15
TENSORGPU_BENCH_FULL=1 TENSORGPU_SMALLM_M=16,64,512 timeout 330 python3 -m pytest benchmarks/bench_matmul.py -k small_m_sweep -s -q \
   -p no:randomly -p no:cacheprovider --benchmark-only --benchmark-json=$OUT/small_m_coop.json 2>&1 | grep -E "^small-M|M=|x[0-9]+:|passed|failed|Error" | tail -120
