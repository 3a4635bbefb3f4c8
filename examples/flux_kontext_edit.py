"""Flow-GRPO on FLUX.1-Kontext-dev with a LoRA: instruction-based image editing.

    python examples/flux_kontext_edit.py --dataset_name my-org/my-edits --output_dir kontext-edit

The dataset: one row per edit, with the instruction in `prompt`, the source image in `image` (a `datasets.Image`
column; `--source_image_column` for another name) and a caption of the wanted result in `target_caption`, e.g.
`{"prompt": "make the car red", "image": <PIL>, "target_caption": "a red car parked on a street"}`. Each group is
`num_generations` edits of one source.

The rewards, both real (nothing to replace to run it, though a task-specific judge is better):
- `target_clip_score`: the CLIPScore of the edit against `target_caption` (the built-in `clip_score` model): does
  the edit show what was asked for;
- `source_preservation`: 1 minus the mean absolute pixel difference between the edit and its source: does it keep
  what was not asked to change. Alone it is maximised by returning the source unchanged; `reward_weights` keeps it
  a minority of the total.

GPU assumptions (not measured in this repository): one CUDA GPU with about 80 GB of memory, bf16. The source image
doubles the transformer's image tokens (4096 + 4096 at 1024 x 1024), so a step costs about twice FLUX.1-dev's at the
same size. FLUX.1-Kontext-dev is gated on the Hugging Face Hub: accept its licence and log in (`hf auth login`).
Rollouts resize each source to `--size` (a square; Kontext's preferred resolution for square sources is 1024), so
the trained LoRA matches `FluxKontextPipeline`'s default call for square sources (docs/pipelines.md, Image editing).
"""

import argparse

import numpy as np
from datasets import load_dataset
from peft import LoraConfig

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer
from trl_flow_grpo.rewards.clip_score import clip_score_reward

LORA_CONFIG = LoraConfig(
    r=32,
    lora_alpha=64,
    lora_dropout=0.0,  # dropout would make the first PPO ratio differ from 1
    init_lora_weights="gaussian",
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
)


def target_clip_score(images, target_caption, **kwargs):
    """CLIPScore of each edit against the caption of the wanted result (the dataset's `target_caption` column)."""
    return clip_score_reward.score(list(target_caption), images).tolist()


def source_preservation(images, source_images, **kwargs):
    """1 - the mean absolute pixel difference (in [0, 1]) between each edit and its source, at the edit's size."""
    scores = []
    for edit, source in zip(images, source_images):
        edit_pixels = np.asarray(edit.convert("RGB"), dtype=np.float64)
        source_pixels = np.asarray(source.convert("RGB").resize(edit.size), dtype=np.float64)
        scores.append(1.0 - float(np.abs(edit_pixels - source_pixels).mean()) / 255.0)
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", default="black-forest-labs/FLUX.1-Kontext-dev", help="Hub id or local path.")
    parser.add_argument("--dataset_name", required=True, help="Hub id or folder: prompt, image, target_caption.")
    parser.add_argument("--source_image_column", default="image")
    parser.add_argument("--eval_split", default=None, help="A split to evaluate on (its edits shown beside sources).")
    parser.add_argument("--output_dir", default="kontext-edit")
    parser.add_argument("--size", type=int, default=1024, help="Output height and width; sources are resized to it.")
    parser.add_argument("--max_steps", type=int, default=500, help="Optimizer steps.")
    parser.add_argument("--report_to", default="none", help="none, wandb, tensorboard, ...")
    parser.add_argument("--seed", type=int, default=42)
    cli = parser.parse_args(argv)

    train_dataset = load_dataset(cli.dataset_name, split="train")
    eval_dataset = load_dataset(cli.dataset_name, split=cli.eval_split) if cli.eval_split else None
    args = FlowGRPOConfig(
        output_dir=cli.output_dir,
        source_image_column=cli.source_image_column,
        height=cli.size,
        width=cli.size,
        num_generations=8,  # 8 edits of one source per group
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,  # 4 x 4 x 1 GPU = 16 images = 2 sources x 8 edits per optimizer step
        num_inference_steps=10,
        eval_num_inference_steps=28,  # FluxKontextPipeline's default
        guidance_scale=2.5,  # diffusers' FluxKontextPipeline example (embedded guidance)
        noise_level=0.7,
        beta=0.04,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        reward_weights=[1.0, 0.3],  # target_clip_score, source_preservation
        max_sequence_length=512,
        activation_checkpointing=True,
        model_init_kwargs={"dtype": "bfloat16"},
        max_steps=cli.max_steps,
        logging_steps=1,
        log_completions=True,
        eval_strategy="steps" if eval_dataset is not None else "no",
        eval_steps=50,
        per_device_eval_batch_size=4,
        save_strategy="steps",
        save_steps=100,
        report_to=cli.report_to,
        seed=cli.seed,
    )
    trainer = FlowGRPOTrainer(
        model=cli.model_id,
        reward_funcs=[target_clip_score, source_preservation],
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=LORA_CONFIG,
    )
    trainer.train()
    trainer.save_model()  # output_dir/pytorch_lora_weights.safetensors (diffusers format)
    if trainer.is_world_process_zero():
        print(
            f"LoRA saved to {cli.output_dir}/. Load it with:\n"
            f"  pipe = FluxKontextPipeline.from_pretrained({cli.model_id!r}, dtype=torch.bfloat16)\n"
            f"  pipe.load_lora_weights({cli.output_dir!r})\n"
            f"  pipe(image=source, prompt=instruction, guidance_scale=2.5).images[0]"
        )


if __name__ == "__main__":
    main()
