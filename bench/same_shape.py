"""Do two `make bench` results files have the same shape: the same sections, the same keys at
every depth, the same table rows in the same order? Values (timings) are ignored; so are list
lengths (repetitions), not the keys of what the lists hold. For changes to bench/ that must not
change what a run records: run `make bench QUICK=1` before and after, then

    python -m bench.same_shape bench/results/BEFORE.json bench/results/AFTER.json

It prints each difference and exits 1 when there is one.
"""

import json
import sys


def key_paths(obj, prefix=""):
    """{"a.b", "a.c[].d", ...}: every key path of a JSON value; list items merged as []."""
    out = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.add(path)
            out |= key_paths(v, path)
    elif isinstance(obj, list):
        for v in obj:
            out |= key_paths(v, prefix + "[]")
    return out


def differences(before, after):
    """What differs in shape between two results (dicts), as lines; [] when nothing does."""
    out = []
    if list(before) != list(after):
        out.append(f"top-level keys: {list(before)} -> {list(after)}")
    for path in sorted(key_paths(before) - key_paths(after)):
        out.append(f"gone: {path}")
    for path in sorted(key_paths(after) - key_paths(before)):
        out.append(f"new: {path}")
    names = lambda res: [r["name"] for r in res.get("rows", [])]
    if names(before) != names(after):
        out.append(f"rows: {names(before)} -> {names(after)}")
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit("usage: python -m bench.same_shape BEFORE.json AFTER.json")
    before, after = (json.loads(open(p, encoding="utf-8").read()) for p in argv)
    diff = differences(before, after)
    print(
        "\n".join(diff)
        if diff
        else f"same shape: {len(key_paths(before))} key paths, {len(before.get('rows', []))} rows"
    )
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
