"""An independent, functional transcription of the reference MAE forward pass (facebookresearch/mae
models_mae.py, as used by medical_mae), computed from a state dict with explicit attention.

Used only to check that our module gives the reference's loss and prediction for the same weights,
input and RNG state. It deliberately shares no code with models_mae.py.
"""
import torch
import torch.nn.functional as F


def _block(x, sd, prefix, num_heads):
    n, length, dim = x.shape
    h = F.layer_norm(x, (dim,), sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"], eps=1e-6)
    qkv = F.linear(h, sd[prefix + "attn.qkv.weight"], sd[prefix + "attn.qkv.bias"])
    qkv = qkv.reshape(n, length, 3, num_heads, dim // num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * (dim // num_heads) ** -0.5).softmax(dim=-1)
    h = (attn @ v).transpose(1, 2).reshape(n, length, dim)
    x = x + F.linear(h, sd[prefix + "attn.proj.weight"], sd[prefix + "attn.proj.bias"])
    h = F.layer_norm(x, (dim,), sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[prefix + "mlp.fc1.weight"], sd[prefix + "mlp.fc1.bias"])),
                 sd[prefix + "mlp.fc2.weight"], sd[prefix + "mlp.fc2.bias"])
    return x + h


def reference_forward(sd, imgs, mask_ratio, patch_size, depth, num_heads, dec_depth, dec_heads, norm_pix_loss):
    p = patch_size
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    x = x + sd["pos_embed"][:, 1:, :]
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, dim=1, index=ids_shuffle[:, :len_keep].unsqueeze(-1).repeat(1, 1, dim))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    cls = sd["cls_token"] + sd["pos_embed"][:, :1, :]
    x = torch.cat((cls.expand(n, -1, -1), x), dim=1)
    for i in range(depth):
        x = _block(x, sd, f"blocks.{i}.", num_heads)
    x = F.layer_norm(x, (dim,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    x = F.linear(x, sd["decoder_embed.weight"], sd["decoder_embed.bias"])
    mask_tokens = sd["mask_token"].repeat(n, ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + sd["decoder_pos_embed"]
    for i in range(dec_depth):
        x = _block(x, sd, f"decoder_blocks.{i}.", dec_heads)
    x = F.layer_norm(x, (x.shape[-1],), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    pred = F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:, :]
    # patchify as the reference: nchpwq -> nhwpqc
    c, h = imgs.shape[1], imgs.shape[2] // p
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, h, p, h, p)).reshape(n, h * h, p * p * c)
    if norm_pix_loss:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum(), pred, mask


def reference_cnn_forward(net, imgs, mask_ratio, patch_size):
    """medical_mae's CNN forward: zero the removed patches, reconstruct, MSE over all pixels. Like the reference it
    returns the reconstructed image itself as pred, [N, C, H, W]."""
    p = patch_size
    n, c, h, _ = imgs.shape
    g = h // p
    x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, g, p, g, p)).reshape(n, g * g, p * p * c)
    length = x.shape[1]
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    x = x * (1 - mask.unsqueeze(-1))
    x = torch.einsum("nhwpqc->nchpwq", x.reshape(n, g, g, p, p, c)).reshape(n, c, h, h)
    pred = net(x)
    patches = torch.einsum("nchpwq->nhwpqc", pred.reshape(n, c, g, p, g, p)).reshape(n, g * g, p * p * c)
    target = torch.einsum("nchpwq->nhwpqc", imgs.reshape(n, c, g, p, g, p)).reshape(n, g * g, p * p * c)
    return ((patches - target) ** 2).mean(dim=-1).mean(), pred, mask


def reference_param_groups(model, weight_decay):
    """timm 0.3.2's optim_factory.add_weight_decay, as the reference's pre-training script calls it: no decay for
    1-D tensors and names ending in '.bias'; frozen tensors left out; the no-decay group first."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if len(param.shape) == 1 or name.endswith(".bias"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def reference_lars_steps(weights: list, grads_per_step: list, lrs: list, weight_decay: float,
                         momentum: float = 0.9, trust: float = 0.001) -> list:
    """MAE's LARS rule, element by element in float64 Python: for a tensor of 2+ dimensions the direction is
    grad + wd * w, times trust * |w| / |direction| when both norms are positive; 0/1-D tensors take the bare gradient;
    then mu = momentum * mu + direction and w = w - lr * mu. Returns the weights after each step."""
    ws = [w.double().clone() for w in weights]
    mus = [torch.zeros_like(w) for w in ws]
    after = []
    for grads, lr in zip(grads_per_step, lrs):
        for w, g, mu in zip(ws, grads, mus):
            d = g.double().clone()
            if w.ndim > 1:
                d = d + weight_decay * w
                wn, dn = float(w.pow(2).sum().sqrt()), float(d.pow(2).sum().sqrt())
                d = d * (trust * wn / dn if wn > 0 and dn > 0 else 1.0)
            mu.mul_(momentum).add_(d)
            w.sub_(lr * mu)
        after.append([w.clone() for w in ws])
    return after
