"""Worker for tests/test_serve_ray.py's local-testing-mode case: runs the deployment with
`serve.run(app, _local_testing_mode=True)` in its own process (the replica, its engine thread and
Ray's threads cannot be shut down in that mode, so they must not outlive the test in pytest's
process) and prints one JSON object with what the DeploymentHandle answered.

    python tests/ray_local_worker.py MODEL.gguf PROMPT...
"""
import json
import os
import sys

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(model: str, prompts: list) -> dict:
    from ray import serve

    from models.serve.ray_serve import application
    handle = serve.run(application(model, "tiny", max_batch=4, ctx=128), _local_testing_mode=True)
    out = {"health": handle.check_health.remote().result()}
    resps = [handle.completions.remote({"model": "tiny", "prompt": p, "max_tokens": 8, "temperature": 0,
                                        "ignore_eos": True}) for p in prompts]
    out["completions"] = [r.result(timeout_s=300) for r in resps]
    out["unknown_model"] = handle.completions.remote({"model": "gpt-5", "prompt": "x"}).result()
    out["bad_top_p"] = handle.completions.remote({"model": "tiny", "prompt": "x", "top_p": 2}).result()
    out["chat"] = handle.chat_completions.remote({"model": "tiny",
                                                  "messages": [{"role": "user", "content": "x"}]}).result()
    out["stream"] = handle.completions.remote({"model": "tiny", "prompt": "x", "stream": True}).result()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:])), flush=True)
    os._exit(0)      # the replica's threads (engine, Ray's loop) do not end in local testing mode
