"""Pretrain the tiny "shapes" text-to-image model that ships with the package (an SD3-family pipeline).

    python -m trl_flow_grpo.toy.pretrain --output_dir trl_flow_grpo/toy/weights/shapes-sd3 [--minutes 25]
    python -m trl_flow_grpo.toy.pretrain --init_from trl_flow_grpo/toy/weights/shapes-sd3 --transformer_steps 2000 \
        --lr 5e-4 --final_lr 0 --output_dir /tmp/shapes-sd3-longer   # continue stage 2 of a pretrained model

Two stages, both deterministic from `--seed` (up to floating-point non-determinism of the CPU kernels):
1. a small `AutoencoderKL` (32x32 RGB <-> 16x16x4 latents) trained to reconstruct shape images;
2. a small `SD3Transformer2DModel` trained by rectified flow matching on the latents, conditioned on frozen, randomly
   initialised CLIP-L/CLIP-G/T5 stand-ins (tokenizers built in code), with 10% empty captions for classifier-free
   guidance. Caption embeddings are precomputed once: the world has under a thousand captions.
`--init_from` continues a pretrained shapes pipeline instead: its VAE and text encoders are kept (stage 1 is skipped)
and its transformer trains on for `--transformer_steps` more steps. `--final_lr` decays the learning rate to it on
a cosine after the warm-up (default: constant, as the shipped weights were trained).
The result is a regular diffusers folder: `StableDiffusion3Pipeline.from_pretrained(output_dir)` loads it.
"""

import argparse
import json
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..tiny_tokenizers import make_tiny_clip_tokenizer, make_tiny_t5_tokenizer
from .shapes import all_captions, make_image_dataset

IMAGE_SIZE = 32
MAX_SEQUENCE_LENGTH = 16  # T5 tokens: pass max_sequence_length=16 when sampling or training this model
CLIP_MAX_LENGTH = 24  # CLIP tokens (SD3 pads CLIP prompts to the tokenizer's model_max_length)
TEXT_DIM = 64  # hidden size of each CLIP stand-in; T5 and the joint attention use 2 * TEXT_DIM


def build_untrained_pipeline(seed: int) -> StableDiffusion3Pipeline:
    """The architecture of the shapes model, randomly initialised (text encoders stay like this: frozen)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_3 = make_tiny_clip_tokenizer(CLIP_MAX_LENGTH), make_tiny_t5_tokenizer()

    def clip():
        config = CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            projection_dim=TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextModelWithProjection(config).eval()

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=2 * TEXT_DIM,
            d_kv=32,
            d_ff=2 * TEXT_DIM,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer_3.pad_token_id,
            eos_token_id=tokenizer_3.eos_token_id,
            decoder_start_token_id=tokenizer_3.pad_token_id,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    transformer = SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_DIM,
        caption_projection_dim=128,
        pooled_projection_dim=2 * TEXT_DIM,
        pos_embed_max_size=IMAGE_SIZE // 2,
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
        vae=vae,
        text_encoder=clip(),
        tokenizer=tokenizer,
        text_encoder_2=clip(),
        tokenizer_2=make_tiny_clip_tokenizer(CLIP_MAX_LENGTH),
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )


def _to_tensor(images) -> torch.Tensor:
    import numpy as np

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int, lr: float, log) -> None:
    """Reconstruction (MSE) with a tiny KL weight, so that the latents are nearly deterministic."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    vae.train()
    for step in tqdm(range(steps), desc="vae", mininterval=5):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        mse = F.mse_loss(recon, batch)
        kl = posterior.kl().mean() / batch[0].numel()
        loss = mse + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0 or step == steps - 1:
            log({"stage": "vae", "step": step, "mse": mse.item(), "kl": kl.item()})
    vae.eval()


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(images[i : i + batch_size]).latent_dist.mode() for i in range(0, len(images), 256)])


@torch.no_grad()
def caption_table(pipe: StableDiffusion3Pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """Prompt embeddings of every caption (index i) and of the empty caption (last index)."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions + [""],
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    return {"embeds": embeds, "pooled": pooled}


def train_transformer(
    transformer: SD3Transformer2DModel,
    latents: torch.Tensor,
    caption_ids: torch.Tensor,
    table: dict[str, torch.Tensor],
    deadline: float,
    max_steps: int,
    batch_size: int,
    lr: float,
    log,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 1000,
    final_lr: float | None = None,
) -> int:
    """Rectified flow matching: x_t = (1 - t) x0 + t eps, target v = eps - x0, t ~ logit-normal (as SD3).

    The learning rate warms up over 200 steps, then stays at `lr`, or with `final_lr` follows a cosine from `lr`
    down to `final_lr` at `max_steps`."""
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    empty = len(table["embeds"]) - 1
    transformer.train()
    step = 0
    progress = tqdm(total=max_steps, desc="transformer", mininterval=5)
    while step < max_steps and time.time() < deadline:
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        x0 = latents[index]
        ids = caption_ids[index].clone()
        ids[torch.rand(batch_size, generator=generator) < 0.1] = empty  # CFG dropout
        t = torch.sigmoid(torch.randn(batch_size, generator=generator))
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        warmup = min(1.0, (step + 1) / 200)
        current = lr
        if final_lr is not None:
            current = final_lr + (lr - final_lr) * 0.5 * (1 + math.cos(math.pi * step / max_steps))
        for group in optimizer.param_groups:
            group["lr"] = current * warmup
        pred = transformer(
            hidden_states=x_t,
            timestep=t * 1000,
            encoder_hidden_states=table["embeds"][ids],
            pooled_projections=table["pooled"][ids],
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, noise - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        if step % 200 == 0:
            log({"stage": "transformer", "step": step, "loss": loss.item()})
        step += 1
        if checkpoint_dir and step % checkpoint_every == 0:
            os.makedirs(checkpoint_dir, exist_ok=True)
            save_file(
                transformer.state_dict(), os.path.join(checkpoint_dir, f"transformer-step{step:06d}.safetensors")
            )
        progress.update(1)
    progress.close()
    transformer.eval()
    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)),
        help="torch threads (default: OMP_NUM_THREADS, else every core; use 1 beside another job).",
    )
    parser.add_argument("--num_images", type=int, default=40000)
    parser.add_argument("--vae_steps", type=int, default=1000)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--checkpoint_dir", default=None, help="Also save the transformer every 1000 steps here.")
    parser.add_argument("--transformer_steps", type=int, default=4000)
    parser.add_argument("--minutes", type=float, default=None, help="Optional wall-clock cap of stage 2.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--final_lr", type=float, default=None, help="Cosine decay of stage 2's lr to this value.")
    parser.add_argument(
        "--init_from", default=None, help="A pretrained shapes pipeline: keep its VAE, continue its transformer."
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "pretrain_log.jsonl")
    log_file = open(log_path, "w")

    def log(record: dict) -> None:
        print(json.dumps(record), flush=True)
        log_file.write(json.dumps(record) + "\n")

    torch.set_num_threads(args.threads)
    start = time.time()
    if args.init_from:
        pipe = StableDiffusion3Pipeline.from_pretrained(args.init_from)
        log({"stage": "init", "from": args.init_from})
    else:
        pipe = build_untrained_pipeline(args.seed)
    pil_images, captions = make_image_dataset(args.num_images, seed=args.seed, split="train", size=IMAGE_SIZE)
    images = _to_tensor(pil_images)
    log({"stage": "data", "images": len(images), "seconds": round(time.time() - start, 1)})

    if args.init_from:  # the VAE and its latent normalisation stay
        shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
        latents = (encode_latents(pipe.vae, images) - shift) * scale
    else:
        train_vae(pipe.vae, images, args.vae_steps, args.vae_batch_size, 2e-3, log)
        latents = encode_latents(pipe.vae, images)
        shift, scale = latents.mean().item(), 1.0 / latents.std().item()
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
        latents = (latents - shift) * scale
    log({"stage": "latents", "shift_factor": shift, "scaling_factor": scale, "seconds": round(time.time() - start)})

    vocabulary = all_captions()
    index = {caption: i for i, caption in enumerate(vocabulary)}
    table = caption_table(pipe, vocabulary)
    caption_ids = torch.tensor([index[c] for c in captions])
    deadline = time.time() + 60 * args.minutes if args.minutes else math.inf
    steps = train_transformer(
        pipe.transformer,
        latents,
        caption_ids,
        table,
        deadline,
        args.transformer_steps,
        args.batch_size,
        args.lr,
        log,
        checkpoint_dir=args.checkpoint_dir,
        final_lr=args.final_lr,
    )
    log({"stage": "done", "transformer_steps": steps, "minutes": round((time.time() - start) / 60, 1)})
    pipe.save_pretrained(args.output_dir)
    log_file.close()
    print(f"saved to {args.output_dir} in {math.ceil((time.time() - start) / 60)} min")


if __name__ == "__main__":
    main()
