"""Prints the README's CPU benchmark table from bench/results/cpu.json (so the README
quotes the committed run): python tools/readme_cpu_table.py"""

import json
import sys
from pathlib import Path

path = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "bench/results/cpu.json")
d = json.loads(path.read_text())
ms = lambda m, t: m[f"threads_{t}"]["median_s"] * 1e3  # noqa: E731
print("| batch | dtype | threads | cppo-native | PyTorch eager | torch.compile | floor | vs eager | vs compile | over floor |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for c in d["cases"]:
    m = c["methods"]
    for t in (1, 2):
        print(f"| {c['batch']} x {c['length']} | {c['dtype']} | {t} | {ms(m['cppo_native'], t):.2f} ms | "
              f"{ms(m['torch'], t):.1f} ms | {ms(m['torch_compile'], t):.1f} ms | {ms(m['floor'], t):.2f} ms | "
              f"**{c[f'speedup_vs_eager_threads_{t}']:.1f}x** | {c[f'speedup_vs_compile_threads_{t}']:.1f}x | "
              f"{c[f'over_floor_threads_{t}']:.1f}x |")
print()
print("1 -> 2 threads: " + ", ".join(f"{c['batch']}x{c['length']} {c['dtype']} {c['scaling_1_to_2']:.2f}x" for c in d["cases"]))
if all("control_scaling_1_to_2" in c for c in d["cases"]):
    print()
    print("The compute control (independent FMAs, no memory traffic) in the same run, 1 -> 2 threads: "
          + ", ".join(f"{c['batch']}x{c['length']} {c['dtype']} {c['control_scaling_1_to_2']:.2f}x" for c in d["cases"]))
