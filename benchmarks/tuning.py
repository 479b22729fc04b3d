"""`--tune` and `--rules-off` for the benchmark scripts: set kernel TUNING knobs by name, or leave
graph rules out, for one run, so a same-run A/B needs no code edit ("gemv.rows=4,coop.bk_small=64";
"fold_glu_into_gemv")."""
from __future__ import annotations


def modules() -> dict:
    from tensorgpu.kernels import attention, gemv, matmul, matmul_coop, quant
    return {"gemv": gemv.TUNING, "quant": quant.TUNING, "matmul": matmul.TUNING, "coop": matmul_coop.TUNING,
            "attention": attention.DECODE_TUNING}


def parse(spec: str) -> dict:
    """{(module, knob): value} of "mod.knob=value,..." (ints stay ints, None is None)."""
    mods = modules()
    out = {}
    for item in filter(None, spec.split(",")):
        key, val = item.split("=", 1)
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


def rules_off(spec: str) -> list:
    """Drop the graph rules named in "a,b" (tensorgpu/rewrites.py) for the rest of the process, to
    measure what they save; returns their names. `rules_restored()` puts them back."""
    from tensorgpu import rewrites
    off = [r for r in spec.split(",") if r]
    unknown = set(off) - {r.__name__ for r in rewrites.RULES}
    if unknown:
        raise SystemExit(f"--rules-off: no rule {sorted(unknown)} (rules: {', '.join(r.__name__ for r in rewrites.RULES)})")
    rewrites.RULES[:] = [r for r in rewrites.RULES if r.__name__ not in off]
    return off


class restored:
    """Context manager: TUNING knobs and graph rules as they were on entry, after the block."""

    def __enter__(self):
        from tensorgpu import rewrites
        self.knobs = {k: dict(v) for k, v in modules().items()}
        self.rules = list(rewrites.RULES)
        return self

    def __exit__(self, *exc):
        from tensorgpu import rewrites
        for k, v in modules().items():
            v.clear()
            v.update(self.knobs[k])
        rewrites.RULES[:] = self.rules
        return False
