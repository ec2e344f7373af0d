"""State-dict helpers shared by both models' converters."""
import torch

_KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.")


def adapt_in_chans(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """First-layer kernel [D, C, k, k] to another channel count: 3->1 sums, 1->3 spreads evenly."""
    if weight.shape[1] == in_chans:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if weight.shape[1] == 1:
        return weight.repeat(1, in_chans, 1, 1) / in_chans
    raise ValueError(f"cannot adapt a {weight.shape[1]}-channel first layer to {in_chans} channels")


def strip_prefixes(state: dict, keep_model_prefix: bool = False) -> dict:
    """Unwrap {'model': ...} / {'state_dict': ...} and drop DDP, torch.compile and wrapper prefixes.

    keep_model_prefix keeps 'model.' (the U-Net wraps its SMP network as `self.model`).
    """
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
    prefixes = tuple(p for p in _KNOWN_PREFIXES if not (keep_model_prefix and p == "model."))
    out = {}
    for key, value in state.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        out[key] = value
    return out
