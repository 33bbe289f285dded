#!/usr/bin/env python3
"""PyTorch + transformers on the GPU as an outside peer for `refrag bench --peer`.

Usage: refrag bench --device cuda --peer "python3 scripts/torch_peer.py MODEL.gguf"

The same GGUF is read by transformers (needs the `gguf` Python package; the Q4_1 weights are
dequantized to bf16 at load, as refrag does on CUDA) and run with SDPA attention (PEER_ATTN to
change it). PEER_COMPILE=1 decodes through `generate` with a static KV cache, which transformers
compiles with CUDA graphs (first call per shape compiles: the bench's warm-up run absorbs it).

Protocol on stdin/stdout, one JSON object per line:
  peer -> {"ready": true, "name": "..."}
  bench -> {"tokens": [ids...], "batch": B, "decode": N}
  peer -> {"prefill_ms": T, "decode_ms": per later token, "answer_ms": prefill + N tokens}
Times are taken here around the model's own work (CUDA synchronised), so pipe and JSON costs
are not counted. Each step's token is copied to the host, as a streaming reader would.
"""
import json
import os
import sys
import time


def load(path, torch):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(path))
    attn = os.environ.get("PEER_ATTN", "sdpa")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16, attn_implementation=attn)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, torch_dtype=torch.bfloat16, attn_implementation=attn
        )
    return model.to("cuda").eval()


def eager(model, torch, ids, decode):
    """Prefill, then `decode` greedy steps through the dynamic KV cache."""
    sync = torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    try:
        out = model(ids, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = model(ids, use_cache=True, num_logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    nxt.tolist()
    t1 = time.perf_counter()
    pkv = out.past_key_values
    for _ in range(decode):
        out = model(nxt, past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        nxt.tolist()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3


def compiled(model, torch, ids, decode):
    """`generate` with a static cache (compiled decoding): TTFT from a one-token call, the rest
    from a call of 1 + `decode` tokens."""
    args = dict(do_sample=False, cache_implementation="static", pad_token_id=0)
    sync = torch.cuda.synchronize
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **args)
    sync()
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=decode + 1, min_new_tokens=decode + 1, **args)
    sync()
    t2 = time.perf_counter()
    ttft = (t1 - t0) * 1e3
    return ttft, (t2 - t1) * 1e3 - ttft


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: torch_peer.py MODEL.gguf", file=sys.stderr)
        return 2
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"torch_peer: {e} (pip install torch transformers gguf)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("torch_peer: no CUDA device", file=sys.stderr)
        return 2
    model = load(sys.argv[1], torch)
    compile_ = os.environ.get("PEER_COMPILE") == "1"
    run = compiled if compile_ else eager
    how = "static cache, compiled" if compile_ else "eager"
    name = f"torch {torch.__version__} + transformers {transformers.__version__} ({model.config._attn_implementation}, {how})"
    print(json.dumps({"ready": True, "name": name}), flush=True)
    with torch.inference_mode():
        for line in sys.stdin:
            if not line.strip():
                continue
            req = json.loads(line)
            batch, decode = int(req.get("batch", 1)), int(req.get("decode", 0))
            ids = torch.tensor([req["tokens"]] * batch, device="cuda")
            prefill, rest = run(model, torch, ids, decode)
            per = rest / decode if decode else None
            print(json.dumps({"prefill_ms": prefill, "decode_ms": per, "answer_ms": prefill + rest}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
