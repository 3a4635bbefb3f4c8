"""The shapes world's training recipe: the `FlowGRPOConfig` settings that the demo (`trl-flow-grpo train` with no
arguments) and `benchmarks/shapes_learning.py` use, as one importable dictionary.

```python
from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.toy import make_prompt_dataset
from trl_flow_grpo.toy.model import load_shapes_pipeline
from trl_flow_grpo.toy.recipe import SHAPES_RECIPE

trainer = FlowGRPOTrainer(
    load_shapes_pipeline(), "shapes_geneval",
    args=FlowGRPOConfig(output_dir="shapes-grpo", **SHAPES_RECIPE),
    train_dataset=make_prompt_dataset(1024, seed=0, split="train"),
)
```

It departs from the library's defaults (which follow the Flow-GRPO paper for SD3.5) where the 2.3M-parameter,
32x32 model wants it; docs/toy_world.md gives the study behind each value.
"""

from __future__ import annotations

import ast
from typing import Any

SHAPES_RECIPE: dict[str, Any] = {
    "height": 32,
    "width": 32,
    "max_sequence_length": 16,  # the T5 stand-in was trained on 16 tokens
    "num_generations": 4,  # G images per prompt: 8 prompts x 4 per step, with CPS the most reliable study row
    "per_device_train_batch_size": 16,
    "gradient_accumulation_steps": 2,  # 32 images = 8 prompts x 4 per optimizer step
    "num_inference_steps": 10,
    "sde_type": "cps",  # coefficients-preserving sampling (+0.154 / +0.170 at 150 steps with G = 4, 2 seeds)
    "noise_level": 0.8,
    "timestep_fraction": 0.5,  # train the first 5 of the 10 steps (they decide the layout)
    "train_cfg": False,  # roll out and train without CFG: half the cost
    "guidance_scale": 4.5,  # held-out evaluation with CFG, as GenEval evaluates SD3.5
    "eval_num_inference_steps": 10,
    "learning_rate": 1e-4,  # full fine-tuning of 2.3M parameters (5e-5 learns slower, 3e-4 collapses)
    "beta": 0.0,
}
"""`FlowGRPOConfig` keyword arguments of the shapes-world recipe (full fine-tuning: pass no `peft_config`)."""


def parse_override(item: str) -> tuple[str, Any]:
    """`"key=value"` -> `(key, value)`, the value read as a Python literal if it is one (`1e-4`, `True`, `[1, 2]`)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value, e.g. learning_rate=1e-4")
    key, raw = item.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key.strip(), value
