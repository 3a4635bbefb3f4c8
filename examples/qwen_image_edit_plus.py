"""Flow-GRPO on Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline) with a LoRA: instruction-based image editing.

    python examples/qwen_image_edit_plus.py --dataset_name my-org/my-edits --output_dir qwen-edit

The dataset and the rewards are those of `flux_kontext_edit.py` (imported from it: keep the two files side by
side): one row per edit with the instruction in `prompt`, the source image in `image` (a
`datasets.Image` column; `--source_image_column` for another name) and a caption of the wanted result in
`target_caption`; rewarded by the CLIPScore of the edit against `target_caption` and, at a lower weight, by how
close the edit stays to its source.

`--model_id Qwen/Qwen-Image-Edit-2511` trains the later checkpoint (same pipeline class; its transformer gives the
source tokens timestep 0). `guidance_scale` is the pipeline's `true_cfg_scale` (4.0, its default) with the negative
prompt " ", encoded with the source like the instruction: two transformer forwards per step.

GPU assumptions (estimates, not measured in this repository): one CUDA GPU with at least 80 GB of memory, bf16,
activation checkpointing and the text encoder offloaded to the CPU between rollouts. The transformer is about 20B
parameters (about 41 GB in bf16) and the Qwen2.5-VL-7B text encoder about 8B (16 GB); at 1024 x 1024 the source
doubles the transformer's image tokens (4096 + 4096) and the instruction adds about 400 tokens of template and
source. Several GPUs (`accelerate launch --multi_gpu`) divide the rollouts; keep per_device_train_batch_size x
gradient_accumulation_steps x GPUs a multiple of num_generations.

Rollouts resize each source to `--size` (a square) for the VAE, so the trained LoRA matches
`QwenImageEditPlusPipeline`'s default call for square sources at 1024 (docs/pipelines.md, Image editing).
"""

import argparse

from datasets import load_dataset
from flux_kontext_edit import source_preservation, target_clip_score
from peft import LoraConfig

from trl_flow_grpo import FlowGRPOConfig, FlowGRPOTrainer

LORA_CONFIG = LoraConfig(
    r=32,
    lora_alpha=64,
    lora_dropout=0.0,  # dropout would make the first PPO ratio differ from 1
    init_lora_weights="gaussian",
    # Every attention projection of Qwen-Image's blocks, image and text streams (the CLI's default names).
    target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
)


def make_config(cli: argparse.Namespace, evaluate: bool) -> FlowGRPOConfig:
    """The training configuration for the parsed command line."""
    return FlowGRPOConfig(
        output_dir=cli.output_dir,
        source_image_column=cli.source_image_column,
        height=cli.size,
        width=cli.size,
        num_generations=8,  # 8 edits of one source per group
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,  # 2 x 8 x 1 GPU = 16 images = 2 sources x 8 edits per optimizer step
        num_inference_steps=10,
        eval_num_inference_steps=50,  # QwenImageEditPlusPipeline's default
        guidance_scale=4.0,  # true_cfg_scale, the pipeline's default
        noise_level=0.7,
        beta=0.04,
        learning_rate=1e-4,
        max_grad_norm=1.0,
        reward_weights=[1.0, 0.3],  # target_clip_score, source_preservation
        activation_checkpointing=True,
        offload_text_encoders=True,
        model_init_kwargs={"dtype": "bfloat16"},
        max_steps=cli.max_steps,
        logging_steps=1,
        log_completions=True,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=50,
        per_device_eval_batch_size=2,
        save_strategy="steps",
        save_steps=100,
        report_to=cli.report_to,
        seed=cli.seed,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_id", default="Qwen/Qwen-Image-Edit-2509", help="Hub id or local path.")
    parser.add_argument("--dataset_name", required=True, help="Hub id or folder: prompt, image, target_caption.")
    parser.add_argument("--source_image_column", default="image")
    parser.add_argument("--eval_split", default=None, help="A split to evaluate on (its edits shown beside sources).")
    parser.add_argument("--output_dir", default="qwen-edit")
    parser.add_argument("--size", type=int, default=1024, help="Output height and width; sources are resized to it.")
    parser.add_argument("--max_steps", type=int, default=500, help="Optimizer steps.")
    parser.add_argument("--report_to", default="none", help="none, wandb, tensorboard, ...")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def main(argv=None):
    cli = parse_args(argv)
    train_dataset = load_dataset(cli.dataset_name, split="train")
    eval_dataset = load_dataset(cli.dataset_name, split=cli.eval_split) if cli.eval_split else None
    trainer = FlowGRPOTrainer(
        model=cli.model_id,
        reward_funcs=[target_clip_score, source_preservation],
        args=make_config(cli, evaluate=eval_dataset is not None),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=LORA_CONFIG,
    )
    trainer.train()
    trainer.save_model()  # output_dir/pytorch_lora_weights.safetensors (diffusers format)
    if trainer.is_world_process_zero():
        print(
            f"LoRA saved to {cli.output_dir}/. Load it with:\n"
            f"  pipe = QwenImageEditPlusPipeline.from_pretrained({cli.model_id!r}, dtype=torch.bfloat16)\n"
            f"  pipe.load_lora_weights({cli.output_dir!r})\n"
            f"  pipe(image=source, prompt=instruction, true_cfg_scale=4.0, negative_prompt=' ').images[0]"
        )


if __name__ == "__main__":
    main()
