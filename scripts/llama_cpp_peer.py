#!/usr/bin/env python3
"""llama.cpp as an outside peer for `refrag bench --peer` (issue: bench against what users run).

Usage: refrag bench --peer "python3 scripts/llama_cpp_peer.py MODEL.gguf"

Protocol on stdin/stdout, one JSON object per line:
  peer -> {"ready": true, "name": "llama.cpp (llama-cpp-python X.Y.Z)"}
  bench -> {"tokens": [ids...], "decode": N}  (the full-context prompt, already tokenized by refrag)
  peer -> {"prefill_ms": T, "decode_ms": per later token, "answer_ms": prefill + N tokens}
The prefill is timed here, around llama.cpp's own evaluation of the tokens, so that pipe and
JSON costs are not counted; then N greedy tokens, each evaluated after the argmax of the last
logits. Install: pip install llama-cpp-python (compiles llama.cpp; CPU).
"""
import json
import os
import sys
import time


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: llama_cpp_peer.py MODEL.gguf", file=sys.stderr)
        return 2
    try:
        import llama_cpp
    except ImportError:
        print("llama_cpp_peer: llama-cpp-python is not installed (pip install llama-cpp-python)", file=sys.stderr)
        return 2
    n_ctx = int(os.environ.get("PEER_N_CTX", "8192"))
    llm = llama_cpp.Llama(
        model_path=sys.argv[1],
        n_ctx=n_ctx,
        n_batch=int(os.environ.get("PEER_N_BATCH", "2048")),
        n_threads=os.cpu_count(),
        n_gpu_layers=int(os.environ.get("PEER_GPU_LAYERS", "0")),
        verbose=False,
    )
    print(json.dumps({"ready": True, "name": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        tokens, decode = req["tokens"], int(req.get("decode", 0))
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(tokens)  # the logits of the last position are computed inside
        ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        for _ in range(decode):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        rest = (time.perf_counter() - t1) * 1e3
        per = rest / decode if decode else None
        print(json.dumps({"prefill_ms": ms, "decode_ms": per, "answer_ms": ms + rest}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
