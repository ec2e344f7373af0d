"""AdamW as the reference builds it (timm's add_weight_decay groups, betas 0.9/0.95), and loading its state."""
import torch

TOKEN_PARAMETERS = ("cls_token", "mask_token")
FUSED_ADAMW_DEVICES = ("cuda", "cpu")  # one kernel per step instead of ~8 passes over the weights


def param_groups(model: torch.nn.Module, weight_decay: float, decay_tokens: bool = True) -> list[dict]:
    """[no decay, decay] in the reference's order (timm's add_weight_decay, as MAE calls it): no decay for 1-D
    tensors and names ending in '.bias'. The reference decays the 3-D cls and mask tokens; decay_tokens=False
    exempts them too. Frozen tensors (the sin-cos tables) are left out."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt_token = not decay_tokens and name.split(".")[-1] in TOKEN_PARAMETERS
        if param.ndim <= 1 or name.endswith(".bias") or exempt_token:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, device: torch.device,
                    decay_tokens: bool = True) -> torch.optim.AdamW:
    kwargs = {"fused": True} if device.type in FUSED_ADAMW_DEVICES else {"foreach": True}
    return torch.optim.AdamW(param_groups(model, weight_decay, decay_tokens), lr=lr, betas=(0.9, 0.95), **kwargs)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict, model: torch.nn.Module, weight_decay: float,
                         decay_tokens: bool, source: str) -> None:
    """optimizer.load_state_dict, naming the flag when the state was written under the other weight-decay grouping."""
    try:
        optimizer.load_state_dict(saved)
    except ValueError as e:
        saved_sizes = [len(g["params"]) for g in saved.get("param_groups", [])]
        other = not decay_tokens
        if [len(g["params"]) for g in param_groups(model, weight_decay, other)] == saved_sizes:
            flag = "--decay_tokens" if other else "--no_decay_tokens"
            raise ValueError(f"{source}: its optimizer state was written with {flag} (weight decay "
                             f"{'on' if other else 'off'} for cls_token/mask_token); rerun with {flag} "
                             "to resume it") from e
        raise ValueError(f"{source}: the optimizer state does not fit this model's parameter groups "
                         f"({saved_sizes} saved): {e}") from e
