"""Held-out evaluation of the shapes world with its noise: accuracy per category with bootstrap intervals.

`evaluate_heldout(pipe)` renders every held-out caption (compositions never seen in pretraining or RL) `K` times
with fixed seeds, scores each image with the GenEval-like rules and returns a `HeldoutResult`: per-image scores,
intervals for the overall and per-category accuracy, strict accuracy (correct with no object beyond those asked for:
the GenEval-like rules, like GenEval's, let extra objects pass outside counting, and a policy can learn to spray
them), share of images with extra objects and score (a bootstrap over captions within categories, see
`trl_flow_grpo.eval_stats`), and a before/after table whose change column has a paired interval.

With the shipped base model, 141 captions and 10 ODE steps: `K = 2` gives an interval of about +-0.05 on overall
accuracy, `K = 4` +-0.042 and `K = 8` +-0.034 (the captions differ in difficulty, so each doubling helps less).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..eval_stats import Estimate, cluster_bootstrap, paired_cluster_bootstrap
from .geneval import requested_objects, score_image
from .shapes import CATEGORIES, all_captions, caption_category

EVAL_SEED = 1000
"""First initial-noise seed of the held-out evaluation: image `k` of caption `i` starts at `EVAL_SEED + i * K + k`."""

__all__ = ["EVAL_SEED", "HeldoutResult", "evaluate_heldout", "format_comparison", "format_result", "score_heldout"]


@dataclass
class HeldoutResult:
    """Scores of `images_per_prompt` images for each of `prompts`.

    Attributes:
        prompts: The distinct captions, in evaluation order.
        categories: The category of each caption.
        scores: `(len(prompts), images_per_prompt)` partial credit of each image (1.0 = correct).
        images: The images, caption-major (`images[i * K + k]` is seed `k` of caption `i`); empty if not kept.
        settings: How the images were made (steps, guidance, seed, images per prompt).
        extras: `scores`-shaped, 1.0 where an image shows more objects than its caption asks for (`None`: not
            known, and the `strict_accuracy` and `extra_objects` keys are absent).
    """

    prompts: list[str]
    categories: list[str]
    scores: np.ndarray
    images: list = field(default_factory=list, repr=False)
    settings: dict = field(default_factory=dict)
    extras: np.ndarray | None = None

    def __post_init__(self):
        self.scores = np.asarray(self.scores, dtype=np.float64)
        if self.scores.shape[0] != len(self.prompts) or len(self.categories) != len(self.prompts):
            raise ValueError(
                f"{len(self.prompts)} prompts, {len(self.categories)} categories and scores of shape "
                f"{self.scores.shape}: give one row of scores and one category per prompt."
            )
        if self.extras is not None:
            self.extras = np.asarray(self.extras, dtype=np.float64)
            if self.extras.shape != self.scores.shape:
                raise ValueError(f"extras has shape {self.extras.shape}; give one per image: {self.scores.shape}.")

    @property
    def correct(self) -> np.ndarray:
        """1.0 where an image is correct (score 1), else 0.0."""
        return (self.scores == 1.0).astype(np.float64)

    @property
    def strict_correct(self) -> np.ndarray:
        """1.0 where an image is correct and shows no object beyond those its caption asks for."""
        if self.extras is None:
            raise KeyError("this evaluation did not record extra objects (extras=None): no strict accuracy.")
        return self.correct * (1.0 - self.extras)

    def _metrics(self) -> tuple[str, ...]:
        extra = ("strict_accuracy", "extra_objects") if self.extras is not None else ()
        return ("accuracy", *extra, "score")

    def _rows(self, metric: str, category: str | None) -> tuple[np.ndarray, list[str]]:
        if metric not in self._metrics():
            raise KeyError(f"no metric {metric!r} in this evaluation; metrics: {list(self._metrics())}")
        values = {
            "accuracy": lambda: self.correct,
            "strict_accuracy": lambda: self.strict_correct,
            "extra_objects": lambda: self.extras,
            "score": lambda: self.scores,
        }[metric]()
        keep = [i for i, c in enumerate(self.categories) if category is None or c == category]
        return values[keep], [self.categories[i] for i in keep]

    def keys(self) -> list[str]:
        """`accuracy` and `accuracy/<category>` for each category present, then the same for `strict_accuracy` and
        `extra_objects` (when `extras` is known) and `score`."""
        present = [c for c in CATEGORIES if c in self.categories]
        return [f"{m}{suffix}" for m in self._metrics() for suffix in ["", *[f"/{c}" for c in present]]]

    def estimate(self, key: str, **bootstrap_kwargs) -> Estimate:
        """The estimate of `key` (see `keys`) with its interval."""
        metric, _, category = key.partition("/")
        rows, strata = self._rows(metric, category or None)
        if len(rows) == 0:
            raise KeyError(f"no prompts of category {category!r} in this evaluation; keys: {self.keys()}")
        return cluster_bootstrap(list(rows), strata, **bootstrap_kwargs)

    def estimates(self, **bootstrap_kwargs) -> dict[str, Estimate]:
        """Every key's estimate."""
        return {key: self.estimate(key, **bootstrap_kwargs) for key in self.keys()}

    def change(self, before: HeldoutResult, key: str, **bootstrap_kwargs) -> Estimate:
        """`self[key] - before[key]` with a paired interval (same captions and seeds in both)."""
        if before.prompts != self.prompts or before.scores.shape != self.scores.shape:
            raise ValueError("the two evaluations must use the same prompts and images per prompt to be paired.")
        metric, _, category = key.partition("/")
        rows_after, strata = self._rows(metric, category or None)
        rows_before, _ = before._rows(metric, category or None)
        return paired_cluster_bootstrap(list(rows_before), list(rows_after), strata, **bootstrap_kwargs)

    def summary(self) -> dict[str, float]:
        """`{key: value}` for logging (no intervals)."""
        summary = {}
        for key in self.keys():
            metric, _, category = key.partition("/")
            summary[key] = float(self._rows(metric, category or None)[0].mean())
        return summary

    def to_dict(self) -> dict:
        """JSON-ready: settings, per-key value / interval / n, and the per-image scores."""
        return {
            "settings": self.settings,
            "estimates": {key: e.to_dict() for key, e in self.estimates().items()},
            "prompts": self.prompts,
            "categories": self.categories,
            "scores": self.scores.tolist(),
            "extras": None if self.extras is None else self.extras.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> HeldoutResult:
        """The result `to_dict` saved (its estimates are recomputed from the scores; the images are not kept)."""
        return cls(
            data["prompts"], data["categories"], data["scores"], settings=data["settings"], extras=data.get("extras")
        )


def evaluate_heldout(
    pipe,
    *,
    images_per_prompt: int = 8,
    num_inference_steps: int = 10,
    guidance_scale: float = 4.5,
    seed: int = EVAL_SEED,
    batch_size: int = 128,
    prompts: list[str] | None = None,
    keep_images: bool = True,
    progress: bool = False,
) -> HeldoutResult:
    """Render each held-out caption `images_per_prompt` times (ODE sampling, fixed seeds) and score the images.

    Image `k` of caption `i` is seeded by `seed + i * images_per_prompt + k`, whatever the batch size, so two
    evaluations with the same arguments see the same noise and can be compared pair by pair.

    Args:
        pipe: A shapes-world pipeline (e.g. `load_shapes_pipeline()` or a trainer's `trainer.pipeline`).
        images_per_prompt: Seeds per caption.
        num_inference_steps: ODE steps (10 and 20 give the same base accuracy to within the noise).
        guidance_scale: Classifier-free guidance scale.
        seed: First seed.
        batch_size: Images per pipeline call.
        prompts: Captions to evaluate (default: every held-out caption, `all_captions("test")`).
        keep_images: Keep the images in the result (for sample grids of failures).
        progress: Show a progress bar.
    """
    from .model import generate

    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {images_per_prompt}.")
    captions = list(all_captions("test") if prompts is None else prompts)
    if not captions:
        raise ValueError("prompts is empty: give at least one caption of the shapes grammar.")
    repeated = [caption for caption in captions for _ in range(images_per_prompt)]
    images = generate(
        pipe,
        repeated,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    settings = {
        "images_per_prompt": images_per_prompt,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
    }
    return score_heldout(captions, images, settings, keep_images=keep_images)


def score_heldout(captions: list[str], images: list, settings: dict, keep_images: bool = True) -> HeldoutResult:
    """Score `images` (caption-major: the same number per caption, `images[i * K + k]` of `captions[i]`) with the
    GenEval-like rules into a `HeldoutResult`, recording which show more objects than their caption asks for.

    `evaluate_heldout` renders its images with the evaluation's ODE sampler; another sampler's images of the same
    captions (e.g. `benchmarks/shapes_sampler_gap.py`'s rollouts) are scored the same way.
    """
    if not captions or len(images) % len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions: give the same number for each caption.")
    k = len(images) // len(captions)
    scores, extras = [], []
    for index, image in enumerate(images):
        prompt = captions[index // k]
        score, details = score_image(prompt, image)
        scores.append(score)
        extras.append(len(details["detections"]) > requested_objects(prompt))
    return HeldoutResult(
        list(captions),
        [caption_category(c) for c in captions],
        np.array(scores).reshape(len(captions), -1),
        list(images) if keep_images else [],
        settings,
        np.array(extras, dtype=np.float64).reshape(len(captions), -1),
    )


def format_result(result: HeldoutResult, title: str = "held-out") -> str:
    """One evaluation as a table: value, 95% interval and n (captions x images) per key."""
    width = max(28, *(len(key) + 2 for key in result.keys()))
    lines = [f"{title:<{width}}{'value':>8}  {'95% interval':<16}{'captions':>9}{'images':>8}"]
    for key, e in result.estimates().items():
        lines.append(f"{key:<{width}}{e.value:>8.3f}  [{e.low:.3f}, {e.high:.3f}] {e.num_prompts:>8}{e.num_images:>8}")
    return "\n".join(lines)


def format_comparison(before: HeldoutResult, after: HeldoutResult, title: str = "held-out") -> str:
    """Before / after / change, each with its 95% interval (the change's is paired), and n per key."""
    width = max(26, *(len(key) + 1 for key in after.keys()))
    header = f"{title:<{width}}{'before':>22}{'after':>22}{'change':>24}{'captions':>9}"
    lines = [header]
    for key in after.keys():
        b, a, d = before.estimate(key), after.estimate(key), after.change(before, key)
        lines.append(
            f"{key:<{width}}{b.value:>7.3f} [{b.low:.3f},{b.high:.3f}]{a.value:>7.3f} [{a.low:.3f},{a.high:.3f}]"
            f"{d.value:>+8.3f} [{d.low:+.3f},{d.high:+.3f}]{d.num_prompts:>9}"
        )
    k = after.scores.shape[1]
    images = f"{k} image{'s' if k != 1 else ''} per caption"
    lines.append(f"(95% intervals: bootstrap over captions within categories; {images}, fixed seeds)")
    return "\n".join(lines)
