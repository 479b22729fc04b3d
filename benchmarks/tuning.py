"""`--tune` for the benchmark scripts: set kernel TUNING knobs by name for one run, so a same-run
A/B of a knob needs no code edit ("gemv.glu_rows=8,coop.bk_small=64")."""
from __future__ import annotations


def modules() -> dict:
    from tensorgpu.kernels import gemv, matmul, matmul_coop, quant
    return {"gemv": gemv.TUNING, "quant": quant.TUNING, "matmul": matmul.TUNING, "coop": matmul_coop.TUNING}


def parse(spec: str) -> dict:
    """{(module, knob): value} of "mod.knob=value,..." (ints stay ints, None is None)."""
    mods = modules()
    out = {}
    for item in filter(None, spec.split(",")):
        key, val = item.split("=")
        mod, knob = key.split(".")
        if mod not in mods or knob not in mods[mod]:
            raise SystemExit(f"--tune: no knob {key!r} (modules {', '.join(mods)}; {mod}.TUNING has "
                             f"{', '.join(mods.get(mod, {}))})")
        out[(mod, knob)] = None if val == "None" else int(val) if val.lstrip("-").isdigit() else val
    return out


def apply(spec: str) -> dict:
    """Set the knobs of `spec` for the rest of the process; returns {"mod.knob": value}."""
    mods = modules()
    done = {}
    for (mod, knob), val in parse(spec).items():
        mods[mod][knob] = val
        done[f"{mod}.{knob}"] = val
    return done
