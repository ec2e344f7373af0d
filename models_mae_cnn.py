"""Masked image reconstruction with a segmentation-models-pytorch network (the reference's CNN path).

The image is cut into patches, a random subset (same noise-argsort rule as the ViT) is set to zero
in normalised space, and the network reconstructs the whole image. The reference loss is the MSE
over all pixels; loss_region='masked' restricts it to the removed patches.
"""
import segmentation_models_pytorch as smp
import torch
import torch.nn as nn

from util.masking import (
    binary_mask,
    check_mask_ratio,
    normalize_patch_targets,
    patchify,
    random_masking_ids,
    unpatchify,
)
from util.model_api import EncoderExport
from util.state_dict import adapt_in_chans, load_matching, strip_prefixes

ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "Linknet", "PSPNet", "DeepLabV3Plus", "MAnet", "PAN", "UPerNet",
                 "Segformer")
LOSS_REGIONS = ("all", "masked")
# architectures whose CUDA backward has no deterministic kernel (bilinear upsampling, adaptive pooling): with
# --deterministic, torch raises at the first backward on CUDA
NONDETERMINISTIC_ON_CUDA = ("FPN", "PSPNet", "DeepLabV3Plus", "PAN", "UPerNet", "Segformer")


def encoder_names() -> list[str]:
    return list(smp.encoders.get_encoder_names())


def check_cnn_config(encoder_name: str, model_arch: str, img_size: int, patch_size: int) -> None:
    """Every constraint the U-Net path has, checked before a model is built."""
    if encoder_name not in smp.encoders.encoders:
        import difflib

        close = difflib.get_close_matches(encoder_name, encoder_names(), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"--model '{encoder_name}' is not an SMP encoder.{hint} Use --model list to print every name.")
    if model_arch not in ARCHITECTURES:
        raise ValueError(f"--model_arch must be one of {list(ARCHITECTURES)}, got '{model_arch}'")
    stride = 32  # five 2x downsamplings in every SMP encoder at its default depth
    if img_size % stride:
        nearest = max(stride, img_size // stride * stride)
        raise ValueError(f"--input_size {img_size} is not divisible by {stride}, the output stride of "
                         f"'{encoder_name}'; use a multiple of {stride} such as {nearest}")
    if img_size % patch_size:
        raise ValueError(f"--input_size {img_size} must be divisible by --patch_size {patch_size}")


class MaskedAutoencoderCNN(nn.Module):
    def __init__(self, img_size=224, patch_size=16, model_arch="Unet", encoder_name="densenet121", in_chans=3,
                 norm_pix_loss=False, mask_ratio=0.75, loss_region="all", channels_last=True):
        super().__init__()
        check_cnn_config(encoder_name, model_arch, img_size, patch_size)
        check_mask_ratio(mask_ratio)
        if loss_region not in LOSS_REGIONS:
            raise ValueError(f"--cnn_loss must be one of {list(LOSS_REGIONS)}, got '{loss_region}'")
        self.img_size = img_size
        self.encoder_name = encoder_name
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.mask_ratio = mask_ratio
        self.loss_region = loss_region
        self.model = getattr(smp, model_arch)(encoder_name=encoder_name, encoder_weights=None,
                                              in_channels=in_chans, classes=in_chans)
        # oneDNN and cuDNN run NHWC convolutions faster; channels_last=False is the reference's NCHW model as built
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def patchify(self, imgs):
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x):
        return unpatchify(x, self.patch_size, self.in_chans)

    def random_masking(self, x, mask_ratio):
        """x: [N, L, D] patches -> the same with removed patches zeroed, and mask [N, L] (1 is removed)."""
        n, num_patches, _ = x.shape
        _, ids_restore, len_keep = random_masking_ids(n, num_patches, mask_ratio, x.device)
        mask = binary_mask(ids_restore, len_keep)
        return x * (1 - mask.unsqueeze(-1)).to(x.dtype), mask

    def forward_loss(self, imgs, pred, mask):
        """imgs and pred [N, C, H, W], mask [N, L]: the MSE per patch, averaged over all patches (reference) or the
        removed ones."""
        target = self.patchify(imgs).float()
        if self.norm_pix_loss:
            target = normalize_patch_targets(target)
        loss = ((self.patchify(pred).float() - target) ** 2).mean(dim=-1)  # [N, L]
        if self.loss_region == "masked":
            return (loss * mask).sum() / mask.sum()
        return loss.mean()

    def forward(self, imgs, mask_ratio=None):
        """(loss, pred, mask) as the reference returns them: pred is the reconstructed image [N, C, H, W] (the ViT's
        is patchified, [N, L, p*p*C]); mask [N, L] is 1 on removed patches."""
        mask_ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio)
        x_masked, mask = self.random_masking(self.patchify(imgs), mask_ratio)
        x_masked = self.unpatchify(x_masked).contiguous(memory_format=self.memory_format)
        pred = self.model(x_masked)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def probe_features(self, x):
        """[N, C]: the deepest encoder stage, average-pooled, for the linear probe."""
        return self.model.encoder(x)[-1].mean(dim=(2, 3))

    def encoder_state_dict(self) -> dict:
        return self.model.encoder.state_dict()

    def export_encoder(self, input_size: int | None = None, in_chans: int | None = None) -> EncoderExport:
        if input_size or in_chans:
            raise ValueError("--input_size/--in_chans apply to ViT exports; a CNN encoder takes any size divisible "
                             "by 32 and keeps its input channels")
        return export_to_torchvision(self)

    def load_pretrained(self, checkpoint: dict) -> dict:
        return load_pretrained(self, checkpoint)


def create_model(encoder_name: str, **kwargs) -> MaskedAutoencoderCNN:
    return MaskedAutoencoderCNN(encoder_name=encoder_name, **kwargs)


# ---- conversions: export to torchvision, and --init_from -------------------------------------------------------

# SMP encoders built on torchvision's own modules, so their keys map 1:1, and how each exports: 'features' loads
# strictly into torchvision.models.<name>().features, 'without_fc' into torchvision.models.<name>() less its fc.
TORCHVISION_EXPORTS = {
    **{name: "features" for name in ("densenet121", "densenet161", "densenet169", "densenet201")},
    **{name: "without_fc" for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                       "resnext50_32x4d", "resnext101_32x8d")},
}


def to_torchvision_state_dict(encoder_state: dict, encoder_name: str) -> tuple[str, dict]:
    """SMP encoder weights -> (torchvision target, state dict), by TORCHVISION_EXPORTS."""
    kind = TORCHVISION_EXPORTS.get(encoder_name)
    if kind == "features":
        return f"torchvision.models.{encoder_name}().features", {
            k.removeprefix("features."): v for k, v in encoder_state.items()}
    if kind == "without_fc":
        return f"torchvision.models.{encoder_name}() (without fc)", dict(encoder_state)
    raise ValueError(f"no torchvision equivalent for encoder '{encoder_name}' (known: {sorted(TORCHVISION_EXPORTS)}); "
                     "export the SMP encoder state dict instead")


def export_to_torchvision(model: MaskedAutoencoderCNN) -> EncoderExport:
    """The encoder loaded strictly into the torchvision backbone of the same name (DenseNet `.features`; ResNet
    without `fc`), its first convolution rebuilt for in_chans != 3."""
    import torchvision

    name = model.encoder_name
    target_name, state = to_torchvision_state_dict(model.encoder_state_dict(), name)
    net = getattr(torchvision.models, name)()
    densenet = TORCHVISION_EXPORTS[name] == "features"
    if model.in_chans != 3:
        holder, attr = (net.features, "conv0") if densenet else (net, "conv1")
        old = getattr(holder, attr)
        setattr(holder, attr, torch.nn.Conv2d(model.in_chans, old.out_channels, old.kernel_size, old.stride,
                                              old.padding, bias=old.bias is not None))
    if densenet:
        backbone = net.features
        backbone.load_state_dict(state, strict=True)
    else:
        missing, unexpected = net.load_state_dict(state, strict=False)
        if sorted(missing) != ["fc.bias", "fc.weight"] or unexpected:
            raise RuntimeError(f"unexpected keys loading into torchvision: missing {missing}, unexpected {unexpected}")
        backbone = torch.nn.Sequential(*list(net.children())[:-2])
    encoder = model.model.encoder

    def reference(x):
        return encoder.eval().features(x) if densenet else encoder.eval()(x)[-1]

    return EncoderExport(state, {"format": "torchvision", "torchvision_target": target_name}, model.img_size,
                         model.in_chans, backbone.eval(), reference)


def load_pretrained(model: MaskedAutoencoderCNN, checkpoint: dict) -> dict:
    """--init_from for the CNN: a full checkpoint of this model, an SMP encoder, or a torchvision backbone."""
    candidates = ("", "model.", "model.encoder.", "model.encoder.features.")

    def resolve(key, target):
        return next((p + key for p in candidates if p + key in target), None)

    def adapt(key, value, wanted):
        if value.ndim == 4 and value.shape[1] != wanted.shape[1] and value.shape[1] in (1, 3):
            return adapt_in_chans(value, wanted.shape[1]), f"channels {value.shape[1]} -> {wanted.shape[1]}"
        return value, None

    return load_matching(model, strip_prefixes(checkpoint, keep_model_prefix=True), resolve, adapt)
