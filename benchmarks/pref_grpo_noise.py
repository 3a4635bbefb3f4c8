"""Pref-GRPO vs GRPO on a reward whose differences inside a group are tiny and partly noise.

    OMP_NUM_THREADS=1 python benchmarks/pref_grpo_noise.py [--part synthetic|training|both] [--steps 100]

(Part 1 takes seconds; part 2 about 19 minutes on one CPU thread with the defaults: two variants x two arms of 100
steps, plus held-out evaluations.)

Part 1 (synthetic, no model, seconds). Groups of G images with scores `s = q + delta * f + eps`: `q` the true quality
(within-group spread `sigma_q`, swept on a log grid), `f ~ U(0, 1)` a hackable feature with a tiny weight `delta`,
`eps ~ N(0, sigma_n)` reward-model noise. GRPO's advantage is the z-score of `s` in its group
(`compute_advantages`, `scale_rewards="group"`); Pref-GRPO's is the standardised win rate of hard verdicts
`sign(s_a - s_b)` with a tie margin `m` (`|s_a - s_b| <= m` is a tie, as `ScalarPreference(tie_margin=m)`), over all
pairs (`win_rates`, `win_rate_advantages`). A third variant, win rates with `m = 0` (pure ranking), separates the two
things win rates change: ranks instead of score gaps, and ties. Also an outlier sweep: one image of a group gets a
large bonus (a reward hack); how much advantage spread is left for the others.

Part 2 (training on the shipped shapes world). Main reward `shapes_geneval` (discrete partial credit: images of a
group often share a score, and a whole group sometimes does); hackable feature: the brightness of the image's border
(`border_brightness`: mean HSV value of the outer 3-pixel frame, in [0, 1]; ~0.02 for the pretrained model, whose
backgrounds are black). The rule-based evaluator ignores it (grey is background to it, and objects rarely touch the
frame), and within a group it is only weakly correlated with geneval (0.01-0.08 on ODE samples of the pretrained
model, ~0.17 on the first training rollouts: it is mostly noise of the near-black background), unlike the image's mean
saturation or brightness (|corr| 0.25-0.7). Both arms see the same total score `geneval + w * border_brightness`:

- GRPO: `reward_funcs=[shapes_geneval, border_brightness]`, `reward_weights=[1, w]` (sum, then group z-score);
- Pref-GRPO: `preference_funcs=[ScalarPreference(geneval + w * border_brightness, tie_margin=m)]` with `m > w`, so
  that geneval ties stay ties (hard verdicts).

Each variant (`--variants WEIGHT:CATEGORIES`) trains both arms from the shipped model with the same seed and the
`trl-flow-grpo train` demo settings (full fine-tuning, lr 5e-5, G = 8, 32 images per step, 10 sampling steps, first
half trained, no CFG), on all prompt categories or on some (single objects: the model is good at them, so whole groups
tie on geneval more often). Logs the geneval and the feature of every training sample per step, and the held-out
geneval accuracy and feature (ODE samples, CFG 4.5, fixed seeds) before and after. Writes `results.json`,
`synthetic.png` and `training.png` to the output folder.
"""

import argparse
import json
import math
import os
import time
from collections import defaultdict

import numpy as np
import torch
from transformers import PrinterCallback, TrainerCallback

from trl_flow_grpo.advantages import compute_advantages, preference_pairs, win_rate_advantages, win_rates

METHODS = ("grpo", "pref", "pref_m0")
LABELS = {
    "grpo": "GRPO (group z-score)",
    "pref": "Pref-GRPO (win rates, tie margin m)",
    "pref_m0": "win rates, m = 0 (pure ranking)",
}
COLORS = {"grpo": "tab:red", "pref": "tab:blue", "pref_m0": "tab:gray"}


# ---------------------------------------------------------------------------------------------------- part 1


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (e.g. all advantages are 0)."""
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denominator) if denominator > 0 else 0.0


def _mean_group_corr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over the rows (groups) of the Pearson correlation between `a` and `b`; a constant row counts as 0."""
    a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    safe = np.where(denominator > 0, denominator, 1.0)
    return float(np.where(denominator > 0, (a * b).sum(axis=1) / safe, 0.0).mean())


def _centred(values: np.ndarray, group_size: int) -> np.ndarray:
    grouped = values.reshape(-1, group_size)
    return (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)


def _advantages(scores: np.ndarray, group_ids: torch.Tensor, pairs: torch.Tensor, margin: float) -> dict:
    """GRPO, Pref-GRPO (tie margin `margin`) and pure-ranking win-rate advantages of `scores` (float64, shape (N,))."""
    s = torch.from_numpy(scores)
    grpo = compute_advantages(s[:, None], group_ids, scale_rewards="group").advantages
    out = {"grpo": grpo.double().numpy()}
    difference = s[pairs[:, 0]] - s[pairs[:, 1]]
    for name, m in (("pref", margin), ("pref_m0", 0.0)):
        probs = torch.where(difference.abs() <= m, torch.full_like(difference, 0.5), (difference > 0).double())
        rates = win_rates(len(s), pairs, probs)
        out[name] = win_rate_advantages(rates, group_ids).double().numpy()
    return out


def run_synthetic(cli) -> dict:
    rng = np.random.default_rng(cli.seed)
    sigmas = np.logspace(-4, 0, cli.num_sigmas)
    results = {
        "settings": {
            "delta": cli.delta,
            "sigma_noise": cli.sigma_noise,
            "tie_margin": cli.tie_margin,
            "groups_per_point": cli.groups,
            "sigma_q": sigmas.tolist(),
        },
        "sweep": {},
        "outlier": {},
    }
    for group_size in cli.group_sizes:
        start = time.perf_counter()
        num = cli.groups * group_size
        group_ids = torch.arange(cli.groups).repeat_interleave(group_size)
        pairs = preference_pairs(group_ids, None, torch.Generator().manual_seed(0))  # depends on the groups only
        rows = defaultdict(list)
        for sigma_q in sigmas:
            q = rng.normal(0.0, sigma_q, num)
            f = rng.uniform(0.0, 1.0, num)
            eps = rng.normal(0.0, cli.sigma_noise, num)
            scores = q + cli.delta * f + eps
            adv = _advantages(scores, group_ids, pairs, cli.tie_margin)
            qc, fc, ec = (_centred(x, group_size) for x in (q, f, eps))
            for name, a in adv.items():
                per_group = np.abs(a).reshape(-1, group_size)
                rows[f"{name}/mean_abs"].append(float(np.abs(a).mean()))
                rows[f"{name}/max_abs"].append(float(per_group.max()))
                rows[f"{name}/mean_group_max_abs"].append(float(per_group.max(axis=1).mean()))
                rows[f"{name}/frac_zero_groups"].append(float((per_group.max(axis=1) == 0).mean()))
                rows[f"{name}/corr_quality"].append(_corr(a, qc))
                rows[f"{name}/corr_feature"].append(_corr(a, fc))
                rows[f"{name}/corr_noise"].append(_corr(a, ec))
        results["sweep"][str(group_size)] = dict(rows)
        print(
            f"[synthetic] G={group_size}: {len(sigmas)} sigma_q values x {cli.groups} groups "
            f"in {time.perf_counter() - start:.1f} s",
            flush=True,
        )

    # Outlier sweep: G = 8, ordinary spread sigma_q = 0.1 (clearly above the margin), one image with a bonus b.
    group_size, sigma_q = cli.group_sizes[0], cli.outlier_sigma_q
    group_ids = torch.arange(cli.groups).repeat_interleave(group_size)
    pairs = preference_pairs(group_ids, None, torch.Generator().manual_seed(0))
    num = cli.groups * group_size
    is_outlier = np.zeros((cli.groups, group_size), dtype=bool)
    is_outlier[:, 0] = True
    is_outlier = is_outlier.reshape(-1)
    rows = defaultdict(list)
    bonuses = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0]
    for bonus in bonuses:
        q = rng.normal(0.0, sigma_q, num)
        scores = q + cli.delta * rng.uniform(0.0, 1.0, num) + rng.normal(0.0, cli.sigma_noise, num)
        scores = scores + bonus * is_outlier
        adv = _advantages(scores, group_ids, pairs, cli.tie_margin)
        q_others = q.reshape(-1, group_size)[:, 1:]
        for name, a in adv.items():
            grouped = a.reshape(-1, group_size)
            others = grouped[:, 1:]
            rows[f"{name}/outlier_adv"].append(float(grouped[:, 0].mean()))
            rows[f"{name}/others_mean_adv"].append(float(others.mean()))
            rows[f"{name}/others_std_adv"].append(float(others.std(axis=1).mean()))
            rows[f"{name}/others_corr_quality"].append(_mean_group_corr(others, q_others))
    results["outlier"] = {"group_size": group_size, "sigma_q": sigma_q, "bonus": bonuses, **rows}
    return results


def print_synthetic(results: dict) -> None:
    settings = results["settings"]
    print(
        f"\nPart 1: s = q + {settings['delta']} * f + N(0, {settings['sigma_noise']}), tie margin "
        f"m = {settings['tie_margin']}, {settings['groups_per_point']} groups per point"
    )
    for group_size, rows in results["sweep"].items():
        size = int(group_size)
        print(
            f"\nG = {size}: largest possible |A| of any group-standardised vector (population std) sqrt(G-1) = "
            f"{math.sqrt(size - 1):.2f}; of a strict ranking's win rates sqrt(3(G-1)/(G+1)) = "
            f"{math.sqrt(3 * (size - 1) / (size + 1)):.2f}"
        )
        keys = ("mean_abs", "max_abs", "frac_zero_groups", "corr_quality", "corr_feature", "corr_noise")
        print(f"{'sigma_q':>8} |" + "|".join(f"{LABELS[m][:36]:^42}" for m in METHODS))
        print(
            f"{'':>8} |"
            + "|".join(f"{'mean|A|':>7}{'max|A|':>7}{'A=0':>7}{'c(q)':>7}{'c(f)':>7}{'c(eps)':>7}" for _ in METHODS)
        )
        for i, sigma_q in enumerate(settings["sigma_q"]):
            cells = ["".join(f"{rows[f'{m}/{key}'][i]:>7.3f}" for key in keys) for m in METHODS]
            print(f"{sigma_q:>8.0e} |" + "|".join(cells))
        print(
            "(A=0: fraction of groups whose advantages are all 0; c(.): correlation of A with the within-group-centred"
            " quality q, feature f, noise eps)"
        )
    out = results["outlier"]
    print(f"\nOutlier: G = {out['group_size']}, others' quality spread {out['sigma_q']}, one image gets a bonus b")
    print(f"{'b':>8} |" + "|".join(f"{LABELS[m][:30]:^32}" for m in METHODS))
    print(f"{'':>8} |" + "|".join(f"{'A_out':>8}{'A_oth':>8}{'sd_oth':>8}{'c(q)':>8}" for _ in METHODS))
    for i, bonus in enumerate(out["bonus"]):
        cells = [
            "".join(
                f"{out[f'{m}/{key}'][i]:>8.3f}"
                for key in ("outlier_adv", "others_mean_adv", "others_std_adv", "others_corr_quality")
            )
            for m in METHODS
        ]
        print(f"{bonus:>8g} |" + "|".join(cells))


def plot_synthetic(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    sigmas = settings["sigma_q"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    styles = {size: style for size, style in zip(results["sweep"], ("-", "--", ":"))}
    panels = [
        (axes[0, 0], "mean_abs", "mean |A|"),
        (axes[0, 1], "mean_group_max_abs", "mean over groups of max |A|"),
        (axes[0, 2], "corr_quality", "corr(A, true quality q)  [signal]"),
        (axes[1, 0], "corr_feature", "corr(A, hackable feature f)"),
        (axes[1, 1], "corr_noise", "corr(A, reward noise eps)"),
    ]
    for ax, key, ylabel in panels:
        for size, rows in results["sweep"].items():
            for m in METHODS:
                ax.plot(
                    sigmas,
                    rows[f"{m}/{key}"],
                    styles[size],
                    color=COLORS[m],
                    lw=1 if m == "pref_m0" else 1.6,
                    label=f"{LABELS[m]}, G={size}",
                )
        ax.set_xscale("log")
        ax.set_xlabel("within-group spread of true quality, sigma_q")
        ax.set_ylabel(ylabel)
        for x, label in ((settings["sigma_noise"], "noise sd"), (settings["tie_margin"], "tie margin m")):
            ax.axvline(x, color="k", lw=0.6, ls=":")
            ax.text(
                x * 1.1,
                0.02,
                label,
                fontsize=7,
                rotation=90,
                va="bottom",
                ha="left",
                transform=ax.get_xaxis_transform(),
            )
    axes[0, 0].legend(fontsize=6)
    out = results["outlier"]
    ax = axes[1, 2]
    bonus = [max(b, 1e-2) for b in out["bonus"]]
    for m in METHODS:
        ax.plot(
            bonus, out[f"{m}/others_std_adv"], "-o", color=COLORS[m], ms=3, label=f"{LABELS[m]}: sd of the others' A"
        )
        ax.plot(bonus, out[f"{m}/outlier_adv"], "--", color=COLORS[m], label=f"{LABELS[m]}: A of the outlier")
    ax.set_xscale("log")
    ax.set_xlabel(f"outlier bonus b (others' quality sd {out['sigma_q']}; b = 0 drawn at 0.01)")
    ax.set_ylabel("advantage")
    ax.set_title(f"one outlier in a group of {out['group_size']}", fontsize=9)
    ax.legend(fontsize=6)
    fig.suptitle(
        f"s = q + {settings['delta']} f + N(0, {settings['sigma_noise']}^2); Pref-GRPO: hard verdicts, tie margin "
        f"{settings['tie_margin']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- part 2


BORDER = 3
"""Width in pixels of the frame whose brightness is the hackable feature."""


def border_brightness(prompts, images, **kwargs) -> list[float]:
    """Hackable feature: the mean HSV value (max of R, G, B) of the outer `BORDER`-pixel frame of each image, in
    [0, 1] (the geneval rules ignore it)."""
    values = []
    for image in images:
        value = np.asarray(image.convert("RGB"), dtype=np.float64).max(axis=-1) / 255
        inner = value[BORDER:-BORDER, BORDER:-BORDER]
        values.append(float((value.sum() - inner.sum()) / (value.size - inner.size)))
    return values


class Recorder:
    """Keeps the geneval score and the feature of every training sample, keyed by the optimizer step."""

    def __init__(self):
        self.geneval: dict[int, list[float]] = defaultdict(list)
        self.feature: dict[int, list[float]] = defaultdict(list)
        self.prompts: dict[int, list[str]] = defaultdict(list)

    @staticmethod
    def _step(trainer_state) -> int:
        return int(trainer_state.global_step) if trainer_state is not None else -1

    def record_geneval(self, prompts, images, trainer_state=None) -> list[float]:
        from trl_flow_grpo.toy import shapes_geneval

        scores = shapes_geneval(prompts, images)
        self.geneval[self._step(trainer_state)] += scores
        self.prompts[self._step(trainer_state)] += list(prompts)
        return scores

    def record_feature(self, prompts, images, trainer_state=None) -> list[float]:
        values = border_brightness(prompts, images)
        self.feature[self._step(trainer_state)] += values
        return values

    def per_step(self, arm: str, weight: float, margin: float) -> list[dict]:
        """Per-step means, the fraction of groups tied on geneval, and the within-group correlation between the
        feature and the advantage the arm computed (recomputed here from the recorded scores, groups by prompt)."""
        rows = []
        for step in sorted(self.geneval):
            geneval, feature = np.array(self.geneval[step]), np.array(self.feature[step])
            prompts = self.prompts[step]
            _, group_ids = np.unique(prompts, return_inverse=True)
            group_ids = torch.from_numpy(group_ids.reshape(-1))
            scores = geneval + weight * feature
            if arm == "grpo":
                advantages = compute_advantages(torch.from_numpy(scores)[:, None], group_ids).advantages
            else:
                pairs = preference_pairs(group_ids)
                difference = torch.from_numpy(scores)[pairs[:, 0]] - torch.from_numpy(scores)[pairs[:, 1]]
                probs = torch.where(difference.abs() <= margin, 0.5, (difference > 0).double())
                advantages = win_rate_advantages(win_rates(len(scores), pairs, probs), group_ids)
            advantages = advantages.double().numpy()
            tied = [len(set(geneval[group_ids.numpy() == g].tolist())) == 1 for g in range(int(group_ids.max()) + 1)]
            f_centred = feature - np.array([feature[group_ids.numpy() == g].mean() for g in group_ids.tolist()])
            rows.append(
                {
                    "step": step,
                    "geneval": float(geneval.mean()),
                    "feature": float(feature.mean()),
                    "frac_geneval_tied_groups": float(np.mean(tied)),
                    "corr_adv_feature": _corr(advantages, f_centred),
                    "num_samples": len(geneval),
                }
            )
        return rows


class Progress(TrainerCallback):
    """Prints a progress line every `every` optimizer steps."""

    def __init__(self, arm: str, recorder: Recorder, every: int = 10):
        self.arm, self.recorder, self.every, self.start = arm, recorder, every, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0:
            last = [s for s in sorted(self.recorder.geneval) if s >= state.global_step - self.every]
            geneval = np.mean([np.mean(self.recorder.geneval[s]) for s in last])
            feature = np.mean([np.mean(self.recorder.feature[s]) for s in last])
            print(
                f"[training] {self.arm} step {state.global_step}/{state.max_steps}: geneval {geneval:.3f}, "
                f"border brightness {feature:.3f} (last {len(last)} steps), {time.perf_counter() - self.start:.0f} s",
                flush=True,
            )


def make_reward_funcs(recorder: Recorder, weight: float):
    def shapes_geneval(prompts, images, trainer_state=None, **kwargs):
        return recorder.record_geneval(prompts, images, trainer_state)

    def border(prompts, images, trainer_state=None, **kwargs):
        return recorder.record_feature(prompts, images, trainer_state)

    def geneval_plus_border(prompts, images, trainer_state=None, **kwargs):
        geneval = recorder.record_geneval(prompts, images, trainer_state)
        feature = recorder.record_feature(prompts, images, trainer_state)
        return [g + weight * f for g, f in zip(geneval, feature)]

    return shapes_geneval, border, geneval_plus_border


def held_out(pipe, prompts: list[str], cli) -> dict:
    from trl_flow_grpo.toy import evaluate
    from trl_flow_grpo.toy.model import generate

    images = generate(pipe, prompts, num_inference_steps=cli.eval_steps, guidance_scale=cli.guidance_scale, seed=12345)
    result = evaluate(prompts, images)
    result["feature"] = float(np.mean(border_brightness(prompts, images)))
    return {k: result[k] for k in ("accuracy", "score", "feature")}


def train_arm(
    arm: str, cli, weight: float, margin: float, categories: list[str] | None, eval_prompts: list[str]
) -> dict:
    from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
    from trl_flow_grpo.rewards.preferences import ScalarPreference
    from trl_flow_grpo.toy import make_prompt_dataset
    from trl_flow_grpo.toy.model import SHAPES_SAMPLING, load_shapes_pipeline

    pipe = load_shapes_pipeline()
    recorder = Recorder()
    geneval, feature, combined = make_reward_funcs(recorder, weight)
    config = {
        "output_dir": os.path.join(cli.output_dir, "run"),
        "report_to": "none",
        "num_generations": 8,
        "per_device_train_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "num_inference_steps": 10,
        "guidance_scale": cli.guidance_scale,
        "train_cfg": False,
        "timestep_fraction": 0.5,
        "learning_rate": cli.learning_rate,
        "beta": 0.0,
        "max_steps": cli.steps,
        "logging_steps": 1,
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": cli.seed,
        **SHAPES_SAMPLING,
    }
    if arm == "grpo":
        args = FlowGRPOConfig(**config, reward_weights=[1.0, weight])
        kwargs = {"reward_funcs": [geneval, feature]}
    else:
        args = FlowGRPOConfig(**config)
        kwargs = {"reward_funcs": [], "preference_funcs": [ScalarPreference(combined, tie_margin=margin)]}
    trainer = FlowGRPOTrainer(
        pipe,
        args=args,
        train_dataset=make_prompt_dataset(4096, seed=cli.seed, split="train", categories=categories),
        callbacks=[Progress(arm, recorder)],
        **kwargs,
    )
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; Progress prints a line every 10 steps
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    steps = recorder.per_step(arm, weight, margin)
    abs_adv = {h["step"]: h["advantages/abs_mean"] for h in trainer.state.log_history if "advantages/abs_mean" in h}
    for row in steps:  # log_history's step is the step after the update, the recorder's the step before it
        row["advantages_abs_mean"] = abs_adv.get(row["step"] + 1)
    after = held_out(pipe, eval_prompts, cli) if eval_prompts else None
    print(f"[training] {arm}: weight {weight}, {trainer.state.global_step} steps in {seconds:.0f} s", flush=True)
    return {"train_seconds": seconds, "steps": steps, "held_out_after": after}


def _window_means(steps: list[dict], key: str, window: int) -> tuple[float, float]:
    values = [row[key] for row in steps]
    return float(np.mean(values[:window])), float(np.mean(values[-window:]))


def summarise(run: dict, window: int) -> dict:
    summary = {}
    for key in ("geneval", "feature", "frac_geneval_tied_groups", "corr_adv_feature"):
        first, last = _window_means(run["steps"], key, window)
        mean = float(np.mean([row[key] for row in run["steps"]]))
        summary[key] = {"first": first, "last": last, "change": last - first, "mean": mean}
    values = [row["advantages_abs_mean"] for row in run["steps"] if row["advantages_abs_mean"] is not None]
    summary["advantages_abs_mean"] = float(np.mean(values)) if values else None
    return summary


def parse_variant(text: str) -> tuple[float, list[str] | None]:
    """`"0.02:all"` -> `(0.02, None)`; `"0.05:single_object,counting"` -> `(0.05, ["single_object", "counting"])`."""
    weight, _, categories = text.partition(":")
    if categories in ("", "all"):
        return float(weight), None
    return float(weight), categories.split(",")


def run_training(cli) -> dict:
    from trl_flow_grpo.toy import caption_category
    from trl_flow_grpo.toy.model import heldout_prompts, load_shapes_pipeline

    torch.set_num_threads(cli.threads)
    results = {"window": cli.window, "variants": []}
    for text in cli.variants:
        weight, categories = parse_variant(text)
        margin = cli.tie_margin_factor * weight
        eval_prompts = []
        if cli.eval_images_per_prompt > 0:
            captions = sorted(set(heldout_prompts(1)))
            captions = [c for c in captions if categories is None or caption_category(c) in categories]
            per_caption = max(cli.eval_images_per_prompt, math.ceil(cli.min_eval_images / len(captions)))
            eval_prompts = [c for c in captions for _ in range(per_caption)]
        before = None
        if eval_prompts:
            start = time.perf_counter()
            before = held_out(load_shapes_pipeline(), eval_prompts, cli)
            print(
                f"[training] held-out evaluation ({len(eval_prompts)} images) took {time.perf_counter() - start:.0f} s"
            )
        variant = {
            "feature_weight": weight,
            "tie_margin": margin,
            "categories": categories or "all",
            "held_out_images": len(eval_prompts),
            "held_out_before": before,
            "arms": {},
        }
        for arm in ("grpo", "pref"):
            run = train_arm(arm, cli, weight, margin, categories, eval_prompts)
            run["summary"] = summarise(run, cli.window)
            variant["arms"][arm] = run
        results["variants"].append(variant)
    return results


def print_training(results: dict, window: int) -> None:
    print(
        f"\nPart 2: shapes world, main reward shapes_geneval, hackable feature border brightness. Training samples: "
        f"mean of the first vs the last {window} steps; held-out: ODE samples with fixed seeds, before -> after"
    )
    nan = float("nan")
    for variant in results["variants"]:
        before = variant["held_out_before"] or {}
        print(
            f"\nprompts: {variant['categories']}; feature weight w = {variant['feature_weight']:g}, Pref-GRPO tie "
            f"margin m = {variant['tie_margin']:g}; held-out before ({variant['held_out_images']} images): accuracy "
            f"{before.get('accuracy', nan):.3f}, border brightness {before.get('feature', nan):.3f}"
        )
        print(
            f"{'arm':<6}{'geneval first':>14}{'last':>7}{'delta':>8}{'f first':>10}{'last':>7}{'delta':>8}"
            f"{'tied grp':>9}{'c(A,f)':>8}{'mean|A|':>8}{'ho acc':>8}{'ho f':>8}{'sec':>6}"
        )
        for arm, run in variant["arms"].items():
            s, after = run["summary"], run["held_out_after"] or {}
            print(
                f"{arm:<6}{s['geneval']['first']:>14.3f}{s['geneval']['last']:>7.3f}{s['geneval']['change']:>+8.3f}"
                f"{s['feature']['first']:>10.3f}{s['feature']['last']:>7.3f}{s['feature']['change']:>+8.3f}"
                f"{s['frac_geneval_tied_groups']['mean']:>9.2f}{s['corr_adv_feature']['mean']:>8.3f}"
                f"{s['advantages_abs_mean'] if s['advantages_abs_mean'] is not None else nan:>8.3f}"
                f"{after.get('accuracy', nan):>8.3f}{after.get('feature', nan):>8.3f}{run['train_seconds']:>6.0f}"
            )
    print(
        "(f: border brightness; tied grp: fraction of prompt groups whose G images all got the same geneval score, "
        "mean over steps; c(A,f): within-group correlation of the arm's advantages with the feature, mean over steps; "
        "mean|A|: from the trainer's log; ho: held-out after training)"
    )


def plot_training(results: dict, path: str, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = results["variants"]
    fig, axes = plt.subplots(len(variants), 3, figsize=(15, 3.6 * len(variants)), squeeze=False)
    arm_labels = {"grpo": "GRPO, reward_weights [1, w]", "pref": "Pref-GRPO, tie margin m"}
    arm_colors = {"grpo": "tab:red", "pref": "tab:blue"}

    def smooth(values):
        return [float(np.mean(values[max(0, i - window + 1) : i + 1])) for i in range(len(values))]

    panels = (
        ("geneval", "shapes_geneval (training samples)"),
        ("feature", "border brightness (training samples)"),
        ("frac_geneval_tied_groups", "fraction of groups tied on geneval"),
    )
    for row, variant in enumerate(variants):
        for col, (key, ylabel) in enumerate(panels):
            ax = axes[row, col]
            for arm, run in variant["arms"].items():
                steps = [r["step"] for r in run["steps"]]
                values = [r[key] for r in run["steps"]]
                ax.plot(steps, values, color=arm_colors[arm], alpha=0.25)
                ax.plot(steps, smooth(values), color=arm_colors[arm], label=f"{arm_labels[arm]} ({window}-step mean)")
                after = run["held_out_after"]
                if after and key == "feature":
                    ax.axhline(after["feature"], color=arm_colors[arm], ls="--", lw=0.8)
            before = variant["held_out_before"]
            if before and key == "feature":
                ax.axhline(before["feature"], color="gray", ls="--", lw=0.8, label="held-out before / after (dashed)")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ax.set_title(
                f"prompts: {variant['categories']}, w = {variant['feature_weight']}, m = {variant['tie_margin']:g}",
                fontsize=9,
            )
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("synthetic", "training", "both"), default="both")
    parser.add_argument("--output_dir", default="benchmarks/results/pref_grpo")
    parser.add_argument("--seed", type=int, default=0)
    # part 1
    parser.add_argument("--group_sizes", type=int, nargs="+", default=[8, 24])
    parser.add_argument("--groups", type=int, default=2000, help="Groups per point of the synthetic sweep.")
    parser.add_argument("--num_sigmas", type=int, default=17, help="sigma_q grid points in [1e-4, 1].")
    parser.add_argument("--delta", type=float, default=0.002, help="Weight of the hackable feature f ~ U(0, 1).")
    parser.add_argument("--sigma_noise", type=float, default=1e-3, help="Reward-model noise sd.")
    parser.add_argument("--tie_margin", type=float, default=0.01, help="Synthetic part: Pref-GRPO's tie margin.")
    parser.add_argument("--outlier_sigma_q", type=float, default=0.1)
    # part 2
    parser.add_argument("--steps", type=int, default=100, help="Optimizer steps per training arm.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["0.02:all", "0.02:single_object"],
        help="Training variants WEIGHT:CATEGORIES (feature weight; 'all' or comma-separated prompt categories); "
        "each gets a GRPO and a Pref-GRPO arm.",
    )
    parser.add_argument(
        "--tie_margin_factor",
        type=float,
        default=1.5,
        help="Pref-GRPO's tie margin as a multiple of the feature weight (> 1: geneval ties stay ties).",
    )
    parser.add_argument("--learning_rate", type=float, default=5e-5)
    parser.add_argument("--guidance_scale", type=float, default=4.5, help="CFG scale of the held-out evaluation.")
    parser.add_argument("--window", type=int, default=10, help="Steps averaged for the start / end figures.")
    parser.add_argument("--eval_images_per_prompt", type=int, default=2, help="0: no held-out evaluation.")
    parser.add_argument("--min_eval_images", type=int, default=64, help="More images per caption for few captions.")
    parser.add_argument("--eval_steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    cli = parser.parse_args()
    os.makedirs(cli.output_dir, exist_ok=True)
    torch.set_num_threads(cli.threads)
    path = os.path.join(cli.output_dir, "results.json")
    results = {}
    if os.path.exists(path):  # keep the other part's results when only one part is rerun
        with open(path) as f:
            results = json.load(f)
    results["settings"] = vars(cli)
    start = time.perf_counter()
    if cli.part in ("synthetic", "both"):
        results["synthetic"] = run_synthetic(cli)
        plot_synthetic(results["synthetic"], os.path.join(cli.output_dir, "synthetic.png"))
    if cli.part in ("training", "both"):
        results["training"] = run_training(cli)
        plot_training(results["training"], os.path.join(cli.output_dir, "training.png"), cli.window)
    results["wall_seconds"] = time.perf_counter() - start
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    if "synthetic" in results:
        print_synthetic(results["synthetic"])
    if "training" in results:
        print_training(results["training"], results["training"]["window"])
    print(f"\nwrote {cli.output_dir}/results.json and plots in {results['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
