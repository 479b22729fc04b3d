"""Every elementwise and reduce op, defined once: its enum member, its NumPy reference and its
WGSL expression side by side. tensor.py builds graph nodes from these, codegen.py renders the
WGSL column, and the tests compare against the NumPy column.

To add an elementwise op: add an Op member, one row in UNARY/BINARY below (NumPy function,
WGSL template over already-loaded values, result-dtype rule), and a method in tensor.py.
Values inside generated kernels are f32 for float dtypes (f16 is widened on load), i32, u32
or bool.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto
from typing import Callable

import numpy as np

from . import dtypes as dt


class Op(Enum):
    # leaves and structure
    BUFFER = auto(); CONST = auto(); CAST = auto(); CAT = auto()
    # unary
    NEG = auto(); ABS = auto(); EXP = auto(); LOG = auto(); SQRT = auto(); RSQRT = auto()
    SIN = auto(); COS = auto(); TANH = auto(); ERF = auto(); SIGMOID = auto(); RELU = auto()
    SILU = auto(); GELU = auto(); GELU_TANH = auto(); RECIP = auto(); FLOOR = auto(); CEIL = auto()
    NOT = auto(); ROUND = auto(); ISNAN = auto(); ISINF = auto(); ISFINITE = auto()
    # binary
    ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); POW = auto(); MOD = auto(); FLOORDIV = auto()
    MAX = auto(); MIN = auto(); LT = auto(); LE = auto(); GT = auto(); GE = auto(); EQ = auto(); NE = auto()
    AND = auto(); OR = auto()
    # ternary
    WHERE = auto()
    # reductions
    SUM = auto(); RMAX = auto(); RMIN = auto(); ARGMAX = auto(); ARGMIN = auto(); PROD = auto()
    # hand-written kernels (matmul, softmax, attention, ...)
    CUSTOM = auto()
    # in-place: write srcs[1] into srcs[0]'s buffer through the View in arg (`t[idx] = v`)
    ASSIGN = auto()
    # in-place scatter: write srcs[1] into srcs[0]'s buffer at positions some of whose
    # coordinates are read from integer tensors srcs[2:] (`tg.put_along_axis`, `t[idx] = v`);
    # arg is a graph.ScatterArg
    SCATTER = auto()
    # gather: srcs[0] read at coordinates some of which are read from integer tensors srcs[1:]
    # of this node's shape (`tg.take_along_axis`, `t[idx]`); arg is the coordinate map (see
    # graph.ScatterArg.dims). Rendered inline like an elementwise op (codegen.render_gather),
    # so it fuses with what reads it.
    GATHER = auto()
    # srcs[0]'s buffer once srcs[1] is realized (a write another kernel did: rewrites.py)
    AFTER = auto()
    # realize every source in one schedule (tg.realize(a, b)); holds no value
    SINK = auto()


def _erf_np(x):
    from math import erf
    return np.vectorize(erf, otypes=[np.float64])(x)


def _gelu_np(x):
    return 0.5 * x * (1.0 + _erf_np(x / np.sqrt(2.0)))


def _gelu_tanh_np(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def _mod_np(a, b):
    return np.mod(a, b)


@dataclass(frozen=True)
class OpDef:
    np_fn: Callable
    wgsl: str            # template: {0}, {1}, {2} are operand expressions
    float_only: bool = False   # ints are promoted to float32 first (exp, sqrt, ...)
    result: str = "same"       # "same" | "bool"


# WGSL helper functions the templates may call; codegen includes the ones used.
WGSL_HELPERS = {
    "tg_erf": """fn tg_erf(x: f32) -> f32 {
  let z = abs(x);
  let t = 1.0 / (1.0 + 0.5 * z);
  let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
  return select(r - 1.0, 1.0 - r, x >= 0.0);
}""",
    "tg_tanh": """fn tg_tanh(x: f32) -> f32 { return select(tanh(clamp(x, -15.0, 15.0)), x, tg_isnan(x)); }""",
    "tg_pow": """fn tg_pow(x: f32, y: f32) -> f32 {
  if (y == 0.0 || x == 1.0) { return 1.0; }
  if (y == 1.0) { return x; }
  if (y == 2.0) { return x * x; }
  let yi = round(y);
  let ax = abs(x);
  if (x == 0.0) { return select(bitcast<f32>(0x7f800000u), 0.0, y > 0.0); }
  let p = exp2(y * log2(ax));
  if (x > 0.0) { return p; }
  if (yi != y) { return bitcast<f32>(0x7fc00000u); }
  let odd = (abs(yi) % 2.0) == 1.0;
  return select(p, -p, odd);
}""",
    "tg_fmod": """fn tg_fmod(a: f32, b: f32) -> f32 {
  if (b == 0.0 || tg_nonfinite(a) || tg_isnan(b)) { return bitcast<f32>(0x7fc00000u); }
  if (tg_nonfinite(b)) { return select(b, a, a == 0.0 || (a < 0.0) == (b < 0.0)); }
  let r = a - b * floor(a / b);
  return select(r, r - b, r != 0.0 && (r < 0.0) != (b < 0.0) && abs(r) >= abs(b));
}""",
    "tg_imod": """fn tg_imod(a: i32, b: i32) -> i32 {
  if (b == 0) { return 0; }
  let r = a % b;
  return select(r, r + b, r != 0 && ((r < 0) != (b < 0)));
}""",
    "tg_isnan": """fn tg_isnan(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) > 0x7f800000u; }""",
    "tg_nonfinite": """fn tg_nonfinite(x: f32) -> bool { return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u; }""",
    "tg_fmax": """fn tg_fmax(a: f32, b: f32) -> f32 { return select(select(max(a, b), b, tg_isnan(b)), a, tg_isnan(a)); }""",
    "tg_fmin": """fn tg_fmin(a: f32, b: f32) -> f32 { return select(select(min(a, b), b, tg_isnan(b)), a, tg_isnan(a)); }""",
    "tg_ipow": """fn tg_ipow(a: i32, b: i32) -> i32 {
  if (b < 0) { return select(0, select(1, -1, a == -1 && (b & 1) == 1), a == 1 || a == -1); }
  var r = 1;
  var base = a;
  var e = u32(b);
  loop { if (e == 0u) { break; } if ((e & 1u) == 1u) { r = r * base; } base = base * base; e = e >> 1u; }
  return r;
}""",
    "tg_upow": """fn tg_upow(a: u32, b: u32) -> u32 {
  var r = 1u;
  var base = a;
  var e = b;
  loop { if (e == 0u) { break; } if ((e & 1u) == 1u) { r = r * base; } base = base * base; e = e >> 1u; }
  return r;
}""",
    "tg_idiv_safe": """fn tg_umod(a: u32, b: u32) -> u32 { if (b == 0u) { return 0u; } return a % b; }""",
    "tg_isinf": """fn tg_isinf(x: f32) -> bool { return (bitcast<u32>(x) & 0x7fffffffu) == 0x7f800000u; }""",
    # NumPy's floor_divide (npy_divmod): (a - fmod(a, b)) / b, one less when the remainder's sign
    # differs from b's, rounded to the nearest integer; a / b for b == 0; NaN for inf or NaN a
    "tg_ffloordiv": """fn tg_ffloordiv(a: f32, b: f32) -> f32 {
  let neg = (bitcast<u32>(a) ^ bitcast<u32>(b)) & 0x80000000u;
  if (tg_isnan(a) || tg_isnan(b) || tg_isinf(a)) { return bitcast<f32>(0x7fc00000u); }
  if (b == 0.0) { return select(bitcast<f32>(0x7f800000u | neg), bitcast<f32>(0x7fc00000u), a == 0.0); }
  if (tg_isinf(b)) { return select(bitcast<f32>(neg), -1.0, a != 0.0 && neg != 0u); }
  // C's fmod: the remainder with a's sign, from an exact fma residual (one step back when the
  // rounded quotient overshot)
  var m = fma(-trunc(a / b), b, a);
  if (m != 0.0 && ((m < 0.0) != (a < 0.0))) { m = m + select(-abs(b), abs(b), a > 0.0); }
  var d = (a - m) / b;
  if (m != 0.0 && ((b < 0.0) != (m < 0.0))) { d = d - 1.0; }
  if (d == 0.0) { return bitcast<f32>(neg); }
  var f = floor(d);
  if (d - f > 0.5) { f = f + 1.0; }
  return f;
}""",
    "tg_ifloordiv": """fn tg_ifloordiv(a: i32, b: i32) -> i32 {
  if (b == 0) { return 0; }
  if (b == -1) { return 0 - a; }
  let q = a / b;
  return select(q, q - 1, (a % b != 0) && ((a < 0) != (b < 0)));
}""",
    "tg_ufloordiv": """fn tg_ufloordiv(a: u32, b: u32) -> u32 { if (b == 0u) { return 0u; } return a / b; }""",
}

UNARY = {
    Op.NEG: OpDef(np.negative, "(-{0})"),
    Op.ABS: OpDef(np.abs, "abs({0})"),
    Op.EXP: OpDef(np.exp, "exp({0})", True),
    Op.LOG: OpDef(np.log, "log({0})", True),
    Op.SQRT: OpDef(np.sqrt, "sqrt({0})", True),
    Op.RSQRT: OpDef(lambda x: 1.0 / np.sqrt(x), "inverseSqrt({0})", True),
    Op.SIN: OpDef(np.sin, "sin({0})", True),
    Op.COS: OpDef(np.cos, "cos({0})", True),
    Op.TANH: OpDef(np.tanh, "tg_tanh({0})", True),
    Op.ERF: OpDef(_erf_np, "tg_erf({0})", True),
    Op.SIGMOID: OpDef(lambda x: 1.0 / (1.0 + np.exp(-x)), "(1.0 / (1.0 + exp(-{0})))", True),
    Op.RELU: OpDef(lambda x: np.maximum(x, 0), "max({0}, {zero})"),
    Op.SILU: OpDef(lambda x: x / (1.0 + np.exp(-x)), "({0} / (1.0 + exp(-{0})))", True),
    Op.GELU: OpDef(_gelu_np, "(0.5 * {0} * (1.0 + tg_erf({0} * 0.70710678118654752)))", True),
    Op.GELU_TANH: OpDef(_gelu_tanh_np, "(0.5 * {0} * (1.0 + tg_tanh(0.79788456080286536 * ({0} + 0.044715 * {0} * {0} * {0}))))", True),
    Op.RECIP: OpDef(lambda x: 1.0 / x, "(1.0 / {0})", True),
    Op.FLOOR: OpDef(np.floor, "floor({0})", True),
    Op.CEIL: OpDef(np.ceil, "ceil({0})", True),
    Op.NOT: OpDef(np.logical_not, "(!{0})", result="bool"),
    # WGSL's round() rounds halfway cases to even, as NumPy's round does (integers: unchanged)
    Op.ROUND: OpDef(np.round, "round({0})"),
    # float inputs only (tensor.py answers integer and bool tensors without a kernel)
    Op.ISNAN: OpDef(np.isnan, "tg_isnan({0})", result="bool"),
    Op.ISINF: OpDef(np.isinf, "tg_isinf({0})", result="bool"),
    Op.ISFINITE: OpDef(np.isfinite, "(!tg_nonfinite({0}))", result="bool"),
}

BINARY = {
    Op.ADD: OpDef(np.add, "({0} + {1})"),
    Op.SUB: OpDef(np.subtract, "({0} - {1})"),
    Op.MUL: OpDef(np.multiply, "({0} * {1})"),
    Op.DIV: OpDef(np.true_divide, "({0} / {1})", True),
    Op.POW: OpDef(np.power, "tg_pow({0}, {1})", True),
    Op.MOD: OpDef(_mod_np, "{mod}({0}, {1})"),
    # NumPy semantics for negatives (floor, not truncation); integer division by zero gives 0
    Op.FLOORDIV: OpDef(np.floor_divide, "{floordiv}({0}, {1})"),
    Op.MAX: OpDef(np.maximum, "max({0}, {1})"),
    Op.MIN: OpDef(np.minimum, "min({0}, {1})"),
    Op.LT: OpDef(np.less, "({0} < {1})", result="bool"),
    Op.LE: OpDef(np.less_equal, "({0} <= {1})", result="bool"),
    Op.GT: OpDef(np.greater, "({0} > {1})", result="bool"),
    Op.GE: OpDef(np.greater_equal, "({0} >= {1})", result="bool"),
    Op.EQ: OpDef(np.equal, "({0} == {1})", result="bool"),
    Op.NE: OpDef(np.not_equal, "({0} != {1})", result="bool"),
    Op.AND: OpDef(np.logical_and, "({0} && {1})", result="bool"),
    Op.OR: OpDef(np.logical_or, "({0} || {1})", result="bool"),
}

# f32 variants where WGSL's builtins differ from NumPy: drivers may treat NaN as absent
# (max/min drop it) and compare ordered (NaN != x would be false); NumPy propagates NaN.
# NaN is tested on the bits (tg_isnan), since `x != x` may be folded to false.
F32_OVERRIDES = {
    Op.MAX: "tg_fmax({0}, {1})",
    Op.MIN: "tg_fmin({0}, {1})",
    Op.RELU: "tg_fmax({0}, 0.0)",
    Op.NE: "(!({0} == {1}))",
}
# u32 variants: WGSL has no unary minus on u32 (NumPy wraps)
U32_OVERRIDES = {Op.NEG: "(0u - {0})"}

# reduce op -> (NumPy reference, identity as a WGSL expression per compute type, combine template).
# any/all are RMAX/RMIN over the values' truth (tensor.py), so they fuse like every reduction.
REDUCE = {
    Op.SUM: (np.sum, {"f32": "0.0", "i32": "0", "u32": "0u"}, "({0} + {1})"),
    Op.RMAX: (np.max, {"f32": "bitcast<f32>(0xff800000u)", "i32": "-2147483647 - 1", "u32": "0u"}, "max({0}, {1})"),
    Op.RMIN: (np.min, {"f32": "bitcast<f32>(0x7f800000u)", "i32": "2147483647", "u32": "4294967295u"}, "min({0}, {1})"),
    Op.PROD: (np.prod, {"f32": "1.0", "i32": "1", "u32": "1u"}, "({0} * {1})"),
    Op.ARGMAX: (np.argmax, None, None),
    Op.ARGMIN: (np.argmin, None, None),
}


def compute_type(d: dt.DType) -> str:
    """The WGSL type a value of dtype `d` has inside a generated kernel."""
    if d.kind == "float" or d.is_quant:
        return "f32"
    return {"int": "i32", "uint": "u32", "bool": "bool"}[d.kind]


def unary_result(op: Op, d: dt.DType) -> dt.DType:
    od = UNARY[op]
    if od.result == "bool":
        return dt.bool_
    if od.float_only and not d.is_float:
        return dt.float32
    if d is dt.bool_ and op in (Op.NEG, Op.ABS, Op.RELU):
        return dt.bool_ if op is not Op.NEG else dt.int32
    return d


def binary_operand_type(op: Op, a: dt.DType, b: dt.DType) -> dt.DType:
    """The dtype both operands are converted to before the op."""
    r = dt.result_type(a, b)
    if op is Op.POW and not r.is_float:  # NumPy: integer powers stay integer (wrapping)
        return dt.int32 if r is dt.bool_ else r
    if BINARY[op].float_only and not r.is_float:
        return dt.float32
    if op in (Op.SUB, Op.MOD, Op.FLOORDIV, Op.LT, Op.LE, Op.GT, Op.GE) and r is dt.bool_:  # WGSL can't order bools
        return dt.int32
    return r


def binary_result(op: Op, a: dt.DType, b: dt.DType) -> dt.DType:
    if BINARY[op].result == "bool":
        return dt.bool_
    return binary_operand_type(op, a, b)
