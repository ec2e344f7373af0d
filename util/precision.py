"""--precision: pick the autocast dtype and a loss scaler that is on only for fp16."""
import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 on CUDA with native bf16 (compute capability >= 8), fp16 on older CUDA, fp32 elsewhere."""
    if requested != "auto":
        if requested in _DTYPES and device.type == "cpu":
            logger.warning("--precision %s on CPU: CPUs without %s units run this far slower than fp32",
                           requested, requested)
        return requested
    if device.type == "cuda":
        return "bf16" if has_native_bf16(torch.cuda.get_device_capability(device)) else "fp16"
    return "fp32"


def has_native_bf16(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores arrived with compute capability 8 (A100). torch.cuda.is_bf16_supported() also says yes on
    V100/T4, where bf16 is emulated and slow, so `auto` picks fp16 there."""
    return capability[0] >= 8


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """CUDA runs: cuDNN autotunes its convolutions (every batch has one shape; the U-Net gains most), and TF32 stays
    off, so --precision fp32 means fp32 (bf16/fp16 autocast is the fast path).

    --deterministic (any device): PyTorch's deterministic algorithms, raising on an op that has none; on CUDA cuDNN
    without autotuning, cuBLAS with a fixed workspace, and the math attention kernel (the fused kernels' backward
    passes accumulate in a varying order). Slower; for exact reruns and resume checks."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, before any matmul
        torch.use_deterministic_algorithms(True)
    if device.type != "cuda":
        return
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if deterministic:
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


class LossScaler:
    """Backward, unscale + norm (+ clip), then step or skip: MAE's NativeScaler, split so the loop can skip.

    The GradScaler only exists for fp16; bf16 and fp32 need no loss scaling.
    """

    def __init__(self, precision: str, device: torch.device):
        enabled = precision == "fp16"
        self._scaler = torch.amp.GradScaler(device.type, enabled=enabled) if enabled else None

    @property
    def enabled(self) -> bool:
        return self._scaler is not None

    def backward(self, loss: torch.Tensor) -> None:
        (self._scaler.scale(loss) if self._scaler else loss).backward()

    def step_prepare(self, optimizer, parameters, clip_grad: float | None) -> torch.Tensor:
        """Unscale (fp16) and measure the gradient norm, clipping it if asked. Returns the norm before clipping."""
        if self._scaler:
            self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad:
            return torch.nn.utils.clip_grad_norm_(params, clip_grad)
        return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)

    def step_apply(self, optimizer) -> None:
        if self._scaler:
            self._scaler.step(optimizer)  # skips by itself if fp16 gradients overflowed
            self._scaler.update()
        else:
            optimizer.step()

    def step_skip(self, optimizer) -> None:
        """Leave the weights alone; fp16 still lowers its scale after an overflow."""
        if self._scaler:
            self._scaler.update()

    def scale(self) -> float:
        """The fp16 loss scale (1.0 without a scaler), logged as loss_scale."""
        return self._scaler.get_scale() if self._scaler else 1.0

    def state_dict(self) -> dict:
        return self._scaler.state_dict() if self._scaler else {}

    def load_state_dict(self, state: dict) -> None:
        if self._scaler and state:
            self._scaler.load_state_dict(state)
