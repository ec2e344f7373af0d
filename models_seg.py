"""Segmentation networks for main_segment_chestxray.py, and how each is filled from a pre-trained checkpoint.

unet_<encoder> (any SMP encoder name, e.g. unet_densenet121): segmentation-models-pytorch's U-Net, the network the
U-Net masked reconstruction (main_pretrain_multi_datasets_xray_cnn.py) pre-trains. From a pre-training checkpoint of
that script it loads the whole network, encoder and decoder; only the final layer (segmentation_head) starts fresh,
since it maps to the mask classes instead of the reconstructed channels. decoder_init="random" loads the encoder
alone, so what the pre-trained decoder adds can be measured. An encoder-only file (the reference's
densenet121_CXR_0.3M_mae.pth, a tools/export_encoder.py output, torchvision ImageNet weights saved locally) fills the
encoder, with decoder_init="random".

dpt_vit_<size>_patch16: smp's DPT over a timm ViT whose weights come from an MAE checkpoint (ours, the reference's,
or an export). DPT was designed for plain ViTs: it reads the tokens of four blocks, folds the class token in
(readout), and reassembles them into a feature pyramid, which is what a ViT lacks. UPerNet, the head BenchX and EVA-X
use, expects a hierarchical encoder; smp's UPerNet does not take ViT encoders, and DPT ships with smp's timm-ViT
encoder. The ViT's blocks are the checkpoint's, every one of them loaded; the decoder starts fresh. The ViT's final
norm and classifier, which DPT does not use, are removed (the checkpoint's final norm is reported as ignored).

load_pretrained returns {'loaded', 'adapted', 'new', 'ignored'} key lists, in the segmentation model's names.
"""
import segmentation_models_pytorch as smp
import torch
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay

import models_mae_cnn
import models_vit
from util.registry import Registry
from util.state_dict import adapt_in_chans, load_matching, strip_prefixes

DPT_MODELS = Registry("ViT segmentation model")
DECODER_INITS = ("pretrained", "random")
UNET_PREFIX = "unet_"
STRIDE = 32  # U-Net: five 2x downsamplings; DPT: its reassembly needs a patch grid divisible by 2


@register_model
def medmae_vit_debug_patch16(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """models_vit.vit_debug_patch16's encoder in timm's registry, so smp's "tu-" encoders can build it (tests).
    timm.create_model passes its registry's bookkeeping (pretrained_cfg, cache_dir), which a bare ViT does not take;
    smp reads the model's pretrained_cfg (there are no pretrained weights: an empty one)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    model = VisionTransformer(patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2, **kwargs)
    model.pretrained_cfg = {}
    return model


def _register_dpt(name: str, timm_name: str, **decoder):
    @DPT_MODELS.register(name=name, timm_name=timm_name, decoder=decoder)
    def factory(**kwargs):
        return smp.DPT(encoder_name=f"tu-{timm_name}", encoder_weights=None, **decoder, **kwargs)

    return factory


_register_dpt("dpt_vit_small_patch16", "vit_small_patch16_224")  # MAE's ViT-S: 384 wide, 12 blocks, 6 heads
_register_dpt("dpt_vit_base_patch16", "vit_base_patch16_224")
_register_dpt("dpt_vit_large_patch16", "vit_large_patch16_224")
_register_dpt("dpt_vit_debug_patch16", "medmae_vit_debug_patch16", encoder_depth=2,
              decoder_intermediate_channels=(32, 64), decoder_fusion_channels=32)


def model_names() -> list[str]:
    return [f"{UNET_PREFIX}{name}" for name in models_mae_cnn.encoder_names()] + DPT_MODELS.names()


def is_unet(name: str) -> bool:
    return name.startswith(UNET_PREFIX)


def check_model(name: str, input_size: int) -> list[str]:
    """Problems with --model and --input_size, before anything is built."""
    problems = []
    if is_unet(name):
        if name[len(UNET_PREFIX):] not in models_mae_cnn.encoder_names():
            problems.append(f"--model {name}: {name[len(UNET_PREFIX):]!r} is not an SMP encoder (--model list prints "
                            "every name)")
    elif name not in DPT_MODELS:
        try:
            DPT_MODELS.get(name)
        except ValueError as e:
            problems.append(f"--model: {e} (or unet_<SMP encoder>, e.g. unet_densenet121)")
    if input_size % STRIDE:
        problems.append(f"--input_size {input_size}: segmentation models need a multiple of {STRIDE}, e.g. "
                        f"{max(STRIDE, input_size // STRIDE * STRIDE)}")
    return problems


def create_model(name: str, img_size: int, in_chans: int = 3, classes: int = 1,
                 drop_path: float = 0.0) -> torch.nn.Module:
    """images [N, in_chans, s, s] -> mask logits [N, classes, s, s]."""
    if is_unet(name):
        model = smp.Unet(encoder_name=name[len(UNET_PREFIX):], encoder_weights=None, in_channels=in_chans,
                         classes=classes)
    else:
        model = DPT_MODELS.get(name)(in_channels=in_chans, classes=classes, img_size=img_size,
                                     drop_path_rate=drop_path)
        # DPT reads the blocks' tokens: the ViT's final norm and classifier take no part, and parameters without a
        # gradient would stop DDP at its second step (and be decayed for nothing), so they are removed
        vit = model.encoder.model
        vit.reset_classifier(0)
        vit.norm = torch.nn.Identity()
    model.medmae_name = name
    return model


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases and norms, nor on a ViT's position embedding and class token (MAE's rule)."""
    return param_groups_weight_decay(model, weight_decay,
                                     no_weight_decay_list=("encoder.model.pos_embed", "encoder.model.cls_token"))


def encoder_and_decoder(model: torch.nn.Module) -> tuple[list[str], list[str], list[str]]:
    """(encoder, decoder, head) state-dict keys of a segmentation model."""
    keys = list(model.state_dict())
    return ([k for k in keys if k.startswith("encoder.")], [k for k in keys if k.startswith("decoder.")],
            [k for k in keys if k.startswith("segmentation_head.")])


def load_pretrained(model: torch.nn.Module, checkpoint: dict, decoder_init: str = "pretrained",
                    flag: str = "--finetune") -> dict:
    if decoder_init not in DECODER_INITS:
        raise ValueError(f"--decoder_init must be one of {list(DECODER_INITS)}, got {decoder_init!r}")
    if is_unet(model.medmae_name):
        return _load_unet(model, checkpoint, decoder_init, flag)
    if decoder_init == "pretrained":
        raise ValueError(f"{flag}: an MAE checkpoint holds no segmentation decoder for {model.medmae_name}; pass "
                         "--decoder_init random (the DPT decoder starts fresh)")
    return _load_vit(model, checkpoint, flag)


def _pretraining_arch(checkpoint: dict) -> tuple[str | None, str | None]:
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(saved, dict):
        return saved.get("model_arch"), saved.get("model")
    return None, None


def _load_unet(model, checkpoint: dict, decoder_init: str, flag: str) -> dict:
    """Encoder and (decoder_init pretrained) decoder of a U-Net pre-training checkpoint, or an encoder-only file."""
    arch, encoder = _pretraining_arch(checkpoint)
    wanted = model.medmae_name[len(UNET_PREFIX):]
    if arch is not None and arch != "Unet":
        raise ValueError(f"{flag}: the checkpoint pre-trained a {arch} (--model_arch); --model {model.medmae_name} "
                         "is a U-Net. Pre-train with --model_arch Unet, or pass --decoder_init random to take its "
                         "encoder alone")
    if encoder is not None and encoder != wanted:
        raise ValueError(f"{flag}: the checkpoint pre-trained the encoder {encoder}; --model {model.medmae_name} "
                         f"needs {wanted}: pass --model {UNET_PREFIX}{encoder}")
    state = strip_prefixes(checkpoint, keep_model_prefix=True)
    encoder_keys, decoder_keys, _ = encoder_and_decoder(model)
    take_decoder = decoder_init == "pretrained"

    def resolve(key, target):
        key = key.removeprefix("model.")  # MaskedAutoencoderCNN keeps its smp network as `model`
        if key.startswith("decoder."):
            return key if take_decoder and key in target else None
        if key.startswith("segmentation_head."):
            return None  # reconstructs image channels; the mask head is new
        for candidate in (key, f"encoder.{key}", f"encoder.features.{key}"):  # whole U-Net, encoder file, export
            if candidate in target and candidate.startswith("encoder."):
                return candidate
        return None

    stem = next(k for k in encoder_keys if k.endswith(".weight") and model.state_dict()[k].ndim == 4)

    def adapt(key, value, wanted_value):
        if key == stem and value.shape[1] != wanted_value.shape[1]:
            return adapt_in_chans(value, wanted_value.shape[1]), f"channels {value.shape[1]} -> {wanted_value.shape[1]}"
        return value, None

    report = load_matching(model, state, resolve, adapt, flag=flag)
    missing = set(report.pop("missing"))
    lacking = [k for k in encoder_keys if k in missing]
    if lacking:
        raise ValueError(f"{flag}: the checkpoint lacks {len(lacking)} encoder tensor(s) of {model.medmae_name}, e.g. "
                         f"{', '.join(lacking[:5])}. Is it a checkpoint of this encoder?")
    if take_decoder and any(k in missing for k in decoder_keys):
        raise ValueError(f"{flag}: the checkpoint holds no U-Net decoder (an encoder-only file, or another decoder); "
                         "pass --decoder_init random to train the decoder from scratch")
    report["new"] = [k for k in model.state_dict() if k in missing]
    return report


def _load_vit(model, checkpoint: dict, flag: str) -> dict:
    """Every ViT block from an MAE checkpoint (models_vit's rules: decoder dropped, position embedding resampled,
    patch embedding adapted), reported in the segmentation model's names; the DPT decoder and head are new."""
    vit = model.encoder.model
    report = models_vit.load_pretrained(vit, checkpoint, flag=flag)
    prefix = "encoder.model."
    loaded = {prefix + k.split(" ")[0] for k in report["loaded"]}
    return {"loaded": [prefix + k for k in report["loaded"]], "adapted": [prefix + k for k in report["adapted"]],
            "ignored": report["ignored"],
            "new": [k for k in model.state_dict() if k not in loaded and not k.startswith(prefix + "head.")]}
