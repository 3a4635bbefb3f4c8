"""Cost of one training iteration of Flow-GRPO, Flow-GRPO-Fast, MixGRPO and MixGRPO-Flash, measured in one run.

Every method trains the same model (a LoRA on its transformer) on the same prompts with the same seeds through
`FlowGRPOTrainer`; only the sampling options differ (`docs/efficient_sampling.md`). For each method it reports:

* transformer forwards per iteration, counted per sample (a forward of a batch of B counts B; a CFG evaluation
  counts 2), split into the rollout (`_generate_and_score`) and the training (everything else: the recomputed
  log-probs, plus the reference model when `--beta > 0`; backward passes are not counted);
* wall time per iteration (one optimizer step on one generation batch), and its rollout part (sampling, VAE decode
  and reward) and training part; on CPU also the process's CPU time per iteration, which other work on a shared
  machine disturbs much less than the wall time (with `--threads 1` it is the compute the iteration needed);
* peak memory: CUDA `max_memory_allocated` on GPU; on CPU the increase of the process's resident set size (RSS) over
  its value once the model is loaded, sampled every 5 ms (each method runs in its own process, so the figures do not
  leak into each other);
* model FLOPs and their rate: the FLOPs of every transformer forward, from the shapes it was called with and the
  model's configuration (`transformer_forward_flops`: SD3's joint blocks counted by formula, other families
  2 x parameters x tokens), summed over the rollout and over the training, where each forward is counted 3 times
  (forward + backward); divided by the measured rollout and training times, and by the device's peak (model FLOPs
  utilisation, MFU) where it is known: `PEAK_TFLOPS` (bf16 dense) or `--peak-tflops`. On CPU only the achieved rate;
* the ratio of each figure to Flow-GRPO's in the same run.

The first iteration of each method is a warm-up and is not timed. MixGRPO's cost depends on where its window is (the
ODE prefix is shared within a group, the ODE tail is not); over a training run the paper's schedule (shift every 25
iterations) visits every start of its range equally often, so the benchmark moves the window every iteration with a
stride that spreads the timed iterations over the whole range, which estimates the average over a cycle.

Examples:

    # CPU, a few minutes: the tiny offline SD3 pipeline with a larger transformer (`--transformer small`)
    python benchmarks/bench_sampling.py --threads 1
    # GPU, a real model (local path or cached Hub id)
    python benchmarks/bench_sampling.py --model stabilityai/stable-diffusion-3.5-medium --resolution 512 \\
        --num-generations 12 --batch-size 12 --cfg --iterations 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

METHODS = {
    # name: (label, sampling options); T and the window size are filled in from the arguments
    "flow_grpo": ("Flow-GRPO", {"sde_window": "full", "timestep_fraction": 0.99}),
    "fast": ("Flow-GRPO-Fast", {"sde_window": "random"}),
    "mixgrpo": ("MixGRPO", {"sde_window": "sliding"}),
    "flash": ("MixGRPO-Flash", {"sde_window": "sliding", "ode_solver": "dpm_solver++_2m"}),
    "flash_star": ("MixGRPO-Flash*", {"sde_window": "frozen", "ode_solver": "dpm_solver++_2m"}),
}
PROMPTS = [
    "a red circle",
    "two blue squares",
    "a green triangle next to a yellow house",
    "a photo of a cat",
    "a painting of a tree",
    "three white birds",
    "an orange car on the left",
    "a small pink apple",
]


# Peak bf16 dense tensor throughput (TFLOP/s, no sparsity) by device name, from the vendor's data sheets. The first
# entry whose key is in `torch.cuda.get_device_name()` wins, so the PCIe variant comes before the generic name.
PEAK_TFLOPS = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
}


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The device's peak bf16 dense TFLOP/s: `override` if given, else `PEAK_TFLOPS`'s entry, else None (CPU,
    unknown GPUs: only the achieved rate is reported)."""
    if override is not None:
        return override
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


def sd3_forward_flops(config, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one `SD3Transformer2DModel` forward of one sample (a multiply-add counts 2), from its configuration.

    With d = `num_attention_heads` x `attention_head_dim`, N image tokens (latent pixels / `patch_size`^2), M text
    tokens and L = N + M, each joint block costs

    * image stream: q, k, v and output projections 4 x 2Nd^2, MLP (4x wide) 2 x 2N x 4d^2: 24Nd^2;
    * text stream: the same, 24Md^2; in the last block (`context_pre_only`) only q, k, v: 6Md^2;
    * joint attention over L tokens: QK^T and AV, 4L^2d;
    * SD3.5's second attention (blocks in `dual_attention_layers`), image tokens only: 8Nd^2 + 4N^2d;

    plus the patch embedding 2N(p^2 C_in)d, the text projection 2M x `joint_attention_dim` x d and the output
    projection 2Nd(p^2 C_out). Per-sample terms (timestep and pooled embeddings, AdaLN modulations) and norms are
    left out: they do not grow with the tokens and are below 1% at real sizes.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    n, m, layers, p = image_tokens, text_tokens, config["num_layers"], config["patch_size"]
    dual = set(config.get("dual_attention_layers") or ())
    flops = 0.0
    for layer in range(layers):
        flops += 24 * n * d**2 + (6 if layer == layers - 1 else 24) * m * d**2 + 4 * (n + m) ** 2 * d
        if layer in dual:
            flops += 8 * n * d**2 + 4 * n**2 * d
    flops += 2 * n * p * p * config["in_channels"] * d + 2 * m * config["joint_attention_dim"] * d
    flops += 2 * n * d * p * p * (config["out_channels"] or config["in_channels"])
    return float(flops)


def transformer_forward_flops(transformer, hidden_states, encoder_hidden_states) -> float:
    """FLOPs of one forward of `transformer` on these inputs (the whole batch): `sd3_forward_flops` for SD3 (latents
    (B, C, H, W)), else the fallback 2 x parameters x (image + text tokens) per sample (FLUX and Qwen-Image pass
    packed tokens (B, N, C); it leaves out the attention's L^2 term)."""
    batch = hidden_states.shape[0]
    text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
    if type(transformer).__name__.endswith("SD3Transformer2DModel") and hidden_states.dim() == 4:
        p = transformer.config.patch_size
        image = hidden_states.shape[2] * hidden_states.shape[3] // (p * p)
        return batch * sd3_forward_flops(transformer.config, image, text)
    params = sum(p.numel() for p in transformer.parameters())
    return batch * 2.0 * params * (hidden_states.shape[1] + text)


@dataclass
class Result:
    method: str
    label: str
    windows: list[list[int]]
    rollout_calls: float
    train_calls: float
    time_s: float
    cpu_s: float
    rollout_s: float
    train_s: float
    iteration_times_s: list[float]
    peak_memory_mb: float
    memory_kind: str
    device: str
    rollout_tflop: float  # per iteration: model TFLOPs of the rollout's forwards
    train_tflop: float  # per iteration: 3 x the training forwards' TFLOPs (forward + backward)
    rollout_tflops: float  # achieved TFLOP/s
    train_tflops: float
    rollout_mfu: float | None  # achieved / peak; None where the peak is unknown (CPU)
    train_mfu: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="Pipeline id or path; default: the tiny offline SD3 pipeline.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=25, help="Denoising steps T (paper: 25).")
    parser.add_argument("--window-size", type=int, default=4, help="MixGRPO window size w (paper: 4).")
    parser.add_argument("--fast-window-size", type=int, default=2, help="Flow-GRPO-Fast window size (1 to 3).")
    parser.add_argument("--compression", type=float, default=0.4, help="MixGRPO-Flash ODE compression (paper: 0.4).")
    parser.add_argument("--iterations", type=int, default=3, help="Timed iterations per method (after 1 warm-up).")
    parser.add_argument("--num-generations", type=int, default=4, help="Group size G.")
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size.")
    parser.add_argument("--accumulation", type=int, default=2, help="gradient_accumulation_steps.")
    parser.add_argument("--resolution", type=int, default=64, help="Image height and width.")
    parser.add_argument(
        "--transformer",
        choices=["tiny", "small", "sd35m", "flux", "qwen_image"],
        default="small",
        help="Without --model: the tiny pipeline's 2-layer transformer; a 4-layer one 16x wider, so that the "
        "transformer dominates the cost as in real models; or `sd35m`, a pipeline the size of SD3.5-Medium with "
        "random weights (see `sd35_medium_sized_pipeline`), for GPU figures without downloading weights; or `flux` / "
        "`qwen_image`, a FLUX.1- / Qwen-Image-wide transformer with fewer layers in the tiny pipeline of its family "
        "(see `family_sized_pipeline`).",
    )
    parser.add_argument(
        "--num-layers",
        type=int,
        default=None,
        help="With --transformer sd35m / flux / qwen_image: the (double-stream) layers (defaults 24 / 5 / 8).",
    )
    parser.add_argument(
        "--num-heads", type=int, default=24, help="With --transformer flux / qwen_image: heads of 128 (24; tests: 1)."
    )
    parser.add_argument("--cfg", action="store_true", help="Classifier-free guidance in rollouts and training.")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient (MixGRPO uses 0).")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations in backward.")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's). On a shared machine use 1: OpenMP threads that wait for a busy "
        "core make CPU timings erratic.",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="The device's peak TFLOP/s for MFU (default: PEAK_TFLOPS's bf16 dense figure for H100/H200/A100).",
    )
    parser.add_argument("--in-process", action="store_true", help="Run every method in this process.")
    parser.add_argument("--json", default=None, help="Also write the results to this JSON file.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------------------- one method
def build_pipeline(args: argparse.Namespace, device: str):
    import torch

    if args.model is not None:
        from diffusers import DiffusionPipeline

        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        return DiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype)

    from diffusers import SD3Transformer2DModel

    from trl_flow_grpo.testing import make_tiny_sd3_pipeline

    if args.transformer == "sd35m":
        return sd35_medium_sized_pipeline(args.resolution, device, num_layers=args.num_layers or 24)
    if args.transformer in ("flux", "qwen_image"):
        layers = args.num_layers or {"flux": 5, "qwen_image": 8}[args.transformer]
        return family_sized_pipeline(args.transformer, args.resolution, device, layers, args.num_heads)
    pipe = make_tiny_sd3_pipeline(seed=0, sample_size=args.resolution)
    if args.transformer == "small":
        tiny = pipe.transformer.config
        heads, head_dim = 4, 64
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            transformer = SD3Transformer2DModel(
                sample_size=tiny.sample_size,
                patch_size=tiny.patch_size,
                in_channels=tiny.in_channels,
                num_layers=4,
                attention_head_dim=head_dim,
                num_attention_heads=heads,
                joint_attention_dim=tiny.joint_attention_dim,
                caption_projection_dim=heads * head_dim,
                pooled_projection_dim=tiny.pooled_projection_dim,
                out_channels=tiny.out_channels,
                pos_embed_max_size=tiny.pos_embed_max_size,
            ).eval()
        pipe.register_modules(transformer=transformer)
    return pipe


def sd35_medium_sized_pipeline(resolution: int, device: str, num_layers: int = 24):
    """A `StableDiffusion3Pipeline` with SD3.5-Medium's transformer and VAE architectures and random weights (bf16 on a
    GPU), so that GPU time and memory can be measured offline.

    Transformer: SD3.5-Medium's config (MMDiT-X, 24 layers of 24 heads x 64, dual attention in layers 0-12, RMS
    q/k norm, 4096-wide text input, 2048-wide pooled input; 2.24B parameters). VAE: SD3's (16 latent channels,
    blocks 128-256-512-512). Text encoders: the widths SD3.5 feeds the transformer (CLIP-L 768 and CLIP-G 1280,
    pooled 768 + 1280; T5 with d_model 4096, so the text sequence is 77 + `max_sequence_length` tokens as with
    T5-XXL) but 1 or 2 layers and a small vocabulary: their cost is left out (the real ones run once per prompt
    batch; in bf16 they hold about 11 GB: CLIP-L 0.25, CLIP-G 1.4, T5-XXL 9.5).
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from trl_flow_grpo.testing import make_tiny_clip_tokenizer, make_tiny_t5_tokenizer

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer, tokenizer_2 = make_tiny_clip_tokenizer(), make_tiny_clip_tokenizer()
    tokenizer_3 = make_tiny_t5_tokenizer()

    def clip(tok, width: int) -> CLIPTextModelWithProjection:
        config = CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=width,
            intermediate_size=4 * width,
            projection_dim=width,
            num_hidden_layers=2,  # SD3 reads hidden_states[-2]
            num_attention_heads=width // 64,
            max_position_embeddings=77,
            hidden_act="gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        return CLIPTextModelWithProjection(config)

    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=num_layers,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=384,
            dual_attention_layers=tuple(range(min(13, num_layers))),
            qk_norm="rms_norm",
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=16,
            norm_num_groups=32,
            sample_size=resolution,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_3),
                d_model=4096,
                d_kv=64,
                d_ff=256,
                num_layers=1,
                num_heads=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=tokenizer_3.pad_token_id,
                eos_token_id=tokenizer_3.eos_token_id,
                decoder_start_token_id=tokenizer_3.pad_token_id,
            )
        )
        encoders = (clip(tokenizer, 768), clip(tokenizer_2, 1280), t5)
    for model in (transformer, vae, *encoders):
        torch.nn.Module.to(model, dtype=dtype)
        model.eval()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=encoders[1],
        tokenizer_2=tokenizer_2,
        text_encoder_3=encoders[2],
        tokenizer_3=tokenizer_3,
    )


def family_sized_pipeline(family: str, resolution: int, device: str, num_layers: int, num_heads: int = 24):
    """The tiny offline pipeline of `family` (`trl_flow_grpo.testing`) with its transformer rebuilt from its own
    configuration at the real model's width: `num_heads` heads of 128 (FLUX.1 and Qwen-Image: 24, 3072 wide), rotary
    axes (16, 56, 56), `num_layers` double-stream blocks (the real models: FLUX.1 19 + 38 single-stream, here
    `num_layers` + `2 * num_layers`; Qwen-Image 60). Random weights, bf16 on a GPU.

    The VAE and text encoders stay tiny, so their cost is left out, and the tiny VAE downsamples 2x instead of 8x:
    `resolution` 128 gives the 1024 image tokens that 512 px gives the real models. The text input keeps the tiny
    width (the text projection's cost, 2 x tokens x width x 3072, is small next to the blocks').
    """
    import torch

    from trl_flow_grpo import testing

    build = {"flux": testing.make_tiny_flux_pipeline, "qwen_image": testing.make_tiny_qwen_image_pipeline}[family]
    pipe = build(seed=0, sample_size=resolution)
    tiny = pipe.transformer
    sized = {"num_layers": num_layers, "attention_head_dim": 128, "num_attention_heads": num_heads}
    sized["axes_dims_rope"] = (16, 56, 56)
    if family == "flux":
        sized["num_single_layers"] = 2 * num_layers
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(1)
        transformer = type(tiny).from_config({**tiny.config, **sized})
    torch.nn.Module.to(transformer, dtype=dtype)
    pipe.register_modules(transformer=transformer.eval())
    return pipe


def method_config(args: argparse.Namespace, method: str, output_dir: str, device: str):
    from trl_flow_grpo import FlowGRPOConfig

    options = dict(METHODS[method][1])
    positions = max(args.steps - 2 - args.window_size + 1, 1)  # starts of a w-window in [0, T - 2)
    if method == "fast":
        options["sde_window_size"] = args.fast_window_size
    elif method in ("mixgrpo", "flash"):
        # Spread the timed iterations over the window's whole range (see the module docstring).
        options |= {
            "sde_window_size": args.window_size,
            "sde_window_shift_interval": 1,
            "sde_window_stride": max(1, positions // (args.iterations + 1)),
        }
    elif method == "flash_star":
        options["sde_window_size"] = args.window_size
    if options.get("ode_solver") == "dpm_solver++_2m":
        options["ode_compression"] = args.compression
    return FlowGRPOConfig(
        output_dir=output_dir,
        report_to="none",
        num_inference_steps=args.steps,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.accumulation,
        height=args.resolution,
        width=args.resolution,
        max_steps=args.iterations + 1,
        max_sequence_length=256
        if args.model is not None or args.transformer in ("sd35m", "flux", "qwen_image")
        else 16,
        train_cfg=args.cfg,
        gradient_checkpointing=args.gradient_checkpointing,
        beta=args.beta,
        same_latent=True,
        learning_rate=1e-4,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        use_cpu=device == "cpu",
        bf16=device.startswith("cuda"),
        seed=0,
        **options,
    )


class _PeakRSS:
    """Peak resident set size of this process, sampled by a thread (Linux `/proc/self/statm`)."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(self.interval_s)

    def __enter__(self):
        self.peak = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


def run_method(args: argparse.Namespace, method: str) -> Result:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_flow_grpo import FlowGRPOTrainer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(args, device)
    prompts_needed = args.batch_size * args.accumulation // args.num_generations
    dataset = Dataset.from_dict({"prompt": (PROMPTS * 8)[: max(prompts_needed, 1) * 4]})
    lora = LoraConfig(
        r=args.lora_rank,
        lora_alpha=2 * args.lora_rank,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"],
    )
    with tempfile.TemporaryDirectory() as output_dir:
        config = method_config(args, method, output_dir, device)
        trainer = FlowGRPOTrainer(pipe, "jpeg_compressibility", args=config, train_dataset=dataset, peft_config=lora)

        # Count transformer forwards (rows), by phase.
        phase = {"name": "train"}
        counts = {"rollout": [], "train": []}  # per iteration
        current = {"rollout": 0, "train": 0}
        flops = {"rollout": [], "train": []}  # per iteration
        current_flops = {"rollout": 0.0, "train": 0.0}
        transformer = trainer.accelerator.unwrap_model(trainer.model)

        def count(module, positional, kwargs):
            hidden = kwargs.get("hidden_states", positional[0] if positional else None)
            current[phase["name"]] += hidden.shape[0]
            text = kwargs.get("encoder_hidden_states")
            current_flops[phase["name"]] += transformer_forward_flops(transformer, hidden, text)

        handle = transformer.register_forward_pre_hook(count, with_kwargs=True)

        rollout_times: list[float] = []
        original = trainer._generate_and_score

        def generate_and_score(batches):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            phase["name"], start = "rollout", time.perf_counter()
            try:
                return original(batches)
            finally:
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                rollout_times.append(time.perf_counter() - start)
                phase["name"] = "train"

        trainer._generate_and_score = generate_and_score
        step_ends: list[float] = []
        cpu_ends: list[float] = []
        windows: list[list[int]] = []

        class Timer(TrainerCallback):
            def on_step_end(self, *_, **__):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                step_ends.append(time.perf_counter())
                cpu_ends.append(time.process_time())
                generation = (trainer.state.global_step - 1) // trainer.args.num_iterations  # the step just done
                windows.append(trainer.sde_window.for_iteration(generation).steps)
                for key in current:
                    counts[key].append(current[key])
                    current[key] = 0
                    flops[key].append(current_flops[key])
                    current_flops[key] = 0.0

        trainer.add_callback(Timer())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with _PeakRSS() as rss:
            baseline = rss.current()
            trainer.train()
        handle.remove()

    timed = slice(1, None)  # iteration 0 is the warm-up
    n = len(step_ends) - 1
    time_s = (step_ends[-1] - step_ends[0]) / n
    cpu_s = (cpu_ends[-1] - cpu_ends[0]) / n
    rollout_s = sum(rollout_times[timed]) / n
    if device.startswith("cuda"):
        memory, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max_memory_allocated"
    else:
        memory, kind = (rss.peak - baseline) / 2**20, "CPU peak RSS increase"
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = peak_tflops(name, args.peak_tflops) if device.startswith("cuda") or args.peak_tflops else None
    rollout_tflop = sum(flops["rollout"][timed]) / n / 1e12
    train_tflop = 3 * sum(flops["train"][timed]) / n / 1e12
    rollout_rate, train_rate = rollout_tflop / rollout_s, train_tflop / max(time_s - rollout_s, 1e-9)
    return Result(
        method=method,
        label=METHODS[method][0],
        windows=windows[timed],
        rollout_calls=sum(counts["rollout"][timed]) / n,
        train_calls=sum(counts["train"][timed]) / n,
        time_s=time_s,
        cpu_s=cpu_s,
        rollout_s=rollout_s,
        train_s=time_s - rollout_s,
        iteration_times_s=[b - a for a, b in zip(step_ends, step_ends[1:])],
        peak_memory_mb=memory,
        memory_kind=kind,
        device=name,
        rollout_tflop=rollout_tflop,
        train_tflop=train_tflop,
        rollout_tflops=rollout_rate,
        train_tflops=train_rate,
        rollout_mfu=rollout_rate / peak if peak else None,
        train_mfu=train_rate / peak if peak else None,
    )


# ------------------------------------------------------------------------------------------------------------ report
def describe(args: argparse.Namespace, method: str) -> str:
    w, T = args.window_size, args.steps
    return {
        "flow_grpo": f"first {int(T * 0.99 + 1e-9)} SDE",
        "fast": f"random {args.fast_window_size} SDE in [0, {T // 2})",
        "mixgrpo": f"sliding {w} SDE in [0, {T - 2}), Euler",
        "flash": f"sliding {w} SDE, DPM++2M x{args.compression}",
        "flash_star": f"frozen [0, {w}) SDE, DPM++2M x{args.compression}",
    }[method]


def format_table(args: argparse.Namespace, results: list[Result]) -> str:
    base = next((r for r in results if r.method == "flow_grpo"), results[0])
    lines = [
        f"T={args.steps}, G={args.num_generations}, {args.batch_size * args.accumulation} images/iteration, "
        f"{args.resolution}px, cfg={args.cfg}, beta={args.beta}, "
        f"gradient_checkpointing={args.gradient_checkpointing}, device={results[0].device}, "
        f"memory={results[0].memory_kind}. Ratios are to {base.label} in this run.",
        "",
        "| method | window | rollout fwd/it | train fwd/it | time/it (s) | rollout s | train s | CPU s/it | peak MiB |"
        " fwd ratio | time ratio | CPU time ratio | memory ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_calls = base.rollout_calls + base.train_calls
    for r in results:
        calls = r.rollout_calls + r.train_calls
        mem_ratio = r.peak_memory_mb / base.peak_memory_mb if base.peak_memory_mb > 0 else float("nan")
        lines.append(
            f"| {r.label} | {describe(args, r.method)} | {r.rollout_calls:.0f} | {r.train_calls:.0f} | "
            f"{r.time_s:.2f} | {r.rollout_s:.2f} | {r.train_s:.2f} | {r.cpu_s:.2f} | {r.peak_memory_mb:.0f} | "
            f"{calls / base_calls:.2f} | {r.time_s / base.time_s:.2f} | {r.cpu_s / base.cpu_s:.2f} | {mem_ratio:.2f} |"
        )
    lines += [
        "",
        "| method | rollout TFLOP/it | train TFLOP/it (3x fwd) | rollout TFLOP/s | train TFLOP/s | rollout MFU |"
        " train MFU |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mfu = [f"{x:.1%}" if x is not None else "n/a" for x in (r.rollout_mfu, r.train_mfu)]
        lines.append(
            f"| {r.label} | {r.rollout_tflop:.4g} | {r.train_tflop:.4g} | {r.rollout_tflops:.4g} | "
            f"{r.train_tflops:.4g} | {mfu[0]} | {mfu[1]} |"
        )
    lines.append("")
    lines.append("Windows of the timed iterations: " + "; ".join(f"{r.label} {r.windows}" for r in results))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        print("RESULT " + json.dumps(asdict(run_method(args, args.worker))), flush=True)
        return
    results = []
    for method in args.methods:
        start = time.perf_counter()
        if args.in_process:
            result = run_method(args, method)
        else:  # one process per method: clean peak memory, no state shared between methods
            argv_worker = list(argv if argv is not None else sys.argv[1:]) + ["--worker", method]
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), *argv_worker],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
            )
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                sys.stderr.write(out.stdout[-3000:] + out.stderr[-5000:])
                raise SystemExit(f"{method} failed (exit code {out.returncode})")
            result = Result(**json.loads(lines[-1][len("RESULT ") :]))
        results.append(result)
        print(f"{result.label}: {result.time_s:.2f} s/it ({time.perf_counter() - start:.0f} s in all)", flush=True)
    print()
    print(format_table(args, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": [asdict(r) for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
