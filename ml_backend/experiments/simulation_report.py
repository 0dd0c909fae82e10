"""The simulation's results as a reader sees them: IoU tables by labelled count, gains over random,
labels needed to reach random's final IoU, a CSV and the learning-curve plot."""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ml_backend.experiments.simulation_setup import FULL
from sdk.strategies import STRATEGIES


def curves(rows: list[dict]) -> tuple[dict[str, dict[int, dict[int, float]]], dict[int, float]]:
    """IoU by strategy -> labelled count -> seed, and the full-supervision IoU by seed."""
    table: dict[str, dict[int, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    full = {}
    for row in rows:
        if row["strategy"] == FULL:
            full[row["seed"]] = row["iou"]
        else:
            table[row["strategy"]][row["labeled"]][row["seed"]] = row["iou"]
    return table, full


def fmt(values: Sequence[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def budget_to_reach(budgets: list[int], means: list[float], target: float) -> float | None:
    """Labels needed for the mean curve to reach `target`, interpolated between budgets."""
    for i, (b, m) in enumerate(zip(budgets, means, strict=True)):
        if m >= target:
            if i == 0:
                return float(b)
            b0, m0 = budgets[i - 1], means[i - 1]
            return b0 + (b - b0) * (target - m0) / (m - m0)
    return None


def markdown(rows: list[dict], max_columns: int = 12) -> str:
    table, full = curves(rows)
    strategies = [s for s in STRATEGIES if s in table] + sorted(set(table) - set(STRATEGIES))
    budgets = sorted({b for s in table.values() for b in s})
    shown = budgets
    if len(budgets) > max_columns:
        shown = sorted({budgets[int(round(i))] for i in np.linspace(0, len(budgets) - 1, max_columns)})
    head = "| strategy | " + " | ".join(str(b) for b in shown) + " |"
    rule = "|---" * (len(shown) + 1) + "|"
    lines = ["IoU (mean ± sd over seeds) by number of labelled patches:", "", head, rule]
    for s in strategies:
        lines.append(f"| {s} | " + " | ".join(fmt(list(table[s][b].values())) for b in shown) + " |")
    if full:
        lines += ["", f"Full supervision (whole pool): IoU {fmt(list(full.values()))}."]
    if "random" in table:
        rand = table["random"]
        lines += [
            "",
            "Gain over random at equal budget (IoU difference paired by seed, mean ± sd; in brackets "
            "relative to random's mean IoU):",
            "",
            head,
            rule,
        ]
        for s in strategies:
            if s == "random":
                continue
            cells = []
            for b in shown:
                seeds = sorted(set(table[s][b]) & set(rand.get(b, {})))
                gains = [table[s][b][k] - rand[b][k] for k in seeds]
                base = float(np.mean([rand[b][k] for k in seeds])) if seeds else 0.0
                relative = f" ({100 * np.mean(gains) / base:+.0f} %)" if gains and base > 0 else ""
                cells.append(fmt(gains) + relative)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        final = max(rand)
        target = float(np.mean(list(rand[final].values())))
        lines += [
            "",
            f"Labels needed to reach random's final IoU ({target:.3f} at {final} patches), "
            "as a fraction of random's budget (mean curve, interpolated; – = not reached):",
            "",
            "| strategy | labels | fraction |",
            "|---|---|---|",
        ]
        for s in strategies:
            bs = sorted(table[s])
            need = budget_to_reach(bs, [float(np.mean(list(table[s][b].values()))) for b in bs], target)
            cell = "– | –" if need is None else f"{need:.0f} | {need / final:.2f}"
            lines.append(f"| {s} | {cell} |")
    return "\n".join(lines)


COLOURS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def plot(rows: list[dict], path: Path, size: tuple[int, int] = (960, 600)) -> None:
    """Learning curves (mean, min–max band over seeds) with full supervision as a dashed line (PIL)."""
    from PIL import Image, ImageDraw

    table, full = curves(rows)
    strategies = [s for s in STRATEGIES if s in table] + sorted(set(table) - set(STRATEGIES))
    budgets = sorted({b for s in table.values() for b in s})
    values = [v for s in table.values() for b in s.values() for v in b.values()] + list(full.values())
    if not budgets or not values:
        raise ValueError("no results to plot")
    width, height = size
    left, right, top, bottom = 70, 170, 30, 60
    x0, x1 = min(budgets), max(budgets) if max(budgets) > min(budgets) else min(budgets) + 1
    y0, y1 = max(0.0, min(values) - 0.02), min(1.0, max(values) + 0.02)
    y1 = y1 if y1 > y0 else y0 + 0.1

    def px(b: float, v: float) -> tuple[float, float]:
        return (
            left + (b - x0) / (x1 - x0) * (width - left - right),
            top + (y1 - v) / (y1 - y0) * (height - top - bottom),
        )

    image = Image.new("RGBA", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for v in np.linspace(y0, y1, 6):
        x, y = px(x0, v)
        draw.line([x - 5, y, x, y], fill="black")
        draw.text((8, y - 6), f"{v:.3f}", fill="black")
    for b in budgets[:: max(1, len(budgets) // 10)]:
        x, y = px(b, y0)
        draw.line([x, y, x, y + 5], fill="black")
        draw.text((x - 8, y + 8), str(b), fill="black")
    draw.text((left + 200, height - 25), "labelled patches", fill="black")
    draw.text((left, 8), "IoU on the test half (mean, band: min-max over seeds)", fill="black")
    for i, s in enumerate(strategies):  # every band first, so no band tints another's mean line
        bs = sorted(table[s])
        lo = [px(b, min(table[s][b].values())) for b in bs]
        hi = [px(b, max(table[s][b].values())) for b in bs]
        band = Image.new("RGBA", size, (0, 0, 0, 0))
        if len(bs) > 1:
            ImageDraw.Draw(band).polygon(lo + hi[::-1], fill=(*COLOURS[i % len(COLOURS)], 40))
        image.alpha_composite(band)
    draw = ImageDraw.Draw(image)
    for i, s in enumerate(strategies):
        colour = COLOURS[i % len(COLOURS)]
        mean = [px(b, float(np.mean(list(table[s][b].values())))) for b in sorted(table[s])]
        if len(mean) > 1:
            draw.line(mean, fill=colour, width=2)
        ly = top + 10 + 18 * i
        draw.line([width - right + 10, ly + 6, width - right + 35, ly + 6], fill=colour, width=3)
        draw.text((width - right + 40, ly), s, fill="black")
    if full:
        v = float(np.mean(list(full.values())))
        _, y = px(x0, v)
        for x in range(left, width - right, 12):
            draw.line([x, y, min(x + 6, width - right), y], fill="black", width=2)
        ly = top + 10 + 18 * len(strategies)
        draw.line([width - right + 10, ly + 6, width - right + 35, ly + 6], fill="black", width=2)
        draw.text((width - right + 40, ly), "full pool", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.convert("RGB").save(path)


def write_csv(rows: list[dict], path: Path) -> None:
    columns = [
        "strategy",
        "seed",
        "round",
        "labeled",
        "iou",
        "dice",
        "steps",
        "kept_start",
        "pseudo",
        "seconds",
    ]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["strategy"], r["seed"], r["round"])))


def run_summary(runs: list[dict]) -> list[str]:
    """The wall time and machine of the invocations that produced the results."""
    if not runs:
        return []
    wall = sum(r["wall_seconds"] for r in runs)
    machines = sorted(
        {
            f"{r['cores']} cores ({r['cpu']}), {r['jobs']} process(es) x {r['threads']} torch thread(s), "
            f"device {r['device']}, Python {r['python']}, torch {r['torch']}"
            for r in runs
        }
    )
    return [
        f"Wall time: {wall / 3600:.2f} h ({wall:.0f} s) in {len(runs)} invocation(s), "
        f"{sum(r['rounds'] for r in runs)} rounds; machine: {'; '.join(machines)}.",
        "",
    ]
