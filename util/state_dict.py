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


def load_matching(model: torch.nn.Module, source: dict, resolve_key, adapt, regenerated=(),
                  flag: str = "--init_from") -> dict:
    """The --init_from loop shared by both models.

    resolve_key(key, target) names the model key a source key fills (None: ignored). adapt(key, value, wanted)
    returns (value, note): a reshaped value with a note for the report, or (None, note) for a tensor the model
    regenerates itself. Any other shape mismatch is an error. `regenerated` keys never count as missing.
    Returns {'loaded', 'adapted', 'missing', 'ignored'} lists of keys.
    """
    target = model.state_dict()
    report = {"loaded": [], "adapted": [], "missing": [], "ignored": []}
    new_state, mismatched = {}, []
    for key, value in source.items():
        match = resolve_key(key, target)
        if match is None:
            report["ignored"].append(key)
            continue
        value, note = adapt(match, value, target[match])
        if note:
            report["adapted"].append(f"{match} ({note})")
        if value is None:
            continue
        if value.shape != target[match].shape:
            mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[match].shape)}")
            continue
        new_state[match] = value
        report["loaded"].append(match)
    if mismatched:
        raise ValueError(f"{flag}: shapes differ for\n  " + "\n  ".join(mismatched[:20]))
    report["missing"] = [k for k in target if k not in new_state and k not in regenerated]
    model.load_state_dict(new_state, strict=False)
    return report


def require_complete(report: dict, new_prefixes: tuple[str, ...], flag: str, what: str) -> dict:
    """Strict loading for fine-tuning: every model tensor but the new ones (the head) must come from the checkpoint,
    so a wrong architecture or an unrelated file fails at once instead of training from scratch. `what` names the
    tensors in the message, e.g. 'encoder tensor(s) of this model'."""
    missing = [k for k in report["missing"] if not k.startswith(new_prefixes)]
    if missing:
        raise ValueError(f"{flag}: the checkpoint lacks {len(missing)} {what}, e.g. {', '.join(missing[:6])}. Is it a "
                         "checkpoint of the same architecture (--model)?")
    return report
