source .device/setup.sh >/dev/null 2>&1
python3 benchmarks/make_random_llama_gguf.py --dtype f16 -o /tmp/tinyllama-1.1b-f16.gguf >/dev/null 2>&1
python3 .device/make_random_neox_gguf.py --preset pythia-1.4b --dtype f16 -o /tmp/pythia-1.4b-f16.gguf >/dev/null
timeout 45 python3 -m models bench -m /tmp/tinyllama-1.1b-f16.gguf -p 512 -n 0 -r 3 2>&1 | grep -E "llama|pp"
timeout 40 python3 -m models bench -m /tmp/pythia-1.4b-f16.gguf -p 512 -n 0 -r 3 2>&1 | grep -E "gptneox|pp"
