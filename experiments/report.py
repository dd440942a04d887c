"""The README's tables, printed from a comparison's JSON, so every number there is regenerated, never retyped.

  python -m experiments.report experiments/results/arith_oracle.json
prints two markdown tables: per method the chosen rate, test Pass@1/8/32 (mean over seeds [95% t-interval]),
sampled tokens and wall time per run; then DistIL minus each baseline, seed by seed, with the sign test.
"""

import json
import sys


def interval(ci: dict, fmt: str = ".3f") -> str:
  """`mean [lo, hi]`, or the mean alone when there is no interval (one seed); fmt "+.3f" for differences."""
  if ci["ci"] is None:
    return f"{ci['mean']:{fmt}}"
  return f"{ci['mean']:{fmt}} [{ci['ci'][0]:{fmt}}, {ci['ci'][1]:{fmt}}]"


def sign(test: dict) -> str:
  """`4/5 up, p=0.38`: positive differences over non-tied seeds and the two-sided exact p."""
  return f"{test['positive']}/{test['n']} up, p={test['p_two_sided']:.3g}"


def tables(summary: dict, ks=("pass@1", "pass@8", "pass@32")) -> str:
  table = summary["table"]
  ks = [k for k in ks if k in next(iter(table.values()))["test"]]
  head = ["method", "lr (val. Pass@1 per rate)", "val. Pass@1 start"] + [f"test {k}" for k in ks]
  lines = ["| " + " | ".join([*head, "sampled tokens", "wall per run"]) + " |", "|---" * (len(head) + 2) + "|"]
  for method, row in table.items():
    grid = ", ".join(f"{lr}: {v:.3f}" for lr, v in row["validation_pass@1"].items())
    cells = [method, f"**{row['chosen_lr']:g}** ({grid})", interval(row["validation_pass@1_start"])]
    cells += [interval(row["test"][k]) for k in ks]
    cells += [f"{row['sampled_tokens_mean'] / 1e3:.0f}k", f"{row['wall_seconds_mean']:.0f} s"]
    lines.append("| " + " | ".join(cells) + " |")
  paired = next((v for k, v in summary.items() if k.startswith("paired_")), {})
  if paired:
    lines += ["", "| DistIL minus | " + " | ".join(f"{k}: mean [95% CI]; per seed; sign test" for k in ks) + " |"]
    lines.append("|---" * (len(ks) + 1) + "|")
    for method, by_k in paired.items():
      cells = [method]
      for k in ks:
        d = by_k[k]
        cells.append(f"{interval(d, '+.3f')}; {' '.join(f'{x:+.3f}' for x in d['diffs'])}; {sign(d['sign_test'])}")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(paths):
  for path in paths:
    with open(path) as f:
      summary = json.load(f)
    p = summary["protocol"]
    print(
      f"{path}: expert {p['expert']}, size {p['size']}, seeds {p['seeds']}, rates {p['lrs']}, "
      f"{p['wall_seconds_total'] / 60:.0f} min with {p.get('jobs', 1)} job(s)\n"
    )
    print(tables(summary) + "\n")


if __name__ == "__main__":
  main(sys.argv[1:])
