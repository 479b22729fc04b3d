"""Step variables: integers that change from step to step without changing any kernel.

A decode step differs from the last only in a few integers: the position, the cache length,
the slice that a new K/V row is written to. Baked into WGSL, each new value would compile new
pipelines; as runtime values, one compiled step serves every position.

`SymInt` is an `int` (its bound value, so shape checks, comparisons and NumPy all keep working)
that also carries an affine expression over step variables: `c0 + sum(ci * var_i)`. Slicing
and indexing arithmetic (`pos + T`, `start * stride + offset`) keeps the expression; codegen
turns a SymInt offset or scalar into a uniform parameter and records the expression, so a
captured step re-evaluates it with the new values on every replay. Arithmetic that is not
affine in the variables (a product of two of them, a floor division) returns a plain int and
marks the variables it used as *specialized*: a capture then keys its trace on their values
(it re-traces rather than replaying a wrong step).
"""
from __future__ import annotations

import itertools
import threading
from typing import Mapping, Optional

__all__ = ["Var", "SymInt", "is_symbolic", "evaluate", "variables"]

_ids = itertools.count()


class Var:
    """One step variable: a name, a unique id, and where it may range (lo..hi, inclusive)."""

    __slots__ = ("name", "id", "lo", "hi", "specialized")

    def __init__(self, name: str, lo: int = 0, hi: int = 2**31 - 1):
        self.name, self.id, self.lo, self.hi = name, next(_ids), int(lo), int(hi)
        self.specialized = False     # set when a value of it was used non-affinely

    def __repr__(self):
        return f"Var({self.name})"

    def bind(self, value: int) -> "SymInt":
        """The SymInt of this variable at `value`."""
        return SymInt(int(value), 0, ((self, 1),))


class SymInt(int):
    """An int that remembers it is `const + sum(coeff * var)`; see the module docstring."""

    def __new__(cls, value: int, const: int, terms: tuple):
        obj = int.__new__(cls, value)
        obj.const, obj.terms = const, terms
        return obj

    # -- construction helpers -----------------------------------------------------------

    @staticmethod
    def _make(value: int, const: int, terms: dict):
        terms = tuple((v, c) for v, c in terms.items() if c != 0)
        if not terms:
            return int(value)
        return SymInt(value, const, terms)

    def _parts(self):
        return self.const, dict(self.terms)

    @staticmethod
    def _of(x):
        if isinstance(x, SymInt):
            return x.const, dict(x.terms)
        return int(x), {}

    def _specialize(self) -> int:
        for v, _ in self.terms:
            v.specialized = True
        return int(self)

    # -- affine arithmetic --------------------------------------------------------------

    def __add__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        c1, t1 = self._parts()
        c2, t2 = SymInt._of(o)
        for v, c in t2.items():
            t1[v] = t1.get(v, 0) + c
        return SymInt._make(int(self) + int(o), c1 + c2, t1)

    __radd__ = __add__

    def __neg__(self):
        return SymInt._make(-int(self), -self.const, {v: -c for v, c in self.terms})

    def __sub__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return self + (-o if isinstance(o, SymInt) else -int(o))

    def __rsub__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        return (-self) + o

    def __mul__(self, o):
        if not isinstance(o, int):
            return NotImplemented
        if isinstance(o, SymInt):
            o._specialize()
            return self._specialize() * int(o)
        k = int(o)
        return SymInt._make(int(self) * k, self.const * k, {v: c * k for v, c in self.terms})

    __rmul__ = __mul__

    def __floordiv__(self, o):
        if isinstance(o, int) and not isinstance(o, SymInt) and int(o) == 1:
            return self
        if isinstance(o, SymInt):
            o = o._specialize()
        return self._specialize() // o

    def __rfloordiv__(self, o):
        return o // self._specialize()

    def __mod__(self, o):
        return self._specialize() % (o._specialize() if isinstance(o, SymInt) else o)

    def __rmod__(self, o):
        return o % self._specialize()

    def __index__(self):
        return int.__int__(self)

    def __eq__(self, o):
        # equal only when provably so (the same expression): `offset == 0` must not hold for a
        # step variable that happens to be 0 now, or code would drop it from a kernel
        if isinstance(o, SymInt):
            return self.const == o.const and sorted((v.id, c) for v, c in self.terms) == \
                sorted((v.id, c) for v, c in o.terms)
        return False

    def __ne__(self, o):
        return not self.__eq__(o)

    def __hash__(self):
        return int.__hash__(self)

    def __str__(self):
        return int.__repr__(self)

    def __format__(self, spec):
        return int.__format__(int(self), spec)

    def __repr__(self):
        parts = [f"{c}*{v.name}" if c != 1 else v.name for v, c in self.terms]
        if self.const:
            parts.append(str(self.const))
        return f"SymInt({' + '.join(parts)} = {int(self)})"

    def __reduce__(self):   # pickling / copying: the bound value
        return (int, (int(self),))

    def evaluate(self, values: Mapping) -> int:
        """The expression's value with each Var's value looked up in `values` (Var -> int)."""
        return self.const + sum(c * int(values[v]) for v, c in self.terms)


def static(x) -> int:
    """x as a plain int for code that bakes it in (a hand-written kernel's offset): a SymInt's
    variables are marked specialized, so a capture keys its trace on their values."""
    return x._specialize() if isinstance(x, SymInt) else x


def is_symbolic(x) -> bool:
    return isinstance(x, SymInt)


def evaluate(x, values: Mapping) -> int:
    return x.evaluate(values) if isinstance(x, SymInt) else int(x)


def variables(x) -> tuple:
    return tuple(v for v, _ in x.terms) if isinstance(x, SymInt) else ()


# ----------------------------------------------------------------------------- guards

_local = threading.local()


def guards() -> Optional[list]:
    """The guard list of the capture tracing on this thread (None outside a trace): bounds that a
    replay re-checks, e.g. that a slice taken with a step variable stays inside its tensor."""
    return getattr(_local, "guards", None)


def set_guards(lst: Optional[list]) -> Optional[list]:
    old = getattr(_local, "guards", None)
    _local.guards = lst
    return old


def guard(expr, lo: int, hi: int, what: str) -> None:
    """Record that the symbolic `expr` must stay within lo..hi on every replay."""
    g = guards()
    if g is not None and isinstance(expr, SymInt):
        g.append((expr, int(lo), int(hi), what))
