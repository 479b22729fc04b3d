"""How a tensor prints: its values, as NumPy and PyTorch show them (`repr`/`str` realize it),
`tensor([[1., 2.], [3., 4.]], dtype=float32)`, under NumPy's print options (np.printoptions).

A tensor past the print threshold shows only its edges, as NumPy does; only the edges are read
back: each long axis is first narrowed on the GPU to its first and last `edgeitems` entries
(plus one middle entry that is never shown), so printing a 50k x 4096 logits tensor copies a
few dozen numbers, not 800 MB. NumPy's formatting looks only at the edges of a summarised
array too, so the text is exactly NumPy's.

Inside a tg.capture'd function (where nothing may be read back) and when computing the value
fails, the cheap lazy description (`tg.debug.describe`) is printed instead.
"""
from __future__ import annotations

import numpy as np


def describe(t) -> str:
    """One line about a tensor without computing it: shape, dtype, whether it holds a value
    (realized), is lazy, or has pending in-place writes, the op that makes it, and its view."""
    from .graph import IN_PLACE
    n = t.node
    if n.buffer is not None or n.op.name == "CONST":
        state = "realized" if n.buffer is not None else f"constant {n.arg!r}"
    elif n.op in IN_PLACE:
        state = "pending write"
    else:
        state = f"lazy {n.op.name.lower()}" + (f" of {', '.join(m.op.name.lower() for m, _ in n.srcs[:4])}"
                                              if n.srcs else "")
    v = t.view
    view = "" if v.is_identity(n.shape) else f", view strides={v.strides} offset={int(v.offset)}"
    return f"Tensor(shape={t.shape}, dtype={t.dtype.name}, {state}{view})"


def edges(t, edgeitems: int):
    """The tensor narrowed along every axis longer than 2 * edgeitems + 1 to its first and last
    edgeitems entries around one middle entry (a lazy gather; one kernel)."""
    for ax, n in enumerate(t.shape):
        if n > 2 * edgeitems + 1:
            keep = np.r_[0:edgeitems, n // 2, n - edgeitems:n].astype(np.int32)
            t = t[(slice(None),) * ax + (keep,)]
    return t


def format_tensor(t) -> str:
    """`tensor(<values>, dtype=<name>)` with NumPy's layout (summarised past the threshold)."""
    from . import runtime
    if runtime._tracing[0]:
        return describe(t)
    opts = np.get_printoptions()
    try:
        src = t.astype("float32") if t.dtype.is_quant else t
        if t.size > opts["threshold"]:
            values = edges(src, opts["edgeitems"]).numpy()
            threshold = 0          # summarise every long axis, as NumPy would the whole array
        else:
            values = src.numpy()
            threshold = opts["threshold"]
    except Exception as e:   # a value that cannot be computed still prints (debuggers call repr)
        return f"{describe(t)} (value not computed: {type(e).__name__}: {e})"
    prefix = "tensor("
    extra = f"dtype={t.dtype.name}"
    if (values.size == 0 and values.shape != (0,)) or threshold == 0:
        extra = f"shape={t.shape}, {extra}"     # as NumPy 2 does for empty and summarised arrays
    body = np.array2string(values, separator=", ", prefix=prefix, threshold=threshold)
    width = opts["linewidth"]
    last = len(body) - body.rfind("\n") - 1 if "\n" in body else len(prefix) + len(body)
    spacer = "\n" + " " * len(prefix) if last + 2 + len(extra) + 1 > width else " "
    return f"{prefix}{body},{spacer}{extra})"
