"""The results' four forms: a table for the terminal, the JSON, the confusion-matrix PNG and the reliability
diagram PNG (the files written atomically). Importing it is cheap: matplotlib and scikit-learn are imported only
to draw the PNGs."""
import json
import math

import numpy as np

from multitask_nnunet.io.atomic import atomic_path, atomic_write_text


def format_number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _interval(ci) -> str:
    return "" if ci is None or None in ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def format_table(results: dict) -> str:
    """The results as fixed-width text, for the terminal."""
    ci = results["ci95"]
    region_ci = ci.get("dice", {})
    n_boot = results["bootstrap"]["n_resamples"]
    ci_note = f"95% CI: case bootstrap, {n_boot} resamples" if n_boot else "no bootstrap"
    lines = [f"{results['n_cases']} cases; predictions {results['predictions']}; "
             f"ground truth {results['ground_truth']['path']} ({results['ground_truth']['layout']} layout)"]
    if results["cases_without_prediction"]:
        lines.append(f"skipped {len(results['cases_without_prediction'])} ground-truth cases without a prediction")

    seg = results["segmentation"]
    lines += ["", f"Segmentation: Dice per region ({results['n_cases_with_segmentation_gt']} cases with "
                  f"segmentation ground truth; {ci_note})",
              f"  {'region':<20} {'mean Dice':>9}  {'95% CI':<18} {'cases':>5}  {'empty in both':>13}"]
    for name, row in seg.items():
        lines.append(f"  {name:<20} {format_number(row['mean_dice']):>9}  {_interval(region_ci.get(name)):<18} "
                     f"{row['n_evaluated']:>5}  {row['n_empty_both']:>13}")

    lines += ["", f"Classification ({results['n_cases']} cases, {len(results['class_names'])} classes)"]
    for key, label in (("macro_f1", "macro-F1"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc.")):
        lines.append(f"  {label:<20} {format_number(results[key]):>9}  {_interval(ci.get(key))}")
    width = max(len(n) for n in results["class_names"] + ["class"])
    lines += ["", f"  {'class':<{width}} {'precision':>9} {'recall':>9} {'F1':>9} {'support':>8}"]
    for row in results["per_class"]:
        lines.append(f"  {row['name']:<{width}} {format_number(row['precision']):>9} {format_number(row['recall']):>9} "
                     f"{format_number(row['f1']):>9} {row['support']:>8}")

    if results.get("roc_auc"):
        auc = results["roc_auc"]
        lines += ["", "Class probabilities (class_probabilities.csv)",
                  f"  {'ROC-AUC macro':<20} {format_number(auc['macro']):>9}  (one-vs-rest: " +
                  ", ".join(f"{n} {format_number(auc['per_class'][n])}" for n in results["class_names"]) + ")",
                  f"  {'Brier score':<20} {format_number(results['brier']):>9}  "
                  f"(mean over cases of sum_k (p_k - y_k)^2)",
                  f"  {'ECE':<20} {format_number(results['ece']):>9}  ({results['reliability']['n_bins']} equal-width "
                  f"bins on the max probability)"]
    elif results.get("probability_metrics_note"):
        lines += ["", results["probability_metrics_note"]]
    lines += ["", "Confusion matrix (rows: true class, columns: predicted class)",
              "  " + " " * width + "".join(f" {n:>{width}}" for n in results["class_names"])]
    for name, counts in zip(results["class_names"], results["confusion_matrix"]):
        lines.append(f"  {name:<{width}}" + "".join(f" {c:>{width}}" for c in counts))
    return "\n".join(lines)


def json_ready(value):
    """NaN becomes None (JSON has no NaN) and numpy values plain Python ones."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_json(results: dict, path: str) -> None:
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")


def save_confusion_matrix_png(results: dict, path: str) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(1.2 * len(results["class_names"]) + 2.5, 1.2 * len(results["class_names"]) + 2))
    ax = fig.subplots()
    ConfusionMatrixDisplay(confusion_matrix=np.array(results["confusion_matrix"]),
                           display_labels=results["class_names"]).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"macro-F1 {format_number(results['macro_f1'])}, accuracy {format_number(results['accuracy'])}")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def save_reliability_png(results: dict, path: str) -> None:
    """Reliability diagram: accuracy per confidence bin (bars) against the diagonal of perfect calibration."""
    from matplotlib.figure import Figure

    reliability = results["reliability"]
    n = reliability["n_bins"]
    edges = np.linspace(0, 1, n + 1)
    accuracy = np.array([np.nan if a is None else a for a in reliability["accuracy"]], dtype=float)
    confidence = np.array([np.nan if c is None else c for c in reliability["confidence"]], dtype=float)
    fig = Figure(figsize=(4.8, 4.8))
    ax = fig.subplots()
    filled = ~np.isnan(accuracy)
    ax.bar(edges[:-1][filled], accuracy[filled], width=1 / n, align="edge", edgecolor="black", alpha=0.7,
           label="accuracy")
    ax.plot(confidence[filled], accuracy[filled], "o", color="C3", markersize=4,
            label="bin (mean confidence, accuracy)")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {format_number(results['ece'])} ({n} bins), Brier {format_number(results['brier'])}")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
