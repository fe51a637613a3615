"""The report's results as Markdown tables (`report.md`) and PNG figures (matplotlib, drawn
without a display): reliability diagrams, the missing-modality matrix and the noise curves; and
the README's results section filled from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURES = ("reliability.png", "modality_matrix.png", "xray_noise.png")
MIN_BIN_EVENTS = 10  # reliability diagrams draw the confidence bins with at least this many


def _ci(row: dict) -> str:
    lo, hi = row["interval"]
    return f"{row['mean' if 'mean' in row else 'value']:.3f} [{lo:.3f}, {hi:.3f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _headline(h: dict) -> list[str]:
    m, s = h["metrics"], h["settings"]
    out = [
        "## Held-out results",
        f"Default training on a fresh cohort (seed {s['seed']}; development used seed 0): "
        f"{s['patients']} patients, {s['epochs']} epochs, {h['seconds']} s of training. Each value "
        "is on the test split with its bootstrap 95 % interval; the baseline ignores the inputs; "
        "the ceiling is what the generator allows (`cohort/ceilings.py`; none where no closed "
        "form is derived).",
        "",
    ]
    rows = [
        [
            f"`{t}`",
            r["metric"],
            _ci(r),
            f"{r['baseline']:.3f}",
            "" if r["ceiling"] is None else f"{r['ceiling']:.3f}",
        ]
        for t, r in m["tasks"].items()
    ]
    out += _table(["task", "metric", "value [95 % CI]", "baseline", "ceiling"], rows)
    out += ["", "Real data (fixed splits), beside a logistic regression on the same split:", ""]
    rows = [
        [
            f"`{t}` ({source})",
            r["metric"],
            _ci(r),
            f"{r['logistic_regression']:.3f}",
            f"{r['baseline']:.3f}",
            str(r["n"]),
        ]
        for source, tasks in m.get("real_data", {}).items()
        for t, r in tasks.items()
    ]
    out += _table(
        [
            "task (source)",
            "metric",
            "value [95 % CI]",
            "logistic regression",
            "baseline",
            "test items",
        ],
        rows,
    )
    out += ["", "### Calibration (test split; temperatures fitted on validation)", ""]
    rows = [
        [
            f"`{t}`",
            f"{r['temperature']:.2f}",
            f"{r['before']['ece']:.3f} → {r['after']['ece']:.3f}",
            f"{r['before']['brier']:.3f} → {r['after']['brier']:.3f}",
            f"{r['before']['nll']:.3f} → {r['after']['nll']:.3f}",
        ]
        for t, r in m["calibration"].items()
    ]
    out += _table(["task", "T", "ECE", "Brier", "NLL"], rows)
    out += ["", "![reliability diagrams](reliability.png)", ""]
    out += _ood(h["out_of_distribution"], m["out_of_distribution"])
    return out


def _ood(ood: dict, fitted: dict) -> list[str]:
    out = [
        "### Out-of-distribution flag",
        "",
        "Thresholds (95 % of validation inputs under them) and the share of held-out test "
        "inputs flagged:",
        "",
    ]
    out += _table(
        ["modality", *fitted],
        [
            ["threshold", *(f"{r['threshold']:.2f}" for r in fitted.values())],
            ["test flagged", *(f"{r['flagged']:.0%}" for r in fitted.values())],
        ],
    )
    out += ["", "Real scans pydicom ships:", ""]
    rows = [
        [
            r["modality"],
            f"`{r['file']}`",
            *(
                ("refused: " + r["refused"], "", "")
                if "refused" in r
                else (
                    f"{r['score']:.2f}",
                    f"{r['threshold']:.2f}",
                    "**yes**" if r["flagged"] else "no",
                )
            ),
        ]
        for r in ood["real_scans"]
    ]
    out += _table(["modality", "file", "score", "threshold", "flagged"], rows)
    shifts = list(next(iter(ood["shifted"].values())))
    out += ["", "Shifted test patients: mean score (share flagged):", ""]
    rows = [
        [m, *(f"{r[s]['mean']:.2f} ({r[s]['flagged']:.0%})" for s in shifts)]
        for m, r in ood["shifted"].items()
    ]
    out += _table(["modality", *shifts], rows)
    if ood["held_out_cell_types"]:
        out += [
            "",
            "A real cell type held out of training (scRNA model trained without it): "
            "AUROC of the OOD score, its cells against the other types' test cells:",
            "",
        ]
        rows = [
            [name, str(r["cells"]), f"{r['auroc']:.3f}", f"{r['flagged']:.0%}"]
            for name, r in ood["held_out_cell_types"].items()
        ]
        mean = np.mean([r["auroc"] for r in ood["held_out_cell_types"].values()])
        rows.append(["**mean**", "", f"**{mean:.3f}**", ""])
        out += _table(["held-out type", "its cells", "AUROC", "flagged"], rows)
    return out


def _comparisons(c: dict) -> list[str]:
    s = c["settings"]
    out = [
        "## Separately trained comparisons",
        f"Each model trained alone on the same cohort and split ({s['patients']} patients, "
        f"{s['epochs']} epochs, batch 32), seeds {', '.join(map(str, s['seeds']))}. Values: the "
        "mean over seeds [95 % interval: bootstrap over test patients, seeds averaged per "
        "resample], then each seed's value.",
        "",
    ]
    rows = [
        [name, task.replace("_", " "), _ci(r), ", ".join(f"{v:.3f}" for v in r["seeds"])]
        for key, r in c["values"].items()
        for name, task in [key.split(" | ")]
    ]
    out += _table(["model", "task", "value [95 % CI]", "per seed"], rows)
    out += ["", "Multitask minus single-task (the same test patients; paired):", ""]
    rows = [
        [f"`{t}`", _ci(r), ", ".join(f"{v:+.3f}" for v in r["seeds"])]
        for t, r in c["multitask_minus_single_task"].items()
    ]
    out += _table(["task", "difference [95 % CI]", "per seed"], rows)
    out += [
        "",
        "Disease accuracy by the modalities a request carries (rows) and the model "
        "(columns), with the generator's ceiling for that subset:",
        "",
    ]
    models = list(dict.fromkeys(k.split(" | ")[0] for k in c["missing_modality_matrix"]))
    rows = [
        [
            subset,
            *(f"{c['missing_modality_matrix'][f'{m} | {subset}']['mean']:.3f}" for m in models),
            f"{ceiling:.3f}",
        ]
        for subset, ceiling in c["disease_ceilings"].items()
    ]
    out += _table(["modalities", *models, "ceiling"], rows)
    out += ["", "![missing-modality matrix](modality_matrix.png)", ""]
    out += ["Disease accuracy with Gaussian noise on the X-ray (sd, pixels in [0, 1]):", ""]
    names = list(dict.fromkeys(k.split(" | ")[0] for k in c["xray_noise"]))
    sigmas = list(dict.fromkeys(k.split(" | ")[1] for k in c["xray_noise"]))
    rows = [[n, *(_ci(c["xray_noise"][f"{n} | {s}"]) for s in sigmas)] for n in names]
    out += _table(["model", *sigmas], rows)
    out += ["", "![X-ray noise curves](xray_noise.png)", ""]
    return out


def _figures(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    diagrams = results["headline"]["reliability"]
    fig, axes = plt.subplots(
        2, (len(diagrams) + 1) // 2, figsize=(3 * ((len(diagrams) + 1) // 2), 6)
    )
    for ax, (task, sides) in zip(axes.flat, diagrams.items(), strict=False):
        ax.plot([0, 1], [0, 1], color="0.7", lw=1)
        for side, colour in (("before", "tab:red"), ("after", "tab:blue")):
            # A bin of a few test items is noise: drawn, it hides the curve (results.json has all).
            points = np.array([p for p in sides[side] if p[2] >= MIN_BIN_EVENTS]).reshape(-1, 3)
            ax.plot(points[:, 0], points[:, 1], "o-", color=colour, ms=3, lw=1, label=side)
        ax.set_title(task.replace("_classification", "").replace("_", " "), fontsize=9)
        ax.set_xlim(0, 1), ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(diagrams) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.supxlabel(f"confidence (bins of at least {MIN_BIN_EVENTS} test events)")
    fig.supylabel("accuracy")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)

    c = results["comparisons"]
    models = list(dict.fromkeys(k.split(" | ")[0] for k in c["missing_modality_matrix"]))
    subsets = list(c["disease_ceilings"])
    grid = np.array(
        [
            [c["missing_modality_matrix"][f"{m} | {s}"]["mean"] for m in models]
            + [c["disease_ceilings"][s]]
            for s in subsets
        ]
    )
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(models), 0.35 * len(subsets) + 1.5))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", vmin=0.25, vmax=1)
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.7 else "k"
        )
    ax.set_xticks(range(len(models) + 1), [*models, "ceiling"], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(subsets)), subsets, fontsize=8)
    ax.set_title("disease accuracy by modalities sent", fontsize=9)
    fig.colorbar(image)
    fig.tight_layout()
    fig.savefig(out / "modality_matrix.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = list(dict.fromkeys(k.split(" | ")[0] for k in c["xray_noise"]))
    for name in names:
        keys = [k for k in c["xray_noise"] if k.startswith(f"{name} | ")]
        sigma = [float(k.split(" | ")[1]) for k in keys]
        mean = [c["xray_noise"][k]["mean"] for k in keys]
        lo, hi = zip(*(c["xray_noise"][k]["interval"] for k in keys), strict=True)
        ax.plot(sigma, mean, "o-", label=name)
        ax.fill_between(sigma, lo, hi, alpha=0.2)
    ax.set_xlabel("noise sd on the X-ray"), ax.set_ylabel("disease accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "xray_noise.png", dpi=100)
    plt.close(fig)


BEGIN, END = "<!-- results: begin -->", "<!-- results: end -->"


def update_readme(readme: Path, out: Path) -> None:
    """Put report.md between the README's results markers, its figures linked from there."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no {BEGIN} ... {END} block to fill")
    folder = out.resolve().relative_to(readme.resolve().parent).as_posix()
    body = (out / "report.md").read_text().split("\n", 1)[1]  # the README has its own title
    # One level down: the README's "## Results" holds the report's sections.
    body = "\n".join("#" + line if line.startswith("#") else line for line in body.split("\n"))
    for name in FIGURES:
        body = body.replace(f"]({name})", f"]({folder}/{name})")
    head, rest = text.split(BEGIN, 1)
    readme.write_text(f"{head}{BEGIN}\n{body.strip()}\n{END}{rest.split(END, 1)[1]}")


def write_report(out: Path, results: dict) -> None:
    lines = [
        "# MultiMed Serve: results",
        "",
        "Regenerated by `multimed report --out DIR` (`results.json` holds every number).",
        "",
    ]
    lines += [*_headline(results["headline"]), "", *_comparisons(results["comparisons"])]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    _figures(out, results)
