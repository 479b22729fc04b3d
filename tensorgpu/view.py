"""View: how a tensor's logical indices map onto the linear elements of what it reads.

A View is shape + strides + offset, all in elements. permute, expand, slicing, unsqueeze and
most reshapes only build a new View; no data moves. A reshape that strides cannot express
returns None and the caller makes the data contiguous first (visible in the kernel log).
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Optional, Sequence


def contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class View:
    shape: tuple
    strides: tuple
    offset: int = 0

    @staticmethod
    def contiguous(shape: Sequence[int], offset: int = 0) -> "View":
        shape = tuple(int(s) for s in shape)
        return View(shape, contiguous_strides(shape), offset)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def is_contiguous(self) -> bool:
        """Row-major contiguous (size-1 dims may carry any stride)."""
        exp = 1
        for s, st in zip(reversed(self.shape), reversed(self.strides)):
            if s != 1 and st != exp:
                return False
            exp *= s
        return True

    def is_identity(self, shape: Sequence[int]) -> bool:
        """Reads a contiguous tensor of `shape` element-for-element (no view at all)."""
        return tuple(shape) == self.shape and self.offset == 0 and self.is_contiguous

    def span(self) -> tuple:
        """(lowest, highest) linear element touched, or (offset, offset - 1) when empty."""
        if self.numel == 0:
            return self.offset, self.offset - 1
        lo = hi = self.offset
        for s, st in zip(self.shape, self.strides):
            if st > 0:
                hi += (s - 1) * st
            else:
                lo += (s - 1) * st
        return lo, hi

    # -- movement ops (all return Views; shapes are validated by the caller) --------------

    def permute(self, axes: Sequence[int]) -> "View":
        return View(tuple(self.shape[a] for a in axes), tuple(self.strides[a] for a in axes), self.offset)

    def expand(self, shape: Sequence[int]) -> "View":
        """Broadcast to `shape` (leading dims added, size-1 dims stretched with stride 0)."""
        shape = tuple(shape)
        pad = len(shape) - self.ndim
        old_shape = (1,) * pad + self.shape
        old_strides = (0,) * pad + self.strides
        strides = tuple(0 if (o == 1 and n != 1) else st for o, n, st in zip(old_shape, shape, old_strides))
        return View(shape, strides, self.offset)

    def reshape(self, shape: Sequence[int]) -> Optional["View"]:
        """The same elements under a new shape without copying, or None if strides can't say it."""
        shape = tuple(int(s) for s in shape)
        if self.is_contiguous:
            return View.contiguous(shape, self.offset)
        if prod(shape) == 0:
            return View.contiguous(shape, self.offset)
        # drop size-1 dims, then merge/split runs of dims that are mutually contiguous
        old = [(s, st) for s, st in zip(self.shape, self.strides) if s != 1]
        oi = ni = 0
        out = [0] * len(shape)
        # walk groups: accumulate old dims and new dims until their products match
        while ni < len(shape):
            if shape[ni] == 1:
                out[ni] = 0
                ni += 1
                continue
            nj, np_ = ni, shape[ni]
            oj = oi
            if oj >= len(old):
                return None
            op_ = old[oj][0]
            while np_ != op_:
                if np_ < op_:
                    nj += 1
                    if nj >= len(shape):
                        return None
                    np_ *= shape[nj]
                else:
                    oj += 1
                    if oj >= len(old):
                        return None
                    op_ *= old[oj][0]
            # old dims oi..oj must be contiguous among themselves
            for k in range(oi, oj):
                if old[k][1] != old[k + 1][1] * old[k + 1][0]:
                    return None
            # assign strides for new dims ni..nj, innermost gets old[oj] stride
            st = old[oj][1]
            for k in range(nj, ni - 1, -1):
                out[k] = st
                st *= shape[k]
            ni, oi = nj + 1, oj + 1
        return View(shape, tuple(out), self.offset)

    def slice(self, axis: int, start: int, stop: int, step: int) -> "View":
        """Python slice semantics along one axis, with start/stop already normalised."""
        if step > 0:
            n = max(0, (stop - start + step - 1) // step)
        else:
            n = max(0, (start - stop + (-step) - 1) // (-step))
        shape = self.shape[:axis] + (n,) + self.shape[axis + 1:]
        strides = self.strides[:axis] + (self.strides[axis] * step,) + self.strides[axis + 1:]
        off = self.offset + (start * self.strides[axis] if n > 0 else 0)
        return View(shape, strides, off)

    def index(self, axis: int, i: int) -> "View":
        """Pick element i along `axis`, removing that axis."""
        return View(self.shape[:axis] + self.shape[axis + 1:], self.strides[:axis] + self.strides[axis + 1:],
                    self.offset + i * self.strides[axis])

    def unsqueeze(self, axis: int) -> "View":
        return View(self.shape[:axis] + (1,) + self.shape[axis:], self.strides[:axis] + (0,) + self.strides[axis:], self.offset)
