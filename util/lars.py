"""LARS as MAE's linear probe uses it (You et al., 2017, in the form of MAE's util/lars.py), which the reference's
main_linprobe_chestxray.py takes over.

For every parameter of 2 or more dimensions (weights), the step direction is the gradient plus weight decay, scaled by
the trust ratio trust_coefficient * ||w|| / ||direction|| (1 when either norm is 0), also at weight decay 0.
Parameters of 0 or 1 dimension (biases, norm scales) take the plain gradient: no decay, no trust ratio. Then heavy-ball
momentum, mu = momentum * mu + direction, and w -= lr * mu.

timm's Lars differs in two ways that matter for the probe: it skips the trust ratio when weight decay is 0 (MAE's
default for the probe), which turns the head's update into SGD with momentum at lr 1.6 for batch 512 x 8; and it
applies a trust ratio to biases too.
"""
import torch


class Lars(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                direction = param.grad
                if param.ndim > 1:
                    direction = direction.add(param, alpha=group["weight_decay"])
                    weight_norm, direction_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(direction)
                    ratio = group["trust_coefficient"] * weight_norm / direction_norm
                    # 1 where either norm is 0 (torch.where keeps this on the device: no host sync)
                    ratio = torch.where((weight_norm > 0) & (direction_norm > 0), ratio, torch.ones_like(ratio))
                    direction = direction * ratio
                state = self.state[param]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(param)
                state["mu"].mul_(group["momentum"]).add_(direction)
                param.add_(state["mu"], alpha=-group["lr"])
        return loss
