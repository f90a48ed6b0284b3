"""The per-phase benchmark's report (launch/bench.py): its phases, the scaling against a baseline report, the
on-screen table."""

PHASES = ("filter_train", "score", "select", "select_1k", "eval_train")
LABELS = {"filter_train": "filter training", "score": "scoring", "select": "selection",
          "select_1k": "selection, 1.28M", "eval_train": "eval training"}


def add_scaling(report, baseline):
    """Add speedup and efficiency (speedup per added process) per phase against a baseline report."""
    factor = report["processes"] / baseline["processes"]
    for name, ph in report["phases"].items():
        base = baseline["phases"].get(name)
        if base and base.get("images_per_s"):
            ph["baseline_processes"] = baseline["processes"]
            ph["speedup"] = ph["images_per_s"] / base["images_per_s"]
            ph["efficiency"] = ph["speedup"] / factor
    return report


def format_table(*reports):
    """The on-screen table of one report, or of several (e.g. 1 and N processes) phase by phase."""
    def num(v, fmt="{:,.0f}"):
        return "-" if v is None else fmt.format(v)
    lines = []
    for r in reports:
        lines.append(f"{r['data']} {'x'.join(map(str, r['image_shape']))}, {r['model']['name']}, "
                     f"{r['processes']} process(es) on {r['device']} ({r['threads_per_process']} threads each), "
                     f"precision {r['mixed_precision']}, channels_last {r['channels_last']}, "
                     f"compile {r['compile']}, KD {r['kd']}")
    cpu = any("cpu_ratio" in p for r in reports for p in r["phases"].values())
    cols = f"{'phase':<18}{'procs':>6}{'images/s':>12}{'seconds':>10}{'ceiling':>12}{'ratio':>7}"
    cols += f"{'cpu ratio':>10}" if cpu else ""
    cols += f"{'peak MB/rank':>16}"
    scaled = any("speedup" in p for r in reports for p in r["phases"].values())
    if scaled:
        cols += f"{'speedup':>9}{'effic.':>8}"
    lines += [cols, "-" * len(cols)]
    for name in PHASES:
        for r in reports:
            p = r["phases"].get(name)
            if p is None:
                continue
            mem = "/".join(f"{m:.0f}" for m in p["peak_mem_mb"])
            line = (f"{LABELS[name]:<18}{r['processes']:>6}{num(p['images_per_s']):>12}"
                    f"{num(p['seconds'], '{:.3f}'):>10}{num(p['ceiling_images_per_s']):>12}"
                    f"{num(p['ratio'], '{:.2f}'):>7}")
            line += f"{num(p.get('cpu_ratio'), '{:.2f}'):>10}" if cpu else ""
            line += f"{mem:>16}"
            if scaled:
                line += f"{num(p.get('speedup'), '{:.2f}x'):>9}{num(p.get('efficiency'), '{:.2f}'):>8}"
            lines.append(line)
    return "\n".join(lines)
