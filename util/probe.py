"""--probe_freq: a quick linear probe on frozen features, scored by the mean AUROC over findings."""
import numpy as np
import torch

from util.metrics import auroc


def linear_probe_auroc(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       steps: int = 200, weight_decay: float = 1e-3) -> tuple[float | None, int]:
    """Multi-label logistic regression on standardised features; (mean test AUROC, findings scored)."""
    train_x, test_x = train_x.detach().float(), test_x.detach().float()  # frozen features
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], train_y.shape[1], requires_grad=True)
    bias = torch.zeros(train_y.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        logits = train_x @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, train_y)
        loss = loss + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        scores = (test_x @ weight + bias).numpy()
    values = [a for k in range(test_y.shape[1]) if (a := auroc(scores[:, k], test_y[:, k].numpy())) is not None]
    return (float(np.mean(values)) if values else None), len(values)
