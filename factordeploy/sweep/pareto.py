"""Pareto frontiers and the sweep's plots (matplotlib, Agg backend, PNG).

Two figures, one panel per text domain (wiki in domain; news, pydoc out of domain):
quality vs stored weight MB (the compressed form's bytes) and quality vs ONNX Runtime latency. Quality is the
mean embedding cosine vs the original (encoders, higher is better) or perplexity (decoders,
lower is better). The frontier joins the cells no other cell beats on both axes.
"""

from __future__ import annotations

from pathlib import Path

AXES = (("weights_mb", "stored weight MB (compressed form)", "pareto_size.png"),
        ("latency_ms", "ONNX Runtime latency, ms (1x128, 1 thread)", "pareto_latency.png"))


def refolded(row: dict) -> int:
    """Layers whose model.onnx lowering refolds them to dense (older rows: the sparse-dict pass's count)."""
    return int(row.get("refolded_layers") or (row.get("sparse_dict_lowering") or {}).get("dense", 0))


def quality_value(row: dict, domain: str, kind: str) -> float | None:
    q = row.get("quality", {}).get(domain)
    if not q:
        return None
    return q["cosine_mean"] if kind == "encoder" else q["perplexity"]


def frontier(points: list[tuple[float, float, str]], higher_is_better: bool) -> list[tuple[float, float, str]]:
    """Non-dominated points (smaller x, better y), sorted by x."""
    better = (lambda a, b: a >= b) if higher_is_better else (lambda a, b: a <= b)
    strictly = (lambda a, b: a > b) if higher_is_better else (lambda a, b: a < b)
    keep = []
    for p in points:
        dominated = any(q is not p and q[0] <= p[0] and better(q[1], p[1]) and (q[0] < p[0] or strictly(q[1], p[1]))
                        for q in points)
        if not dominated:
            keep.append(p)
    return sorted(keep)


def write_plots(cfg, kind: str, rows: list[dict], original: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    higher = kind == "encoder"
    ylabel = "mean embedding cosine vs original" if higher else "perplexity"
    methods = list(dict.fromkeys(r["method"] for r in rows if not r.get("anchor")))
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(methods)}
    paths = []
    for key, xlabel, fname in AXES:
        fig, axes = plt.subplots(1, len(cfg.domains), figsize=(5.2 * len(cfg.domains), 4.4), squeeze=False)
        for ax, domain in zip(axes[0], cfg.domains):
            pts = []
            for r in [*rows, original]:
                x, y = r.get(key), quality_value(r, domain, kind)
                if x is None or y is None:
                    continue
                pts.append((x, y, r["cell"]))
                if r is original:
                    ax.scatter([x], [y], marker="*", s=160, color="black", zorder=3, label="original")
                elif r.get("anchor"):
                    ax.scatter([x], [y], marker="s", s=60, color="tab:red", zorder=4,
                               label="ONNX Runtime's w8 / w4 of the original" if r["method"] == "ort-w4" else None)
                    ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8, color="tab:red")
                else:
                    c = colors[r["method"]]
                    ax.scatter([x], [y], s=46, zorder=3, edgecolors=c, linewidths=1.5,
                               facecolors="none" if refolded(r) else c,
                               label=r["method"] if r["ratio"] == min(rr["ratio"] for rr in rows if rr["method"] == r["method"]) else None)
                    ax.annotate(f"{r['ratio']:g}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            f = frontier(pts, higher)
            if len(f) > 1:
                ax.plot([p[0] for p in f], [p[1] for p in f], "--", color="grey", lw=1, zorder=2, label="Pareto frontier")
            where = "in domain" if domain == "wiki" else "out of domain"
            ax.set_title(f"{domain} ({where})")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if not higher:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        fig.suptitle(f"{cfg.model}: quality vs {xlabel.split(',')[0].split(' (')[0]} (labels: --ratio, auto: --budget; quality and "
                     "latency of model.onnx on ONNX Runtime CPU)")
        if any(refolded(r) for r in rows):
            fig.text(0.5, 0.005, "hollow: model.onnx refolds these layers to dense matrices for CPU speed, so that file "
                     "is not smaller; the compressed form is in the TensorRT graph or with --ort-sparse-dict gather",
                     ha="center", fontsize=8, style="italic")
        fig.tight_layout(rect=(0, 0.1, 1, 0.95))
        p = out / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths
