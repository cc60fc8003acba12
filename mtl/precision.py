"""The precision an unset ``trainer.precision`` resolves to: bf16 autocast where the hardware computes bf16 natively.

On such hardware bf16 autocast trained the quickstart faster with the same accuracy (``benchmarks/RESULTS.md``);
elsewhere bf16 is emulated, which is slower than fp32, so fp32 stays.
Parameters stay float32 under ``bf16-mixed`` (only the matmuls run in bf16), so exports are float32.
The attention kernel follows the precision and the row length (`attention_kernel`): under bf16 on the CPU the plain
kernel trains faster on rows of up to 160 tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mtl.errors import MTLConfigError

# CPU features that execute bf16 dot products in hardware (AMX first: the faster one where both exist)
CPU_BF16_FEATURES = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags, as torch's cpuinfo reports them (``cpuinfo``'s flags where torch cannot say)."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        return {name for name, value in capabilities().items() if value is True}
    if not cpuinfo.is_file():
        return set()
    return {flag for line in cpuinfo.read_text().splitlines() if line.startswith("flags") for flag in line.split()}


def cuda_bf16_device() -> str | None:
    """'<name>, compute capability X.Y' of the current CUDA device if it computes bf16 natively (>= 8.0), else None."""
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    # is_bf16_supported() alone also says yes where bf16 is only emulated (slower than fp32)
    if major < 8 or not torch.cuda.is_bf16_supported(including_emulation=False):
        return None
    return f"{torch.cuda.get_device_name()}, compute capability {major}.{minor}"


def accelerator_kind(accelerator: Any) -> str:
    """``cuda``, ``cpu`` or ``other`` for a ``trainer.accelerator`` value (a name, ``auto`` or an Accelerator)."""
    if accelerator is not None and not isinstance(accelerator, str):  # an Accelerator instance from a class_path
        accelerator = type(accelerator).__name__.removesuffix("Accelerator")
    name = (accelerator or "auto").lower()
    if name == "auto":  # Lightning's own order: a CUDA GPU when there is one, else MPS, else the CPU
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "other" if mps is not None and mps.is_available() else "cpu"
    if name in ("gpu", "cuda") or name.startswith("cuda"):
        return "cuda" if torch.cuda.is_available() else "other"
    return "cpu" if name.startswith("cpu") else "other"


def auto_precision(accelerator: Any = "auto") -> tuple[str, str]:
    """(precision, reason) for an unset ``trainer.precision``: ``bf16-mixed`` where ``accelerator`` computes bf16
    natively (CPU with AMX-BF16 or AVX512-BF16, CUDA compute capability >= 8.0), ``32-true`` elsewhere."""
    kind = accelerator_kind(accelerator)
    if kind == "cuda":
        device = cuda_bf16_device()
        if device:
            return "bf16-mixed", f"GPU {device}"
        return "32-true", "GPU without native bf16 (compute capability < 8.0)"
    if kind == "cpu":
        features = cpu_features()
        native = next((label for flag, label in CPU_BF16_FEATURES if flag in features), None)
        if native:
            return "bf16-mixed", f"CPU has {native}"
        return "32-true", "CPU without AVX512-BF16 or AMX-BF16"
    return "32-true", f"no bf16 rule for accelerator {accelerator}"


def resolve_precision(trainer_config: dict[str, Any]) -> tuple[str | int, str]:
    """(precision, the line to print) for a trainer configuration: the user's ``precision`` when set, else
    `auto_precision` for its accelerator."""
    chosen = trainer_config.get("precision")
    if chosen is not None:
        return chosen, f"precision: {chosen} (trainer.precision)"
    precision, reason = auto_precision(trainer_config.get("accelerator", "auto"))
    return precision, f"precision: {precision} ({reason}; set trainer.precision to choose)"


# model.attention values; "auto" follows `attention_kernel`
ATTENTION_CHOICES = ("auto", "sdpa", "eager")


def check_attention(value: str, backbone: Any = None) -> None:
    """Refuse a ``model.attention`` that is not a choice, or ``sdpa`` for a backbone whose family has no SDPA kernel."""
    if value not in ATTENTION_CHOICES:
        raise MTLConfigError(f"model.attention: got {value!r}, expected one of {', '.join(ATTENTION_CHOICES)}")
    if value == "sdpa" and backbone is not None and not getattr(backbone, "_supports_sdpa", False):
        raise MTLConfigError(f"model.attention: sdpa, but the {backbone.config.model_type} backbone has no SDPA "
                             "kernel in transformers; expected auto or eager")


# the longest rows (tokens) for which the plain kernel beats SDPA under bf16 on the CPU: a MiniLM train step is 1.28x
# faster with it at 160 tokens, 1.14x slower at 192 and 1.6x slower at 384 (benchmarks/attention.py --lengths)
EAGER_MAX_TOKENS = 160


def attention_kernel(requested: str, precision: str | int, device_type: str, loaded: str,
                     longest: int | None = None) -> str:
    """The attention implementation the backbone should run: ``requested`` unless ``auto``; ``auto`` picks eager
    (matmul, softmax, matmul) under bf16 on the CPU for a backbone ``loaded`` with SDPA whose rows are at most
    `EAGER_MAX_TOKENS` long (``longest``: the longest row the stage's data may hold, None when unknown), and
    ``loaded`` elsewhere (so a stage in another precision, or with longer rows, returns to it)."""
    if requested != "auto":
        return requested
    # on the CPU, SDPA's bf16 backward is slower than autograd through the plain ops on short rows (1.34x per MiniLM
    # train step at 128 tokens, 1.1x at base size; fp32 and inference even) and faster on long ones, whose
    # [tokens x tokens] scores the plain kernel materialises: benchmarks/attention.py; CUDA keeps its fused kernels
    if device_type == "cpu" and str(precision).startswith("bf16") and loaded == "sdpa" and \
            (longest is None or longest <= EAGER_MAX_TOKENS):
        return "eager"
    return loaded
