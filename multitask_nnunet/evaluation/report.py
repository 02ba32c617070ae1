"""The results as a readable table for the terminal (plain text only, so importing it is cheap)."""


def format_number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _interval(ci) -> str:
    return "" if ci is None or None in ci else f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def format_table(results: dict) -> str:
    """The results as fixed-width text, for the terminal."""
    ci = results["ci95"]
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
        lines.append(f"  {name:<20} {format_number(row['mean_dice']):>9}  {_interval(ci.get(name)):<18} "
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
                  ", ".join(f"{n} {format_number(auc[n])}" for n in results["class_names"]) + ")",
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
