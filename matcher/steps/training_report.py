"""The per-run training report (HTML with inline SVG plots), written next to the model."""
from __future__ import annotations

import html

import numpy as np

from matcher.steps.plots import bar_chart, histogram, training_curves

RECALL_KEYS = [("image_to_text_recall_at_1", "i→t R@1"), ("image_to_text_recall_at_5", "i→t R@5"),
               ("image_to_text_recall_at_10", "i→t R@10"), ("text_to_image_recall_at_1", "t→i R@1"),
               ("text_to_image_recall_at_5", "t→i R@5"), ("text_to_image_recall_at_10", "t→i R@10")]


_COUNTS = {"heldout_products", "best_epoch"}  # shown as whole numbers


def metrics_table(metrics: dict, previous: dict | None) -> str:
    rows = []
    for key in sorted(k for k, v in metrics.items() if isinstance(v, (int, float))):
        prev = previous.get(key) if previous else None
        shown = "{:.0f}" if key in _COUNTS else "{:.4f}"
        prev_cell = shown.format(prev) if isinstance(prev, (int, float)) else ""
        rows.append(f"<tr><td>{html.escape(key)}</td><td>{shown.format(metrics[key])}</td><td>{prev_cell}</td></tr>")
    return ("<table><tr><th>metric (held-out)</th><th>this model</th><th>current model</th></tr>"
            + "".join(rows) + "</table>")


def recall_chart(metrics: dict, previous: dict | None) -> str:
    if not any(k in metrics for k, _ in RECALL_KEYS):  # nothing held out: no chart of empty bars
        return ""
    series = {"this model": [metrics.get(k) for k, _ in RECALL_KEYS]}
    if previous:
        series["current model"] = [previous.get(k) for k, _ in RECALL_KEYS]
    return bar_chart("Held-out recall@K", [label for _, label in RECALL_KEYS], series)


BASELINE_KEYS = [("text_to_image_recall_at_10", "t→i R@10"), ("image_to_text_recall_at_10", "i→t R@10"),
                 ("mean_recall_at_10", "mean R@10"), ("recommendation_precision_at_10", "rec P@10")]


def baselines_table(metrics: dict, baselines: dict[str, dict]) -> str:
    """The learned model beside the closed-form baselines fitted the same night on the same split."""
    if not baselines:
        return ""
    rows = []
    for name, m in [("this model", metrics), *sorted(baselines.items())]:
        cells = "".join(f"<td>{m[k]:.4f}</td>" if isinstance(m.get(k), (int, float)) else "<td></td>"
                        for k, _ in BASELINE_KEYS)
        rows.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    header = "".join(f"<th>{html.escape(label)}</th>" for _, label in BASELINE_KEYS)
    return f"<h2>Closed-form baselines (held-out)</h2><table><tr><th></th>{header}</tr>{''.join(rows)}</table>"


def recipe_table(recipe: dict) -> str:
    """The recipe chosen this night and each candidate's validation score (matcher.steps.train.recipe_summary)."""
    if not recipe:
        return ""
    chosen = f"chosen: {html.escape(str(recipe.get('start')))}"
    rows = "".join(f"<tr><td>start: {html.escape(name)}</td><td>{score:.4f}</td>"
                   f"<td>{chosen if name == recipe.get('start_kind') else ''}</td></tr>"
                   for name, score in sorted(recipe.get("start_candidates", {}).items()))
    if recipe.get("best_epoch") is not None:
        # With fewer than 2 validation products there is no score, and with too few to rank epochs none was tried.
        epoch_0 = recipe.get("epoch_0_validation_mrr")
        rows += (f"<tr><td>heads: the closed form alone (epoch 0)</td>"
                 f"<td>{'' if epoch_0 is None else f'{epoch_0:.4f}'}</td>"
                 f"<td>{'chosen' if recipe['best_epoch'] == 0 else ''}</td></tr>")
        if recipe.get("epochs_tried"):
            rows += (f"<tr><td>heads: trained, best of {recipe['epochs_tried']} epochs</td>"
                     f"<td>{recipe['best_validation_mrr']:.4f}</td>"
                     f"<td>{'chosen: epoch ' + str(recipe['best_epoch']) if recipe['best_epoch'] else ''}</td></tr>")
    power = recipe.get("image_power", 1.0)
    inputs = (f"<p>Photo features raised to the power {power:g} (signed) before the heads and the closed forms "
              f"(train.image_power).</p>" if power != 1.0 else "")
    words = recipe.get("title_words")
    if words is not None:
        inputs += (f"<p>The title's words (extract.title_words): {'read' if words else 'not read'} by the text head "
                   f"(train.title_words).</p>")
    return (f"<h2>Recipe: {html.escape(recipe.get('recipe', ''))}</h2>{inputs}<table><tr><th>candidate</th>"
            f"<th>validation MRR</th><th></th></tr>{rows}</table>")


def render_training_report(version: str, date: str, metrics: dict, previous_metrics: dict | None,
                           history: list[dict], true_scores: np.ndarray, false_scores: np.ndarray,
                           decision: str, baselines: dict[str, dict] | None = None, served_fit: str = "",
                           recipe: dict | None = None) -> str:
    """`served_fit`: what the served model is, when it is not the fit these figures are of; `recipe`: what the
    recipe chose among (recipe_table)."""
    losses = training_curves(history)
    held_out = int(metrics.get("heldout_products") or 0) >= 2
    scores = histogram("Match probability, held-out pairs" if held_out else "Match probability, training pairs",
                       {"true pairs": true_scores, "false pairs": false_scores})
    if not held_out:
        decision += (" (No products held out: the catalog is too small to hold 2 out, so every figure here is "
                     "measured on products the model trained on.)")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>matcher model {html.escape(version)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}td,th{{border:1px solid #ccc;padding:3px 8px}}
table{{border-collapse:collapse}}.charts svg{{margin:6px;border:1px solid #eee}}</style></head><body>
<h1>Model {html.escape(version)}</h1>
<p>Trained for {html.escape(date)}. <b>{html.escape(decision)}</b></p>
{f"<p>{html.escape(served_fit)}</p>" if served_fit else ""}
<div class="charts">{losses}{recall_chart(metrics, previous_metrics)}{scores}</div>
{metrics_table(metrics, previous_metrics)}
{recipe_table(recipe or {})}
{baselines_table(metrics, baselines or {})}
</body></html>"""
