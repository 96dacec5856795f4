"""The rank-deficient architectures of the untrained validation (bench_security.py part b), re-measured after a
change to how the engine treats them: copa and copa+pull-back on the same 4 photos, the score, before and after.

"Before" is read from ``benchmarks/out/security_attacks.json`` (attacks) and ``benchmarks/out/security.json``
(scores: that file's run, which may predate later changes to the metric) as they are; "after" is measured now with the same models (seed 1), photos (``sample_images`` key 5),
labels and security key. Nothing there is overwritten.

Run from the repository root:  python benchmarks/bench_deficient.py [--models a,b,...] [--tag T]
Writes benchmarks/out/deficient[_T].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import numpy as np
import scipy.stats

from bench_security import OUT, VARIANTS, attack_psnr, build, timed_security

# the zoo models with a stage below the head of fewer rows than unknowns (cnn4_c2 left out by default: its
# security analysis alone takes ~18 minutes on 2 cores)
DEFICIENT = ("cnn2_c0", "cnn2_c2", "cnn2_c4", "cnn2_c21", "cnn2_c41", "cnn3_c2", "cnn3_c4", "cnn3_c6", "cnn3_c7",
             "cnn3_c8", "cnn3_c11")
ATTACKS = ("copa", "copa_pb")


def category(db):
    return None if db is None else ("LEAKS" if db >= 30 else "PARTIAL" if db >= 15 else "RESISTANT")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(DEFICIENT))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    names = [n for n in args.models.split(",") if n]
    old_attacks = json.loads((OUT / "security_attacks.json").read_text())
    old_rows = {r["name"]: r for r in json.loads((OUT / "security.json").read_text()).get("b", [])}
    stem = OUT / (f"deficient_{args.tag}" if args.tag else "deficient")
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}", "rows": []}
    for name in names:
        model, shape = build(name, seed=1)
        t = time.perf_counter()
        by = attack_psnr(model, shape, ATTACKS)
        sec = time.perf_counter() - t
        rep, t_sec, _ = timed_security(model, jax.random.key(0))
        before = old_attacks.get(name, {}).get("by_attack", {})
        best_before = ([max(v) for v in zip(*(before[a] for a in ATTACKS))] if all(a in before for a in ATTACKS)
                       else None)
        best = [max(v) for v in zip(*(by[a] for a in ATTACKS))]
        row = {"name": name, "set": "variant (held out)" if name in VARIANTS else "zoo (fit)",
               "before": {"by_attack": before, "best": best_before, "score": old_rows.get(name, {}).get("score")},
               "after": {"by_attack": by, "best": best, "score": rep.score, "verdict": rep.verdict.split(":")[0]},
               "attack_seconds": sec, "security_seconds": t_sec}
        res["rows"].append(row)
        print(f"{name:10s} copa {np.mean(before.get('copa', [np.nan])):5.1f} -> {np.mean(by['copa']):5.1f}  best "
              f"{np.mean(best_before) if best_before else float('nan'):5.1f} -> {np.mean(best):5.1f}  score "
              f"{row['before']['score'] or float('nan'):5.1f} -> {rep.score:5.1f}  ({sec:.0f} + {t_sec:.0f} s)",
              flush=True)
        stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    rows = res["rows"]
    ok = [r for r in rows if r["before"]["best"] is not None and r["before"]["score"] is not None]
    if len(ok) >= 3:
        def rho(side):
            return float(scipy.stats.spearmanr([r[side]["score"] for r in ok],
                                               [np.mean(r[side]["best"]) for r in ok])[0])
        res["stats"] = {side: {"n": len(ok), "spearman": rho(side),
                               "mean_abs_err": float(np.mean([abs(r[side]["score"] - np.mean(r[side]["best"]))
                                                              for r in ok])),
                               "same_verdict": float(np.mean([category(r[side]["score"]) ==
                                                              category(np.mean(r[side]["best"])) for r in ok]))}
                        for side in ("before", "after")}
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    lines = ["# Rank-deficient architectures: the layer-wise attacks and the score, before and after", "",
             f"{res['machine']}. Untrained (seed 1), 4 photos (sample_images key 5), float32; best = max(copa, "
             "copa_pb) per photo, mean over photos. Before: benchmarks/out/security_attacks.json and security.json "
             "(whose scores may predate later changes to the metric).",
             "", "| model | copa before | copa after | best before | best after | score (security.json) | score now |",
             "|---|---|---|---|---|---|---|"]
    f = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['name']} | {f(np.mean(b['by_attack']['copa']) if 'copa' in b['by_attack'] else None)} | "
                     f"{f(np.mean(a['by_attack']['copa']))} | {f(np.mean(b['best']) if b['best'] else None)} | "
                     f"{f(np.mean(a['best']))} | {f(b['score'])} | {f(a['score'])} |")
    if "stats" in res:
        lines += ["", "| | n | Spearman (score vs best) | mean abs err dB | same verdict |", "|---|---|---|---|---|"]
        for side, s in res["stats"].items():
            lines.append(f"| {side} | {s['n']} | {s['spearman']:.2f} | {s['mean_abs_err']:.1f} | "
                         f"{s['same_verdict']:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
