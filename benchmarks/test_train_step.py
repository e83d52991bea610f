"""One STELLAR training step: Triton kernels against the PyTorch references, and its components.

Figures (docs/benchmarks.md):
- train_step/vitb16_B64: a full step of the base preset (ViT-B/16, 16 tokens, 8 masked
  views, 8 local crops, bf16) at 64 images, --kernels triton (ours) against
  --kernels torch (baseline "torch_kernels"); GPU only.
- train_step/components_vitb16_B64: forward milliseconds of the encoder, decoder,
  masked-view encoding, SK clustering, Sinkhorn and Hungarian matching (the
  paper's appendix B.5 table); GPU only.
- train_step_compiled/vitb16_B64: the same step with train.compile=true (the encoders and
  the decoder through torch.compile) against the eager step, both --kernels triton; GPU only.
- train_step/tiny_cpu: images per second of the tiny preset's step on the CPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from stellar.train.profile import component_times, make_train_step, median_ms

BASE_BATCH = 64
TINY_BATCH = 32


def _step_or_skip(preset: str, batch: int, device, kernels: str | None):
    step = make_train_step(preset, batch, device, kernels)
    try:
        step()
    except NotImplementedError as err:
        pytest.skip(f"--kernels {kernels}: {err}")
    return step


@pytest.mark.benchmark(group="train_step_tiny_cpu")
def test_train_step_tiny_cpu(benchmark):
    step = make_train_step("tiny", TINY_BATCH, "cpu")
    benchmark.pedantic(step, rounds=3, warmup_rounds=1, iterations=1)


@pytest.mark.gpu
@pytest.mark.benchmark(group="train_step_vitb16_B64")
def test_train_step_vitb16_B64_triton(run):
    run(_step_or_skip("base", BASE_BATCH, "cuda", "triton"), rounds=5)


@pytest.mark.gpu
@pytest.mark.benchmark(group="train_step_vitb16_B64")
def test_train_step_vitb16_B64_torch(run):
    run(_step_or_skip("base", BASE_BATCH, "cuda", "torch"), rounds=5)


def compiled_step_figure(
    batch: int, device: torch.device, kernels: str, eager_ms: float, quick: bool
) -> dict:
    from benchmarks.common import vs_baseline

    step = make_train_step("base", batch, device, kernels, overrides=["train.compile=true"])
    t0 = time.perf_counter()
    for _ in range(3):  # the global views, the masked views and the local crops compile
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    ms = median_ms(step, device, warmup=2, rep=3 if quick else 8)
    step = None
    torch.cuda.empty_cache()
    return vs_baseline(
        f"train_step_compiled/vitb16_B{batch}",
        ms,
        "eager_step",
        eager_ms,
        kernels=kernels,
        first_steps_s=round(compile_s, 1),
    )


def figures(device: torch.device, quick: bool = False) -> list[dict]:
    """train_step/vitb16_B64 and train_step_compiled/vitb16_B64 on a GPU (batch 8 under
    --quick, named by the size measured)."""
    from benchmarks.common import reported, vs_baseline

    out: list[dict] = []
    if device.type != "cuda":
        return out
    batch = 8 if quick else BASE_BATCH
    times = {}
    for kernels in ("torch", "triton"):
        try:
            step = make_train_step("base", batch, device, kernels)
            times[kernels] = median_ms(step, device, warmup=2, rep=3 if quick else 8)
        except NotImplementedError as err:
            print(f"train_step/vitb16_B{batch}: --kernels {kernels} skipped ({err})")
        step = None  # free the model before the next one
        torch.cuda.empty_cache()
    if len(times) == 2:
        out.append(
            vs_baseline(
                f"train_step/vitb16_B{batch}", times["triton"], "torch_kernels", times["torch"]
            )
        )
    if not times:
        return out
    kernels = "triton" if "triton" in times else "torch"
    try:
        out.append(compiled_step_figure(batch, device, kernels, times[kernels], quick))
    except Exception as err:  # a compiler failure must not lose the other figures
        out.append(
            reported(
                f"train_step_compiled/vitb16_B{batch}",
                failed=f"{type(err).__name__}: {err}"[:500],
            )
        )
        torch.cuda.empty_cache()
    return out


def extra_figures(device: torch.device, quick: bool = False) -> list[dict]:
    """train_step/components_vitb16_B64 on a GPU (batch 8 under --quick) and
    train_step/tiny_cpu."""
    from benchmarks.common import reported

    out = []
    if device.type == "cuda":
        batch = 8 if quick else BASE_BATCH
        rep = 3 if quick else 10
        try:
            kernels = "triton"
            parts = component_times("base", batch, device, kernels=kernels, rep=rep)
        except NotImplementedError as err:
            print(f"train_step/components_vitb16_B{batch}: --kernels triton skipped ({err})")
            kernels = "torch"
            parts = component_times("base", batch, device, kernels=kernels, rep=rep)
        out.append(
            reported(
                f"train_step/components_vitb16_B{batch}",
                kernels=kernels,
                **{f"{k}_ms": round(v, 4) for k, v in parts.items()},
            )
        )
    batch = 8 if quick else TINY_BATCH
    step = make_train_step("tiny", batch, "cpu")
    ms = median_ms(step, torch.device("cpu"), warmup=1, rep=3 if quick else 5)
    out.append(
        reported(
            "train_step/tiny_cpu",
            ms,
            batch=batch,
            threads=torch.get_num_threads(),
            images_per_s=round(batch / (ms / 1e3), 2),
        )
    )
    return out
