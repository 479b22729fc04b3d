"""`tg.einsum`: NumPy's Einstein summation for what transformer code writes, lowered to the
ops that run it well.

Float operands are contracted pairwise, left to right: letters only one operand has and no one
needs later are summed first, the pair is permuted to [batch..., M, K] @ [batch..., K, N]
(batch letters: in both and kept; K: in both and summed) and multiplied with matmul
(`bhqd,bhkd->bhqk` is `q @ k.T` per head with no copy; `ij,jk->ik` is a matmul). Integer and
bool operands multiply and sum in one fused reduction, exactly (int32, wrapping), as NumPy's
integer einsum is exact. A single operand is a permute and a sum (`bij->bji`, `ij->j`).

Not supported, with an error that says so: a letter repeated within one operand (diagonals and
traces, `ii->i`, `ii->`), the ellipsis `...`, and letters whose sizes differ between operands
(no broadcasting of size-1 axes).
"""
from __future__ import annotations

from math import prod

from . import dtypes as dt
from .tensor import Tensor, matmul, tensor


def _parse(subscripts: str, operands: list) -> tuple:
    if not isinstance(subscripts, str):
        raise TypeError(f"einsum: subscripts must be a string like 'ij,jk->ik', got {type(subscripts).__name__}")
    s = subscripts.replace(" ", "")
    if "." in s:
        raise NotImplementedError(f"einsum {subscripts!r}: the ellipsis '...' is not supported; write the axes out")
    lhs, arrow, out = s.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(operands):
        raise ValueError(f"einsum {subscripts!r}: {len(ins)} operand subscripts for {len(operands)} operands")
    for part in ins + [out]:
        bad = [c for c in part if not c.isalpha()]
        if bad:
            raise ValueError(f"einsum {subscripts!r}: invalid subscript character {bad[0]!r} (letters only)")
    sizes: dict = {}
    for k, (letters, t) in enumerate(zip(ins, operands)):
        if len(letters) != t.ndim:
            raise ValueError(f"einsum {subscripts!r}: operand {k} has {t.ndim} dimensions (shape {t.shape}) but "
                             f"subscripts {letters!r} name {len(letters)}")
        if len(set(letters)) != len(letters):
            raise NotImplementedError(f"einsum {subscripts!r}: a letter repeated within one operand ({letters!r}: a "
                                      "diagonal or trace) is not supported")
        for c, n in zip(letters, t.shape):
            if sizes.setdefault(c, n) != n:
                raise ValueError(f"einsum {subscripts!r}: size of letter {c!r} differs between operands "
                                 f"({sizes[c]} and {n}; operand {k} has shape {t.shape})")
    if not arrow:
        counts = {c: sum(p.count(c) for p in ins) for c in sizes}
        out = "".join(sorted(c for c, n in counts.items() if n == 1))
    if len(set(out)) != len(out):
        raise ValueError(f"einsum {subscripts!r}: output subscript {out!r} repeats a letter")
    for c in out:
        if c not in sizes:
            raise ValueError(f"einsum {subscripts!r}: output letter {c!r} appears in no operand")
    return ins, out, sizes


def _sum_out(t: Tensor, letters: str, keep: set) -> tuple:
    """Sum the axes of t whose letters are not in `keep`."""
    drop = [i for i, c in enumerate(letters) if c not in keep]
    if not drop:
        return t, letters
    return t.sum(tuple(drop)), "".join(c for c in letters if c in keep)


def _pair(a: Tensor, la: str, b: Tensor, lb: str, keep: set, sizes: dict) -> tuple:
    a, la = _sum_out(a, la, keep | set(lb))
    b, lb = _sum_out(b, lb, keep | set(la))
    batch = [c for c in la if c in lb and c in keep]
    contract = [c for c in la if c in lb and c not in keep]
    left = [c for c in la if c not in lb]
    right = [c for c in lb if c not in la]
    A = a.permute([la.index(c) for c in batch + left + contract])
    B = b.permute([lb.index(c) for c in batch + contract + right])
    bs = tuple(sizes[c] for c in batch)
    M, K, N = (prod(sizes[c] for c in g) for g in (left, contract, right))
    A = A.reshape(bs + (M, K))
    B = B.reshape(bs + (K, N))
    r = matmul(A, B).reshape(bs + tuple(sizes[c] for c in left) + tuple(sizes[c] for c in right))
    return r, "".join(batch + left + right)


def einsum(subscripts: str, *operands) -> Tensor:
    """NumPy's einsum for explicit letters: `tg.einsum("bhqd,bhkd->bhqk", q, k)`, implicit
    output (letters used once, in alphabetical order) when there is no '->'. Float operands go
    through matmul (float32 result); integer / bool operands through one exact fused
    multiply-and-sum (int32). See the module docstring for what is not supported."""
    ops = [o if isinstance(o, Tensor) else tensor(o) for o in operands]
    if not ops:
        raise ValueError("einsum needs at least one operand")
    for o in ops:
        o._check_plain("einsum")
    ins, out, sizes = _parse(subscripts, ops)
    if all(not o.dtype.is_float for o in ops) and len(ops) > 1:
        return _exact(ops, ins, out, sizes)
    cur, lc = ops[0], ins[0]
    for k in range(1, len(ops)):
        later = set(out).union(*ins[k + 1:]) if k + 1 < len(ins) else set(out)
        cur, lc = _pair(cur, lc, ops[k], ins[k], later, sizes)
    cur, lc = _sum_out(cur, lc, set(out))
    if lc != out:
        cur = cur.permute([lc.index(c) for c in out]) if out else cur
    return cur


def _exact(ops: list, ins: list, out: str, sizes: dict) -> Tensor:
    """Integer einsum: every operand broadcast over all letters (output letters first), one
    product, one sum over the rest: a single fused reduction, exact in int32."""
    order = list(out) + [c for c in sizes if c not in out]
    prodt = None
    for t, letters in zip(ops, ins):
        t = t.astype(dt.int32) if t.dtype is dt.bool_ else t
        perm = sorted(range(len(letters)), key=lambda i: order.index(letters[i]))
        t = t.permute(perm) if perm else t
        shape = tuple(sizes[c] if c in letters else 1 for c in order)
        t = t.reshape(shape)
        prodt = t if prodt is None else prodt * t
    rest = tuple(range(len(out), len(order)))
    return prodt.sum(rest) if rest else prodt.expand(tuple(sizes[c] for c in order))
