"""regfuse against the loops people write, on this machine: ``make bench``.

Runs every operation on every workload with every provider (see ``providers.py``),
prints a table and the performance targets, and writes a CSV and plots under
``benchmarks/results/``. ``--markdown FILE`` also writes the tables as Markdown.

The default run is short (a few minutes on a 2-core CPU): on the CPU it leaves out
the transformer-sized lists, ``torch.compile`` and the largest sweep points; ``--full``
runs them all.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import itertools
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch

import host_overhead
import providers as prov
import report
import targets
import timing
import workloads

try:
    import regfuse
except ImportError:
    sys.exit("regfuse is not importable: run `make build` first (or `make bench`)")

RESULTS = Path(__file__).resolve().parent / "results"
SHORT_CPU_WORKLOADS = ["resnet50", "tiny_2000x256", "resnet50_mixed", "activations", "sweep"]
# The short CPU run also times gradient clipping on these, for its targets.
SHORT_CPU_CLIP_WORKLOADS = ["gpt2_small", "gpt2_small_mixed", "tiny_2000x256_mixed"]
ALL_WORKLOADS = ["resnet50", "bert_base", "gpt2_small", "vit_b16", "tiny_2000x256",
                 "resnet50_mixed", "gpt2_small_mixed", "tiny_2000x256_mixed", "activations", "sweep"]
MAX_COPIES = 64  # CUDA: copies of a small list rotated through, so that L2 never holds them


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="cpu or cuda (default: cuda when there is a GPU)")
    parser.add_argument("--workloads", nargs="+", metavar="NAME",
                        help=f"any of {ALL_WORKLOADS} (default: all; short CPU run: "
                             f"{SHORT_CPU_WORKLOADS})")
    parser.add_argument("--ops", nargs="+", metavar="OP", choices=list(prov.OPS),
                        help=f"any of {list(prov.OPS)} (default: all)")
    parser.add_argument("--backends", nargs="+", metavar="NAME",
                        help="regfuse backends to run (default: every one available here; "
                             "the Triton interpreter is never run on the CPU)")
    parser.add_argument("--full", action="store_true",
                        help="every workload, the sweep up to 1e8 elements, torch.compile")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of the naive loops (default: on for CUDA "
                             "and --full, off for the short CPU run)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="interleaved rounds per measurement (default 7 on CPU, 5 on CUDA)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="no new round after this long on one measurement, once 3 rounds "
                             "are done (default 6 s for the short CPU run, else unlimited)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="CSV path (default benchmarks/results/bench_<device>.csv)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--check", action="store_true",
                        help="first check that every provider agrees with the naive loop")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also write the tables and targets as Markdown")
    parser.add_argument("--host-overhead", action=argparse.BooleanOptionalAction, default=None,
                        help="time per call on small lists with backend='auto', with and without "
                             "Triton (host_overhead.py; default: on unless --workloads or --ops is given)")
    parser.add_argument("--host-only", action="store_true",
                        help="only the host-overhead section")
    parser.add_argument("--activation-batch", type=int, default=None,
                        help="batch of the captured activations (default 2 on CPU, 16 on CUDA)")
    return parser.parse_args(argv)


def regfuse_backends(device: torch.device, wanted: Optional[list[str]]) -> list[str]:
    available = [b for b in regfuse.available_backends(device)
                 if not (device.type == "cpu" and b == "triton")]  # the interpreter
    if wanted is None:
        return available
    unknown = [b for b in wanted if b not in available]
    if unknown:
        sys.exit(f"backend(s) {unknown} not available for {device}; available: {available}")
    return wanted


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _announce_compile(provider: str) -> None:
    if provider == "compile":
        _log("    torch.compile: compiling the naive loop (first call)...")


def _states(op: prov.Op, workload: workloads.Workload, tensors: list[torch.Tensor],
            device: torch.device) -> list[prov.State]:
    """One state, or on CUDA enough copies of a small list that L2 cannot hold them all."""
    copies = 1
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
        copies = min(MAX_COPIES, -(-2 * l2_bytes // max(1, workload.nbytes)))
    return [prov.make_state(op, tensors, clone=k > 0) for k in range(copies)]


def _rotating(provider: prov.Provider, states: list[prov.State]):
    if len(states) == 1:
        state = states[0]
        return lambda: provider(state)
    turn = itertools.count()
    return lambda: provider(states[next(turn) % len(states)])


def run_group(workload: workloads.Workload, op: prov.Op, tensors: list[torch.Tensor],
              device: torch.device, args: argparse.Namespace, backends: list[str],
              with_compile: bool) -> list[report.Row]:
    """Time every provider of ``op`` on ``workload``, interleaved; one row per provider."""
    providers = prov.providers(op, backends, with_compile)
    if args.check:
        for name, provider in providers.items():
            problem = name != "naive" and prov.mismatch(op, tensors, provider, providers["naive"])
            if problem:
                _log(f"    MISMATCH {name} vs naive: {problem}")
    states = _states(op, workload, tensors, device)
    fns = {name: _rotating(p, states) for name, p in providers.items()}
    timings = timing.measure(fns, device, args.repeat, args.budget, progress=_announce_compile)
    launches = {name: timing.kernel_launches(fn, device) for name, fn in fns.items()}
    errors = {name: prov.relative_error(op, tensors, p) for name, p in providers.items()}
    return report.group_rows(workload, op, timings, launches, errors)


def _summary_line(rows: list[report.Row]) -> str:
    return " | ".join(f"{r.provider} {r.median_s * 1e3:.3g} ms" for r in rows)


def context(device: torch.device, limits: timing.Limits) -> dict[str, str]:
    """What the numbers depend on: written into the CSV and the Markdown header."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": f"{device.type}: {name}", "torch": torch.__version__,
            "triton": triton_version, "regfuse": regfuse.__version__,
            "python": platform.python_version(),
            "read_limit_gbps": f"{limits.read / 1e9:.2f}", "copy_limit_gbps": f"{limits.copy / 1e9:.2f}"}


def write_markdown(path: Path, ctx: dict[str, str], rows: list[report.Row],
                   outcomes: list[targets.Outcome], command: str,
                   host_rows: Optional[list[report.Row]] = None) -> None:
    header = [f"- {key}: {value}" for key, value in ctx.items()]
    sections = [f"# Benchmark results\n\n`{command}`", "\n".join(header), "## Targets",
                targets.markdown(outcomes), "## Timings",
                "`% limit`: against the read limit for read-only ops, the copy limit for ops "
                "that write; speed-ups against the same run's baselines."]
    for workload in dict.fromkeys(r.workload for r in rows):
        sections += [f"### {workload}",
                     report.markdown_table([r for r in rows if r.workload == workload])]
    if host_rows:
        sections += ["## Host overhead per call (backend='auto')",
                     "`regfuse_auto_no_triton` ran in a subprocess where `import triton` fails; its "
                     "speed-ups are against that subprocess's own baselines (not shown)."]
        for workload in dict.fromkeys(r.workload for r in host_rows):
            sections += [f"### {workload} (host overhead)",
                         report.markdown_table([r for r in host_rows if r.workload == workload])]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(sections) + "\n")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    short_cpu = device.type == "cpu" and not args.full
    args.repeat = args.repeat or (5 if device.type == "cuda" else 7)
    if args.budget is None:
        args.budget = 6.0 if short_cpu else float("inf")
    with_compile = args.compile if args.compile is not None else not short_cpu
    backends = regfuse_backends(device, args.backends)
    clip_only = SHORT_CPU_CLIP_WORKLOADS if short_cpu and not args.workloads else []
    loads = workloads.select(
        args.workloads, largest_sweep=3e6 if short_cpu else 1e8,
        activation_batch=args.activation_batch or (2 if device.type == "cpu" else 16),
        default=SHORT_CPU_WORKLOADS + clip_only if short_cpu else ALL_WORKLOADS)
    ops = [prov.OPS[name] for name in (args.ops or prov.OPS)]
    groups = [(w, op) for w in loads for op in ops if w.kind in op.kinds
              and (w.name not in clip_only or op.name in prov.CLIP_OPS)]
    host = args.host_only or (args.host_overhead if args.host_overhead is not None
                              else not (args.workloads or args.ops))
    if args.host_only:
        groups = []

    started = time.perf_counter()
    _log(f"regfuse {regfuse.__version__} on {device}; backends {backends}; "
         f"torch.compile {'on' if with_compile else 'off'}; {len(groups)} measurements")
    limit_numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    limits = timing.measure_limits(device, limit_numel, args.repeat)
    _log(f"bandwidth limits: read (flat.sum()) {limits.read / 1e9:.1f} GB/s, "
         f"copy {limits.copy / 1e9:.1f} GB/s (measured again at the end; the higher counts)")

    rows: list[report.Row] = []
    done = 0
    for workload in loads:
        mine = [op for w, op in groups if w is workload]
        if not mine:
            continue
        tensors = workload.make(device)
        for op in mine:
            done += 1
            _log(f"[{done}/{len(groups)}] {workload.name} ({workload.num_tensors} tensors, "
                 f"{workload.nbytes / 1e6:.1f} MB) {op.name}")
            group = run_group(workload, op, tensors, device, args, backends, with_compile)
            _log(f"    {_summary_line(group)}   [{time.perf_counter() - started:.0f} s]")
            rows += group
        del tensors
        gc.collect()
    host_rows: list[report.Row] = []
    if host:
        _log(f"host overhead per call ({', '.join(host_overhead.WORKLOADS)}; backend='auto')")
        host_rows = host_overhead.run(device, args.repeat, min(args.budget, 2.0), _log)
    # Bandwidth varies with what else the machine is doing: a second measurement at the
    # end keeps one slow moment from setting a low limit for the whole run.
    limits = limits.best(timing.measure_limits(device, limit_numel, args.repeat))
    rows = [report.with_limits(row, limits) for row in rows]

    outcomes = targets.evaluate(rows, limits, device.type) if rows else []
    if host_rows:
        cases = list(dict.fromkeys((r.workload, r.op) for r in host_rows))
        outcomes += [t.evaluate(host_rows) for t in targets.host_targets(cases)]
    print(report.text_table(rows))
    if host_rows:
        print("\nHost overhead per call (backend='auto')\n" + report.text_table(host_rows))
    print(f"\nbandwidth limits: read {limits.read / 1e9:.2f} GB/s, copy {limits.copy / 1e9:.2f} GB/s"
          f"; % limit is against read for read-only ops, copy for ops that write")
    print("\nTargets\n" + targets.text(outcomes))

    ctx = context(device, limits)
    csv_path = args.csv or RESULTS / f"bench_{device.type}.csv"
    report.write_csv(rows + host_rows, csv_path, ctx)
    written = [str(csv_path)]
    plots = not args.no_plots
    if plots and importlib.util.find_spec("matplotlib") is None:
        print("\nmatplotlib is not installed: no plots (the CSV has every number)")
        plots = False
    if plots:
        title = f"{ctx['device']}, torch {torch.__version__}"
        for name, plot in (("speedup", lambda p: report.plot_speedups(rows, p, title)),
                           ("bandwidth", lambda p: report.plot_bandwidth(rows, limits, p, title))):
            path = RESULTS / f"{name}_{device.type}.png"
            if plot(path):
                written.append(str(path))
    if args.markdown:
        write_markdown(args.markdown, ctx, rows, outcomes, "benchmarks/run.py " + " ".join(sys.argv[1:]),
                       host_rows)
        written.append(str(args.markdown))
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
