"""Time to quality per method: Flow-GRPO, Flow-GRPO-Fast, MixGRPO and MixGRPO-Flash on the shapes world.

    python benchmarks/time_to_quality.py [--minutes 30] [--seeds 0 1] [--thresholds 0.5 0.7] [--eval_every 10]
        [--methods flow_grpo fast mixgrpo flash] [--output_dir benchmarks/results/time_to_quality]

Every method starts from the same shipped base model with the same recipe (`SHAPES_RECIPE`, 10 sampling steps),
the same training-time budget and the same held-out evaluation (every `--eval_every` steps, 2 images per held-out
caption, its time not counted as training). Only the SDE window and the ODE tail differ:

- `flow_grpo`: the first 5 of 10 steps are SDE and trained (the recipe's `timestep_fraction=0.5`);
- `fast` (Flow-GRPO-Fast): a random window of 2 SDE steps within [0, 5), the rest ODE;
- `mixgrpo`: a sliding window of 2 SDE steps over [0, 8), moving every 25 iterations;
- `flash` (MixGRPO-Flash): the same window and a DPM-Solver++(2M) ODE tail compressed to 40% of its steps.

Reports, per method and seed, the training minutes (and optimizer steps) at which the held-out curve first reaches
each threshold, the final accuracy, and the minutes each method needs to reach Flow-GRPO's accuracy at the end of
the budget (MixGRPO's claim: the same quality in about half the time).
Writes `results.json` and `accuracy_vs_minutes.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes_learning import run_seed  # noqa: E402

from trl_flow_grpo.toy.recipe import SHAPES_RECIPE  # noqa: E402
from trl_flow_grpo.toy.shapes import MIXES  # noqa: E402

METHODS: dict[str, dict] = {
    "flow_grpo": {"sde_window": "full"},
    "fast": {"sde_window": "random", "sde_window_size": 2, "sde_window_range": [0, 5]},
    "mixgrpo": {"sde_window": "sliding", "sde_window_size": 2, "sde_window_range": [0, 8]},
    "flash": {
        "sde_window": "sliding",
        "sde_window_size": 2,
        "sde_window_range": [0, 8],
        "ode_solver": "dpm_solver++_2m",
        "ode_compression": 0.4,
    },
}


def first_crossing(curve: list[dict], threshold: float) -> dict | None:
    """The first evaluation point at or above `threshold` (minutes and steps), or None."""
    for point in curve:
        if point["accuracy"] >= threshold:
            return {"train_minutes": point["train_minutes"], "step": point["step"]}
    return None


def accuracy_at(curve: list[dict], minutes: float) -> float:
    """The last evaluated accuracy at or before `minutes` of training."""
    before = [p for p in curve if p["train_minutes"] <= minutes]
    return before[-1]["accuracy"] if before else curve[0]["accuracy"]


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = dict(zip(METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for method, runs in results["runs"].items():
        for i, run in enumerate(runs):
            minutes = [p["train_minutes"] for p in run["curve"]]
            ax.plot(
                minutes,
                [p["accuracy"] for p in run["curve"]],
                color=colours[method],
                linestyle="-" if i == 0 else "--",
                marker="o",
                ms=2,
                label=f"{method} (seed {run['seed']})",
            )
    for threshold in results["thresholds"]:
        ax.axhline(threshold, color="gray", linewidth=0.6, linestyle=":")
    ax.set_xlabel(f"training minutes ({results['threads']} thread(s))")
    ax.set_ylabel("held-out accuracy (2 images per caption)")
    ax.set_title("Time to quality on the shapes world", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def summarize(
    runs: dict[str, list[dict]], minutes: float, thresholds: list[float], threads: int, settings: dict
) -> dict:
    """Crossing times, final accuracies and the minutes each method needs to reach Flow-GRPO's budget-end accuracy."""
    summary: dict[str, dict] = {}
    reference = runs.get("flow_grpo")
    target = None
    if reference:  # Flow-GRPO's accuracy at the end of the budget, mean of its seeds
        target = sum(accuracy_at(r["curve"], minutes) for r in reference) / len(reference)
    for method, method_runs in runs.items():
        summary[method] = {
            "seeds": [r["seed"] for r in method_runs],
            "final_accuracy": [r["after"]["estimates"]["accuracy"] for r in method_runs],
            "optimizer_steps": [r["optimizer_steps"] for r in method_runs],
            "crossings": {str(t): [first_crossing(r["curve"], t) for r in method_runs] for t in thresholds},
        }
        if target is not None:
            summary[method]["to_flow_grpo_final_accuracy"] = [first_crossing(r["curve"], target) for r in method_runs]
    return {
        "settings": settings,
        "minutes": minutes,
        "threads": threads,
        "thresholds": thresholds,
        "flow_grpo_final_accuracy": target,
        "summary": summary,
        "runs": runs,
    }


def print_table(results: dict) -> None:
    thresholds = results["thresholds"]
    print(
        f"\n{'method':<11}{'steps':<12}{'final accuracy, 95% interval (per seed)':<48}"
        + "".join(f"{'min to ' + str(t):>14}" for t in thresholds)
    )
    for method, row in results["summary"].items():
        finals = ", ".join(f"{e['value']:.3f} [{e['low']:.3f}, {e['high']:.3f}]" for e in row["final_accuracy"])
        steps = "/".join(str(n) for n in row["optimizer_steps"])
        cells = ""
        for t in thresholds:
            hits = row["crossings"][str(t)]
            text = "/".join("-" if h is None else f"{h['train_minutes']:.1f}" for h in hits)
            cells += f"{text:>14}"
        print(f"{method:<11}{steps:<12}{finals:<48}{cells}")
    target = results["flow_grpo_final_accuracy"]
    if target is not None:
        print(
            f"\nFlow-GRPO's accuracy after {results['minutes']:g} min (curve, mean of seeds): {target:.3f}; "
            "minutes (steps) to reach it, per seed:"
        )
        for method, row in results["summary"].items():
            hits = row["to_flow_grpo_final_accuracy"]
            print(
                f"  {method:<10}"
                + " / ".join("not reached" if h is None else f"{h['train_minutes']:.1f} ({h['step']})" for h in hits)
            )


def report(paths: list[str], plot_path: str | None, thresholds: list[float]) -> None:
    """Merge the results.json of runs made separately (e.g. one process per seed) into one table and plot."""
    merged: dict[str, list[dict]] = {}
    first = None
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        first = first or results
        for method, method_runs in results["runs"].items():
            merged.setdefault(method, []).extend(method_runs)
    minutes = first.get("minutes", first["settings"]["minutes"])
    combined = summarize(merged, minutes, thresholds, first["threads"], settings={"merged_from": paths})
    print_table(combined)
    if plot_path:
        plot(combined, plot_path)
        with open(os.path.splitext(plot_path)[0] + ".json", "w") as f:
            json.dump(combined, f, indent=1)
        print(f"wrote {plot_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--max_steps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--final_images_per_prompt", type=int, default=8)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    parser.add_argument("--output_dir", default="benchmarks/results/time_to_quality")
    parser.add_argument("--save_model_dir", default=None, help="Save each trained transformer under this folder.")
    parser.add_argument(
        "--mix", default="balanced", choices=MIXES, help="Training prompts (toy.make_prompt_dataset's mix)."
    )
    parser.add_argument("--report", nargs="+", default=None, help="Merge finished runs' results.json; no training.")
    parser.add_argument("--report_plot", default=None, help="With --report: write the merged plot (and its .json).")
    cli = parser.parse_args()
    if cli.report:
        report(cli.report, cli.report_plot, cli.thresholds)
        return
    os.makedirs(cli.output_dir, exist_ok=True)
    torch.set_num_threads(cli.threads)
    runs: dict[str, list[dict]] = {}
    for method in cli.methods:
        recipe = {**SHAPES_RECIPE, **METHODS[method]}
        options = SimpleNamespace(
            output_dir=os.path.join(cli.output_dir, method),
            max_steps=cli.max_steps,
            minutes=cli.minutes,
            eval_every=cli.eval_every,
            curve_images_per_prompt=2,
            final_images_per_prompt=cli.final_images_per_prompt,
            save_model_dir=os.path.join(cli.save_model_dir, method) if cli.save_model_dir else None,
            mix=cli.mix,
            lora_rank=None,
        )
        print(f"=== {method}: {METHODS[method]}", flush=True)
        runs[method] = [run_seed(seed, recipe, options) for seed in cli.seeds]
        # After every method, so that a crash or an interrupt keeps the methods already run.
        results = summarize(runs, cli.minutes, cli.thresholds, cli.threads, settings=vars(cli))
        with open(os.path.join(cli.output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    plot(results, os.path.join(cli.output_dir, "accuracy_vs_minutes.png"))
    print_table(results)
    print(f"wrote {cli.output_dir}/results.json and accuracy_vs_minutes.png")


if __name__ == "__main__":
    main()
