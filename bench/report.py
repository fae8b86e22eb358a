"""BENCHMARKS.md's tables, generated from the raw result files in bench/results/.

    python -m bench.report           # rewrite the tables in BENCHMARKS.md in place
    python -m bench.report --check   # exit 1 when BENCHMARKS.md differs from what it would write

Each table sits between `<!-- table: NAME -->` and `<!-- end table -->`, and everything between the two markers
is replaced. A result file (written by bench/run.py, or by bench/gpu_check*.sh on a GPU) goes to the table its
"table" field names. Under each table, a numbered list gives every result file it uses: the command, commit,
date, machine and versions. Rows of files marked "transcribed" (copied by hand from an earlier log whose raw output
was not kept) say so in the row and in that list.
"""

import argparse
import difflib
import json
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import PEAK_BF16_FLOPS, SHAPES, VARIANT_FLAGS, flops_per_token

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
BENCHMARKS = REPO / "BENCHMARKS.md"
MARKER = re.compile(r"(<!-- table: ([a-z0-9-]+) -->\n)(.*?)(<!-- end table -->)", re.S)
TRANSCRIBED = "transcribed from the original run's log (raw output not kept); re-run {} to regenerate"
NUMERIC = (
    "tokens_per_second",
    "time_to_first_step_s",
    "final_loss",
    "peak_rss_gib",
    "peak_memory_alloc_gib",
    "peak_memory_reserved_gib",
    "max_abs_diff",
    "steps",
)


# --- reading results -----------------------------------------------------------------------------------------


@dataclass
class Summary:
    """One stack and variant of one result file: medians over its runs."""

    stack: str
    variant: str
    runs: int
    values: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)


def load(results_dir: Path) -> list[dict]:
    results = []
    for path in sorted(results_dir.glob("*.json")):
        data = json.loads(path.read_text())
        missing = {"command", "commit", "date", "machine", "versions", "table", "rows"} - set(data)
        if missing:
            raise SystemExit(f"{path}: missing {', '.join(sorted(missing))}")
        results.append({**data, "file": path.name})
    return sorted(results, key=lambda r: (r["date"], r["file"]))


def summaries(result: dict) -> list[Summary]:
    """Rows grouped by (stack, variant) in order of first appearance; medians of each measured value."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["rows"]:
        groups.setdefault((row.get("stack", ""), row.get("variant", "default")), []).append(row)
    out = []
    for (stack, variant), rows in groups.items():
        good = [r for r in rows if "error" not in r]
        summary = Summary(stack, variant, sum(r.get("median_of", 1) for r in good))
        summary.errors = [r["error"] for r in rows if "error" in r]
        for key in NUMERIC:
            values = [r[key] for r in good if r.get(key) is not None]
            if values:
                summary.values[key] = statistics.median(values)
        for r in good:
            summary.notes.update(r.get("notes", {}))
        out.append(summary)
    return out


# --- formatting ----------------------------------------------------------------------------------------------


def decimals(value) -> int:
    text = repr(value)
    return len(text.split(".")[1]) if "." in text and "e" not in text else 0


def number(value, spec: str, exact: bool) -> str:
    """A measured value with the column's precision, or a transcribed one with the precision it was written in."""
    if value is None:
        return "-"
    if exact and not spec.endswith("%"):
        return f"{value:,.{decimals(value)}f}" if "," in spec else f"{value:.{decimals(value)}f}"
    return format(value, spec)


def commit_of(result: dict) -> str:
    commit = str(result["commit"])
    return commit[:7] if re.fullmatch(r"[0-9a-f]{7,40}", commit) else commit


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


class Context:
    """The result files of one table, numbered in the order they are listed under it."""

    def __init__(self, results: list[dict]):
        self.results = results
        self.index = {r["file"]: i + 1 for i, r in enumerate(results)}

    def source(self, result: dict) -> str:
        label = f"[{self.index[result['file']]}]"
        if result.get("transcribed"):
            return f"{label} transcribed"
        if not result.get("complete", True):
            return f"{label} incomplete"
        return label

    def ours(self, result: dict, variant: str):
        """tokens/s of `ours` with the same variant and commit, over this table's files (same file first)."""
        same_file = [s for s in summaries(result) if s.stack == "ours" and s.variant == variant]
        pool = same_file or [
            s
            for r in self.results
            if commit_of(r) == commit_of(result)
            for s in summaries(r)
            if s.stack == "ours" and s.variant == variant
        ]
        values = [s.values["tokens_per_second"] for s in pool if "tokens_per_second" in s.values]
        return statistics.median(values) if values else None


def sources(ctx: Context) -> str:
    """The numbered list under a table: where each of its result files comes from."""
    lines = ["", "Result files (`bench/results/`):", ""]
    for result in ctx.results:
        s = result.get("settings", {})
        machine = result["machine"]
        device = machine.get("device", "?") + (f" ({machine['note']})" if machine.get("note") else "")
        device += f", {machine['cpu_count']} CPU cores" if machine.get("cpu_count") else ""
        versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
        commit = commit_of(result) + (" with uncommitted changes" if result.get("tree_dirty") else "")
        what = []
        if s.get("batch") and s.get("seq"):
            what.append(f"{s.get('model', '?')} shape, batch {s['batch']} x {s['seq']} packed")
        if s.get("steps"):
            what.append(f"{s['steps']} steps per run")
        if "train_on_input" in s:
            what.append(f"train_on_input {str(s['train_on_input']).lower()}")
        lines.append(f"{ctx.index[result['file']]}. `{result['file']}`: `{result['command']}`")
        lines.append(
            f"   Commit {commit}; {result['date']}; {device}; {versions}" + "".join(f"; {w}" for w in what) + "."
        )
        if not result.get("complete", True):
            lines.append("   **Incomplete**: the command stopped before its last run.")
        if result.get("transcribed"):
            label = TRANSCRIBED.format(result["regenerate"])
            lines.append(f"   **{label[0].upper() + label[1:]}.** {result['source']}")
    return "\n".join(lines) + "\n"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


# --- tables --------------------------------------------------------------------------------------------------


def cell(key: str, result: dict, summary: Summary, ctx: Context) -> str:
    """One cell of a per-stack table."""
    exact = bool(result.get("transcribed"))
    v = summary.values
    s = result.get("settings", {})
    flags = VARIANT_FLAGS.get(summary.variant, {})
    if summary.errors and not summary.runs and key in ("tokens_per_second", "mfu", "vs_ours"):
        return f"failed: {summary.errors[0][:60]}"
    if key == "commit":
        return commit_of(result)
    if key == "stack":
        return summary.stack
    if key == "runs":
        return f"{summary.runs} x {s.get('steps', '?')}"
    if key == "train_on_input":
        return str(s.get("train_on_input", "?")).lower()
    if key == "compile":
        text = on_off(flags.get("compile", s.get("device") == "cuda"))
    elif key == "ac":
        text = on_off(flags.get("ac", False))
    elif key == "offload":
        text = on_off(flags.get("offload", False))
    elif key == "tokens_per_second":
        text = number(v.get(key), ",.0f", exact)
    elif key == "vs_ours":
        return (
            "1.00x" if summary.stack == "ours" else ratio(v.get("tokens_per_second"), ctx.ours(result, summary.variant))
        )
    elif key == "mfu":
        return mfu(result, v.get("tokens_per_second"))
    elif key == "gpu_memory":
        alloc, reserved = v.get("peak_memory_alloc_gib"), v.get("peak_memory_reserved_gib")
        text = "-" if alloc is None else f"{number(alloc, '.1f', exact)} / {number(reserved, '.1f', exact)} GiB"
    elif key == "peak_rss_gib":
        text = number(v.get(key), ".2f", exact) + (" GiB" if key in v else "")
    elif key == "time_to_first_step_s":
        text = number(v.get(key), ".1f", exact) + (" s" if key in v else "")
    elif key == "final_loss":
        text = number(v.get(key), ".4f", exact)
    elif key == "source":
        return ctx.source(result)
    else:
        raise KeyError(key)
    if key == "tokens_per_second" and summary.errors:
        text += f" ({len(summary.errors)} of {len(summary.errors) + summary.runs} runs failed)"
    return f"{text} ({summary.notes[key]})" if key in summary.notes else text


def mfu(result: dict, tokens_per_second) -> str:
    """Model FLOPs utilization: trained tokens/s x FLOPs per trained token / the GPU's dense bf16 peak."""
    s = result.get("settings", {})
    peak = next((p for name, p in PEAK_BF16_FLOPS.items() if name in result["machine"].get("device", "")), None)
    if tokens_per_second is None or peak is None or s.get("model") not in SHAPES:
        return "-"
    flops, _ = flops_per_token(s["model"], s["seq"])
    return f"{tokens_per_second * flops / peak:.1%}"


HEADERS = {
    "commit": "commit",
    "runs": "runs x steps",
    "train_on_input": "train_on_input",
    "stack": "stack",
    "compile": "compile",
    "ac": "activation checkpointing",
    "offload": "offloading",
    "tokens_per_second": "tokens/s",
    "vs_ours": "vs ours",
    "mfu": "MFU",
    "gpu_memory": "peak alloc / reserved",
    "peak_rss_gib": "peak RSS",
    "time_to_first_step_s": "first step",
    "final_loss": "final loss",
    "source": "result file",
}


def per_stack(columns: list[str]):
    """One row per stack and variant of each result file."""

    def render(ctx: Context) -> str:
        rows = [[cell(c, r, s, ctx) for c in columns] for r in ctx.results for s in summaries(r)]
        return markdown([HEADERS[c] for c in columns], rows)

    return render


def pair(key: str, sep: str, result: dict, a: Summary, b: Summary, ctx: Context, unit: str = "") -> str:
    """Two stacks' cells side by side ("6.2 vs 6.5 s"-style), the unit once."""
    first, second = cell(key, result, a, ctx), cell(key, result, b, ctx)
    return "-" if first == second == "-" else f"{first.removesuffix(unit)}{sep}{second}"


def ours_vs_torchtune(ctx: Context) -> str:
    """One row per result file: ours next to torchtune."""
    header = ["commit", "train_on_input", "runs x steps", "ours tokens/s", "torchtune tokens/s", "ours / torchtune"]
    header += ["first step, ours vs torchtune", "peak RSS, ours / torchtune", "final loss, ours / torchtune"]
    rows = []
    for result in ctx.results:
        by_stack = {s.stack: s for s in summaries(result) if s.variant == "default"}
        ours, theirs = by_stack.get("ours"), by_stack.get("torchtune")
        if ours is None or theirs is None:
            raise SystemExit(f"{result['file']}: table cpu-train-on-input needs the ours and torchtune stacks")

        row = [cell(k, result, ours, ctx) for k in ("commit", "train_on_input", "runs")]
        row += [cell("tokens_per_second", result, s, ctx) for s in (ours, theirs)]
        row.append(ratio(ours.values.get("tokens_per_second"), theirs.values.get("tokens_per_second")))
        both = (result, ours, theirs, ctx)
        row += [pair("time_to_first_step_s", " vs ", *both), pair("peak_rss_gib", " / ", *both, unit=" GiB")]
        row += [pair("final_loss", " / ", *both)]
        rows.append(row + [ctx.source(result)])
    return markdown(header + ["result file"], rows)


def settings_effect(ctx: Context) -> str:
    """Each memory setting of `ours` against `ours` default (compile on, no checkpointing), per commit."""
    header = ["commit", "setting", "tokens/s vs default", "peak allocated vs default", "first step", "result file"]
    names = {"ac": "activation checkpointing", "ac+offload": "checkpointing + offloading"}
    names |= {"nocompile": "compile off", "nochunk": "plain cross-entropy (no chunking)"}
    rows = []
    for commit in dict.fromkeys(commit_of(r) for r in ctx.results):
        found = {}  # variant -> (summary, result), the first file that has it
        for result in (r for r in ctx.results if commit_of(r) == commit):
            for s in summaries(result):
                if s.stack == "ours" and "tokens_per_second" in s.values:
                    found.setdefault(s.variant, (s, result))
        if "default" not in found:
            continue
        base = found["default"][0].values
        for variant, (s, result) in found.items():
            if variant == "default":
                continue
            speed = s.values["tokens_per_second"] / base["tokens_per_second"] - 1
            alloc = s.values.get("peak_memory_alloc_gib", 0) - base.get("peak_memory_alloc_gib", 0)
            first = cell("time_to_first_step_s", result, s, ctx)
            sources = " ".join(dict.fromkeys(ctx.source(r) for _, r in (found["default"], (s, result))))
            rows.append([commit, names.get(variant, variant), f"{speed:+.0%}", f"{alloc:+.1f} GiB", first, sources])
    return markdown(header, rows)


def loss_agreement(ctx: Context) -> str:
    header = ["commit", "compared", "steps compared", "largest difference, single device vs FSDP2", "result file"]
    names = {"loss": "training loss, every logged step", "val_loss": "held-out loss, every validation"}
    rows = []
    for result in ctx.results:
        for row in result["rows"]:
            steps = "-" if row.get("steps") is None else str(row["steps"])
            diff = f"{row['max_abs_diff']:g}"
            rows.append([commit_of(result), names.get(row["metric"], row["metric"]), steps, diff, ctx.source(result)])
    return markdown(header, rows)


def flops_note(ctx: Context) -> str:
    """The FLOPs count behind the MFU column, for each shape and row length in the table's files."""
    lines = []
    for model, seq in dict.fromkeys((r["settings"]["model"], r["settings"]["seq"]) for r in ctx.results):
        flops, c = flops_per_token(model, seq)
        lines.append(
            f"- FLOPs per trained token ({model} shape, rows of {seq}) = 4N + 3A + 6N_lora = {flops / 1e9:.2f} GFLOP, "
            f"where N = {c['N']:.2e} matmul parameters (tied head included), A = 2·L·S·d = {c['A']:.2e} and "
            f"N_lora = {c['N_lora']:.2e}."
        )
    peaks = ", ".join(f"{name} {peak / 1e12:.0f}" for name, peak in PEAK_BF16_FLOPS.items())
    lines.append(f"- MFU = tokens/s x FLOPs per token / the GPU's dense bf16 peak in TFLOP/s (bench/run.py: {peaks}).")
    return "\n".join(lines) + "\n"


def plan_check(ctx: Context) -> str:
    """The memory plan on a GPU (bench/gpu_plan_check.sh): per budget, the plan's choice and predicted peak next to
    the capped run's measurements; tokens/s against the same commit's run with no budget and no checkpointing."""
    header = ["commit", "budget", "plan's choice", "predicted peak", "max allocated", "predicted vs measured"]
    header += ["reserved", "tokens/s", "vs no budget", "MFU", "recompiles", "source"]
    rows = []
    for result in ctx.results:
        budget = result["settings"].get("memory_budget_gib")
        free = [
            row["tokens_per_second"]
            for r in ctx.results
            if commit_of(r) == commit_of(result) and r["settings"].get("memory_budget_gib") is None
            for row in r["rows"]
            if "tokens_per_second" in row
        ]
        for row in result["rows"]:
            label = f"{budget:g} GiB" if budget else "none"
            if "error" in row:
                failed = "failed: " + row["error"][:80].replace("|", "\\|")
                rows.append([commit_of(result), label, failed] + ["-"] * 8 + [ctx.source(result)])
                continue
            predicted, measured = row.get("predicted_peak_gib"), row.get("peak_memory_alloc_gib")
            error = f"{predicted / measured - 1:+.1%}" if predicted and measured else "-"
            tps = row["tokens_per_second"]
            rows.append(
                [
                    commit_of(result),
                    label,
                    f"`{row['plan_overrides']}`" if row.get("plan_overrides") else "as configured",
                    f"{predicted:.1f} GiB" if predicted else "-",
                    f"{measured:.1f} GiB" if measured else "-",
                    error,
                    f"{row['peak_memory_reserved_gib']:.1f} GiB" if "peak_memory_reserved_gib" in row else "-",
                    f"{tps:,.0f}",
                    f"{tps / max(free):.2f}x" if free else "-",
                    f"{row['mfu']:.1%}" if "mfu" in row else "-",
                    str(row.get("recompiles", "-")),
                    ctx.source(result),
                ]
            )
    return markdown(header, rows)


CPU_COLUMNS = ["commit", "train_on_input", "runs", "stack", "tokens_per_second", "vs_ours", "time_to_first_step_s"]
CPU_COLUMNS += ["peak_rss_gib", "final_loss", "source"]
GPU_COLUMNS = ["commit", "stack", "compile", "ac", "offload", "tokens_per_second"]
GPU_TAIL = ["gpu_memory", "time_to_first_step_s", "final_loss", "source"]
FSDP_COLUMNS = ["commit", "stack", "compile", "ac", "tokens_per_second", "vs_ours", "mfu"] + GPU_TAIL
# marker name -> (renderer, the table whose result files it reads, or None for its own)
TABLES = {
    "cpu-train-on-input": (ours_vs_torchtune, None),
    "cpu-trl": (per_stack(CPU_COLUMNS), None),
    "gpu-3b-train-on-input-true": (per_stack(GPU_COLUMNS + ["mfu"] + GPU_TAIL), None),
    "gpu-3b-train-on-input-false": (per_stack(GPU_COLUMNS + ["vs_ours"] + GPU_TAIL), None),
    "gpu-3b-flops": (flops_note, "gpu-3b-train-on-input-true"),
    "gpu-3b-settings": (settings_effect, "gpu-3b-train-on-input-true"),
    "gpu-fsdp": (per_stack(FSDP_COLUMNS), None),
    "gpu-fsdp-tiny": (loss_agreement, None),
    "gpu-plan": (plan_check, None),
}


def render(text: str, results: list[dict]) -> str:
    """BENCHMARKS.md with every marked table regenerated."""
    names = [m.group(2) for m in MARKER.finditer(text)]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise SystemExit(f"unknown table marker(s): {', '.join(unknown)}; bench/report.py knows {', '.join(TABLES)}")
    placed = {name for name in names if TABLES[name][1] is None}
    unplaced = sorted({r["table"] for r in results} - placed)
    if unplaced:
        files = [r["file"] for r in results if r["table"] in unplaced]
        raise SystemExit(
            f"no place in BENCHMARKS.md for table(s) {', '.join(unplaced)} (from {', '.join(files)}): add "
            "`<!-- table: NAME -->` and `<!-- end table -->` lines where the table belongs"
        )

    def replace(m: re.Match) -> str:
        render_table, of = TABLES[m.group(2)]
        chosen = [r for r in results if r["table"] == (of or m.group(2))]
        if not chosen:
            body = "_No result files for this table in `bench/results/`._\n"
        else:
            ctx = Context(chosen)
            body = render_table(ctx) + ("" if of else sources(ctx))
        return f"{m.group(1)}{body}{m.group(4)}"

    return MARKER.sub(replace, text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from what would be written")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of result files")
    parser.add_argument("--file", type=Path, default=BENCHMARKS, help="the Markdown file with the table markers")
    args = parser.parse_args(argv)
    old = args.file.read_text()
    new = render(old, load(args.results))
    if args.check:
        if new != old:
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), str(args.file), "generated", lineterm="")
            print("\n".join(list(diff)[:60]))
            print(f"\n{args.file} differs from its result files: run `python -m bench.report`.", file=sys.stderr)
            return 1
        print(f"{args.file}: every table matches bench/results/.")
        return 0
    if new != old:
        args.file.write_text(new)
        print(f"rewrote the tables of {args.file}")
    else:
        print(f"{args.file} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
