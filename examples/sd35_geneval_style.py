"""Flow-GRPO on Stable Diffusion 3.5 Medium with a LoRA, with the Flow-GRPO paper's GenEval settings.

    python examples/sd35_geneval_style.py --output_dir sd35-geneval-style

What to replace: `geneval_style_reward` below is a PLACEHOLDER. It returns the built-in JPEG-compressibility reward so
that the script runs as-is; for a GenEval-style run, replace its body with your own scorer (e.g. an object detector
that checks the counts, colours and positions asked for by the prompt) and keep its signature.

GPU assumptions (not measured in this repository): one CUDA GPU with about 80 GB of memory, bf16. The whole pipeline,
T5-XXL included, stays on the GPU; a micro-batch is 8 images at 512 px, doubled to 16 by classifier-free guidance.
With less memory, pass e.g. `--per_device_train_batch_size 4 --gradient_accumulation_steps 6` (the product must stay
a multiple of 24, the group size) and/or `--activation_checkpointing`. SD3.5 Medium is gated on the Hugging Face Hub:
accept its licence and log in (`hf auth login`) first.
"""

import argparse

from datasets import Dataset
from peft import LoraConfig

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.rewards import jpeg_compressibility

# GenEval-style prompts (object counts, colours, positions). Use `--prompts_file` for your own (one per line).
TRAIN_PROMPTS = [
    ("a photo of two cats", "counting"),
    ("a photo of three apples", "counting"),
    ("a photo of four books", "counting"),
    ("a photo of a red bench", "colors"),
    ("a photo of a green car", "colors"),
    ("a photo of a yellow umbrella", "colors"),
    ("a photo of a dog left of a bicycle", "position"),
    ("a photo of a cup above a laptop", "position"),
    ("a photo of a blue vase and a white clock", "color_attr"),
    ("a photo of a purple chair and an orange bowl", "color_attr"),
    ("a photo of a bird and a train", "two_object"),
    ("a photo of a pizza and a toothbrush", "two_object"),
]
EVAL_PROMPTS = [
    ("a photo of two dogs", "counting"),
    ("a photo of a pink horse", "colors"),
    ("a photo of a clock right of a banana", "position"),
    ("a photo of a cake and a kite", "two_object"),
]

# The Flow-GRPO paper's settings for SD3.5-M / GenEval (most are also FlowGRPOConfig's defaults; written out here).
PAPER_SETTINGS = dict(
    num_generations=24,  # group size G
    per_device_train_batch_size=8,  # 8 x 3 x 1 GPU = 24 images = one prompt x 24 per optimizer step
    gradient_accumulation_steps=3,
    num_inference_steps=10,  # 9 recorded SDE steps (timestep_fraction=0.99) + 1 ODE step
    eval_num_inference_steps=40,
    guidance_scale=4.5,
    train_cfg=True,
    noise_level=0.7,
    height=512,
    width=512,
    beta=0.04,  # KL to the reference (GenEval / OCR; the paper uses 0.01 for PickScore)
    epsilon=1e-4,
    learning_rate=3e-4,
    weight_decay=1e-4,
    max_grad_norm=1.0,
    model_init_kwargs={"dtype": "bfloat16"},
)

# LoRA rank 32 / alpha 64 on the attention projections of the joint transformer blocks (image and text streams).
LORA_CONFIG = LoraConfig(
    r=32,
    lora_alpha=64,
    lora_dropout=0.0,  # dropout would make the first PPO ratio differ from 1
    init_lora_weights="gaussian",
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
)


def geneval_style_reward(prompts, images, tag=None, **kwargs):
    """PLACEHOLDER reward: replace the body with your GenEval-style scorer.

    Called once per optimizer step (per process) with keywords only:
        prompts: list[str], one per image (each prompt appears `num_generations` times);
        images: list[PIL.Image.Image], the generated images;
        tag: list[str], the dataset's `tag` column, one entry per image (every extra column arrives like this);
        trainer_state (in kwargs): the trainer's `TrainerState`.
    Returns one float per image (higher is better), or None for an image the reward does not apply to.

    As shipped it returns minus the JPEG size in kB (`jpeg_compressibility`) so that the script runs end to end.
    """
    return jpeg_compressibility(prompts, images)


def load_prompts(path):
    with open(path) as f:
        return [(line.strip(), "custom") for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", default="stabilityai/stable-diffusion-3.5-medium", help="Hub id or local path.")
    parser.add_argument("--output_dir", default="sd35-geneval-style")
    parser.add_argument("--prompts_file", default=None, help="Training prompts, one per line (default: built-in).")
    parser.add_argument("--max_steps", type=int, default=1000, help="Optimizer steps.")
    parser.add_argument(
        "--per_device_train_batch_size", type=int, default=PAPER_SETTINGS["per_device_train_batch_size"]
    )
    parser.add_argument(
        "--gradient_accumulation_steps", type=int, default=PAPER_SETTINGS["gradient_accumulation_steps"]
    )
    parser.add_argument("--activation_checkpointing", action="store_true", help="Trade compute for memory.")
    parser.add_argument("--report_to", default="none", help="none, wandb, tensorboard, ...")
    parser.add_argument("--seed", type=int, default=42)
    cli = parser.parse_args(argv)

    train_rows = load_prompts(cli.prompts_file) if cli.prompts_file else TRAIN_PROMPTS
    train_dataset = Dataset.from_dict({"prompt": [p for p, _ in train_rows], "tag": [t for _, t in train_rows]})
    eval_dataset = Dataset.from_dict({"prompt": [p for p, _ in EVAL_PROMPTS], "tag": [t for _, t in EVAL_PROMPTS]})

    settings = {
        **PAPER_SETTINGS,
        "per_device_train_batch_size": cli.per_device_train_batch_size,
        "gradient_accumulation_steps": cli.gradient_accumulation_steps,
    }
    args = FlowGRPOConfig(
        output_dir=cli.output_dir,
        max_steps=cli.max_steps,
        logging_steps=1,
        log_completions=True,  # sample grids with prompts and rewards in output_dir/samples/
        eval_strategy="steps",
        eval_steps=100,  # ODE sampling of EVAL_PROMPTS with fixed seeds
        save_strategy="steps",
        save_steps=100,
        report_to=cli.report_to,
        seed=cli.seed,
        activation_checkpointing=cli.activation_checkpointing,
        **settings,
    )
    trainer = FlowGRPOTrainer(
        model=cli.model_id,
        reward_funcs=[geneval_style_reward],
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=LORA_CONFIG,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model()  # output_dir/pytorch_lora_weights.safetensors (diffusers format)
    if trainer.is_world_process_zero():
        print(f"held-out reward: {before['eval_reward']:+.4f} -> {after['eval_reward']:+.4f}")
        print(
            f"LoRA saved to {cli.output_dir}/. Load it with:\n"
            f"  pipe = StableDiffusion3Pipeline.from_pretrained({cli.model_id!r}, dtype=torch.bfloat16)\n"
            f"  pipe.load_lora_weights({cli.output_dir!r})"
        )


if __name__ == "__main__":
    main()
