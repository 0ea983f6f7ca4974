"""Where a traced train step spends its time: top ops per timeline of a jax.profiler trace.

  python scripts/trace_summary.py /tmp/prof/lut_b256            # newest trace under it
  python scripts/trace_summary.py run.trace.json.gz --top=40 --process=/host

Reads the ``*.trace.json.gz`` that ``jax.profiler.trace`` writes (``scripts/benchmark.py
--profile_dir``). For every timeline (thread) of the matching processes (GPU ones by
default: kernels, "XLA Ops", "XLA Modules" lines), it sums the durations of the events
per name and prints the largest, with their share of that timeline's busy time. Only the
Python standard library is needed, so it runs anywhere the trace is copied to.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import sys


def find_trace(path: str) -> str:
  if os.path.isfile(path):
    return path
  found = glob.glob(os.path.join(path, "**", "*.trace.json.gz"), recursive=True)
  if not found:
    sys.exit(f"no *.trace.json.gz under {path}")
  return max(found, key=os.path.getmtime)


def summarise(trace: dict, process_filter: str, top: int) -> list[str]:
  events = trace["traceEvents"]
  processes, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      processes[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  keep = {pid for pid, name in processes.items() if process_filter in name}
  totals: dict = collections.defaultdict(collections.Counter)
  counts: dict = collections.defaultdict(collections.Counter)
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in keep:
      line = (processes[e["pid"]], threads.get((e["pid"], e.get("tid")), str(e.get("tid"))))
      totals[line][e["name"]] += e.get("dur", 0.0)
      counts[line][e["name"]] += 1
  if not totals:
    return [f"no events in processes matching {process_filter!r}; processes: "
            f"{sorted(processes.values())}"]
  out = []
  for line in sorted(totals):
    busy = sum(totals[line].values())
    out.append(f"== {line[0]} / {line[1]}: {busy / 1e3:.2f} ms busy, "
               f"{sum(counts[line].values())} events")
    for name, dur in totals[line].most_common(top):
      out.append(f"  {dur / 1e3:9.3f} ms {dur / busy:6.1%} x{counts[line][name]:<5d} {name[:150]}")
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("path", help="a *.trace.json.gz or a folder holding one (newest wins)")
  p.add_argument("--process", default="/device:", help="substring of the process names kept")
  p.add_argument("--top", type=int, default=25)
  args = p.parse_args(argv)
  path = find_trace(args.path)
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  print(f"trace: {path}")
  print("\n".join(summarise(trace, args.process, args.top)))


if __name__ == "__main__":
  main()
