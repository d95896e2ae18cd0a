"""What a `make bench` run leaves behind, from its results and table rows: the results file's
name, the targets met, the plots' lines, the section appended to docs/PERFORMANCE.md and the
table on stdout. No measurement here; bench/run.py calls `finish` once every section has run."""

import os
import sys
from pathlib import Path

from bench import report
from bench.common import elapsed, log, rel


def results_stem(now, host, quick, sections, planned):
    """<date>-<HHMM>-<host>[-quick], plus -<sections> when a run measures only some of its
    plan's sections (`planned`): each run's raw samples and plots stay what its PERFORMANCE.md
    section names (a later run of the same day, or a partial rerun, used to overwrite them)."""
    stem = f"{now:%Y-%m-%d-%H%M}-{host}" + ("-quick" if quick else "")
    if list(sections) != list(planned):
        stem += "-" + "-".join(sections)
    return stem


def targets_met(rows):
    """{target key: met by every row judged against it} (None where no row had a value)."""
    out = {}
    for r in rows:
        if r["target_key"] and r["met"] is not None:
            out[r["target_key"]] = out.get(r["target_key"], True) and r["met"]
        elif r["target_key"]:
            out.setdefault(r["target_key"], None)
    return out


def markdown_section(res, rows, images=()):
    """The run's section of docs/PERFORMANCE.md: machine, command, load, the table, the plots'
    lines (`images`), notes, errors and missed targets."""
    m = res["machine"]
    lines = [
        f"## {res['started']} — {res['mode']} — {m['host']}",
        "",
        f"- machine: {m['cpu']}"
        + (f" (family {m['cpu_family']} model {m['cpu_model_number']})" if m.get("cpu_family") else "")
        + f", {m['cores']} cores, backend {m['backend']}, BLAS `{m['blas']}`"
        + (f" (OpenBLAS core: {m['blas_core']})" if m.get("blas_core") else "")
        + f", mlx {m.get('mlx')}, mlx-lm {m.get('mlx_lm')}",
        f"- command: `{res['command']}` (`{res['make_command']}`), {res['elapsed_s']:.0f} s",
        f"- load average (1 min) at start {res['load_start'][0]:.2f}, at end {res['load_end'][0]:.2f} "
        f"on {m['cores']} cores"
        + (
            " — **shared machine, numbers are noisy; medians quoted**"
            if max(res["load_start"][0], res["load_end"][0]) > 1.0
            else ""
        ),
        f"- models: {res['models_note']}",
        f"- raw samples: `{res['results_file']}`",
        "",
    ]
    lines.append(report.markdown_table(rows))
    lines += list(images)
    for warning in res.get("warnings", []):
        lines.append(f"Note: {warning}\n")
    if res.get("errors"):
        lines.append(
            "Errors: " + "; ".join(f"{k}: {v.splitlines()[0]}" for k, v in res["errors"].items()) + "\n"
        )
    missed = [r["name"] for r in rows if r["met"] is False]
    if missed:
        lines.append("Missed targets: " + ", ".join(missed) + " (see *Where the time goes*).\n")
    return "\n".join(lines)


def plots(res, measurements, stem, doc):
    """Each measurement's plot (those that have one), in order; a failed plot is an error of
    the run, not the end of it. Returns the lines for the doc."""
    images = []
    for m in measurements:
        if hasattr(m, "plot"):
            try:
                line = m.plot(res, stem, doc)
            except Exception as e:
                res["errors"][f"{m.SECTION} plot"] = f"{type(e).__name__}: {e}"
                continue
            if line:
                images.append(line)
    return images


def finish(res, rows, measurements, stem, doc, write_doc=True):
    """Record the rows and targets, draw the plots, write the results file (and the doc's
    section), print the table. Returns the exit status: 1 when a section failed."""
    res["load_end"] = list(os.getloadavg())
    res["elapsed_s"] = elapsed()
    res["rows"] = rows
    res["targets_met"] = targets_met(rows)
    images = plots(res, measurements, stem, doc)
    results_path = Path(f"{stem}.json")
    report.write_json(results_path, res)
    if write_doc:
        report.append_markdown(doc, markdown_section(res, rows, images))
    log(
        f"wrote {rel(results_path)}"
        + (f", {res.get('plot')}" if res.get("plot") else "")
        + ("" if not write_doc else f", appended to {rel(doc)}")
        + f" in {res['elapsed_s']:.0f}s"
    )
    sys.stdout.write(f"\n{res['make_command']} ({res['mode']}: {res['models_note']})\n")
    sys.stdout.write(report.text_table(rows))
    missed = [r["name"] for r in rows if r["met"] is False]
    sys.stdout.write(
        f"\ntargets missed: {', '.join(missed) if missed else 'none'}; "
        f"{len(res['errors'])} section error(s); {res['elapsed_s']:.0f}s\n"
    )
    return 1 if res["errors"] else 0
