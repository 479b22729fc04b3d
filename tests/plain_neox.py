"""An independent GPT-NeoX, written the way a newcomer would: plain tensor ops and tg.nn only,
none of models/'s code. tests/test_plain_model.py and benchmarks/bench_plain_model.py check
that the engine (not the model) makes it correct and fast.

    x = embedding(ids)                                   [T, C]
    per layer:
      qkv = linear(layer_norm(x), W_qkv, b_qkv)          [T, 3C] -> [T, 3, H, D] (GGUF order)
      q, k = rope(q), rope(k)                            [T, H, D]
      cache[:, pos:pos+T] = k, v                         caches [H, max_ctx, D]
      a = sdpa(q, cache[:, :pos+T], ...)                 [H, T, D] -> [T, C]
      x = x + linear(a) + mlp(layer_norm(x))             (parallel residual)
    logits = linear(layer_norm(x), W_out)                [T, V]
"""
from __future__ import annotations

import tensorgpu as tg


class PlainNeoX:
    def __init__(self, path: str):
        f = tg.load_gguf(path)
        md, self.w = f.metadata, f.tensors
        a = "gptneox"
        self.n_layer = int(md[f"{a}.block_count"])
        self.C = int(md[f"{a}.embedding_length"])
        self.H = int(md[f"{a}.attention.head_count"])
        self.D = self.C // self.H
        self.rot = int(md[f"{a}.rope.dimension_count"])
        self.base = float(md.get(f"{a}.rope.freq_base", 10000.0))
        self.eps = float(md[f"{a}.attention.layer_norm_epsilon"])
        self.parallel = bool(md[f"{a}.use_parallel_residual"])
        self.n_ctx = int(md[f"{a}.context_length"])

    def p(self, name):
        return self.w[name]

    def new_cache(self, max_ctx: int, dtype=tg.float32):
        shape = (self.H, max_ctx, self.D)
        return [(tg.zeros(shape, dtype).contiguous().realize(), tg.zeros(shape, dtype).contiguous().realize())
                for _ in range(self.n_layer)]

    def ln(self, x, name):
        return tg.nn.layer_norm(x, self.p(f"{name}.weight"), self.p(f"{name}.bias"), self.eps)

    def forward(self, ids, pos: int, cache, grow: bool = False):
        """Logits [T, V] of ids at positions pos..pos+T-1. grow=True: `cache` holds per layer the
        (k, v) of the past, [H, pos, D], and is replaced by the grown one (tg.cat)."""
        T = ids.shape[0]
        positions = tg.arange(pos, pos + T)                                # [T]
        x = tg.nn.embedding(ids, self.p("token_embd.weight"))              # [T, C]
        for i in range(self.n_layer):
            b = f"blk.{i}"
            h = self.ln(x, f"{b}.attn_norm")
            qkv = tg.nn.linear(h, self.p(f"{b}.attn_qkv.weight"), self.p(f"{b}.attn_qkv.bias"))
            qkv = qkv.reshape(T, 3, self.H, self.D)
            q = tg.nn.rope(qkv[:, 0], positions, self.rot, self.base).swapaxes(0, 1)   # [H, T, D]
            k = tg.nn.rope(qkv[:, 1], positions, self.rot, self.base).swapaxes(0, 1)
            v = qkv[:, 2].swapaxes(0, 1)
            kc, vc = cache[i]
            if grow:
                kc = tg.cat([kc, k], axis=1).contiguous()
                vc = tg.cat([vc, v], axis=1).contiguous()
                cache[i] = (kc, vc)
                keys, values = kc, vc
            else:
                kc[:, pos:pos + T] = k
                vc[:, pos:pos + T] = v
                keys, values = kc[:, :pos + T], vc[:, :pos + T]
            a = tg.nn.scaled_dot_product_attention(q, keys, values, causal=True)    # [H, T, D]
            a = a.swapaxes(0, 1).reshape(T, self.C)
            attn = tg.nn.linear(a, self.p(f"{b}.attn_output.weight"), self.p(f"{b}.attn_output.bias"))
            if self.parallel:
                x = x + attn + self.mlp(self.ln(x, f"{b}.ffn_norm"), b)
            else:
                x = x + attn
                x = x + self.mlp(self.ln(x, f"{b}.ffn_norm"), b)
        x = self.ln(x, "output_norm")
        return tg.nn.linear(x, self.p("output.weight"))                    # [T, V]

    def mlp(self, h, b):
        u = tg.nn.linear(h, self.p(f"{b}.ffn_up.weight"), self.p(f"{b}.ffn_up.bias")).gelu()
        return tg.nn.linear(u, self.p(f"{b}.ffn_down.weight"), self.p(f"{b}.ffn_down.bias"))
