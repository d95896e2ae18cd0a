"""`make bench` section **settings**: the CPU settings a process starts with now (the stored
`make calibrate` choice, or core/blas.py's defaults) against every alternative, in one run: each
library present x thread policy in its own child process, alternating, each decode item once per
small_gemm row range (core/calibrate.py's measurement, the same children). Rows: each item's
median rate with the current settings against the best option's; a warning under the table when
the current settings are beaten by more than 5% (run `make calibrate`). Linux CPU only.
"""

import math

from bench import report
from bench.common import log

SECTION = "settings"
PLAN = {
    "quick": dict(
        settings_decode=["decode:bench:1", "decode:bench:8"],
        settings_train=[],
        settings_rounds=2,
        settings_tokens=8,
    ),
    "full": dict(
        settings_decode=["decode:bench:1", "decode:smollm2:1", "decode:bench:8"],
        settings_train=["train:bench"],
        settings_rounds=3,
        settings_tokens=16,
    ),
}
MARGIN = 0.05


def section(ctx):
    from core import calibrate

    plan = ctx.plan
    cands = calibrate.candidates()
    if not cands:
        ctx.res[SECTION] = {"skipped": "no BLAS library to choose (not Linux, or none installed)"}
        return
    roles = {"decode": plan["settings_decode"]} | (
        {"train": plan["settings_train"]} if plan["settings_train"] else {}
    )
    modes = calibrate.kernel_modes()
    results = calibrate.measure(
        cands, roles, plan["settings_rounds"], plan["settings_tokens"], modes, math.inf, log
    )
    current = {role: calibrate.current_settings(role) for role in roles}
    first = {role: calibrate.options(results, role, [])[0][0] for role in roles}
    base = {role: calibrate.option_of(current[role], results, role) or first[role] for role in roles}
    decision = calibrate.decide(results, roles, MARGIN, base=base)
    ctx.res[SECTION] = {
        "current": current,
        "base": base,
        "roles": roles,
        "results": results,
        "decision": decision,
    }
    for role, d in decision.items():
        best = max(d["scores"], key=d["scores"].get)
        if d["choice"] != base[role]:
            ctx.warn(
                f"settings: for {role}, {best} beats the current settings ({base[role]}) by "
                f"{d['scores'][best]:.2f}x (more than {MARGIN:.0%}): `make calibrate` measures and stores again"
            )
        log(f"settings: {role}: current {base[role]}, best {best} ({d['scores'][best]:.2f}x)")


def rows(res):
    """Per item, the current settings' median rate against the best option's (by role score)."""
    st = res.get(SECTION)
    if not st or "results" not in st:
        return []
    out = []
    for role, items in st["roles"].items():
        d = st["decision"][role]
        best = max(d["scores"], key=d["scores"].get)
        for item in items:
            ours, mine = _rates(st, role, st["base"][role], item)
            anchor, theirs = _rates(st, role, best, item)
            out.append(
                report.row(
                    f"{item}: current settings vs best",
                    report.median(ours),
                    report.median(anchor),
                    "tok/s",
                    ours_label=mine,
                    anchor_label=theirs,
                    target_key="settings_default",
                    paired=report.paired_ratio(ours, anchor),
                )
            )
    return out


def _rates(st, role, option, item):
    """(the samples of `item` under `option`, a short label)."""
    from core.calibrate import options

    for name, cand, mode in options(st["results"], role, []):
        if name == option:
            key = f"{item}|{mode}" if mode else item
            return st["results"][cand]["rates"][key], name
    return [], f"{option}?"
