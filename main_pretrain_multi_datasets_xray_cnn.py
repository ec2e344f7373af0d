"""Masked-reconstruction pre-training of a CNN (an SMP U-Net over any encoder) on chest X-rays,
the CNN path of lambert-x/medical_mae. Same data, engine, outputs and launch modes as the ViT script.

    python main_pretrain_multi_datasets_xray_cnn.py --model densenet121 --mask_ratio 0.75 --data_path data ...
    torchrun --nproc_per_node=8 main_pretrain_multi_datasets_xray_cnn.py --model densenet121 ...
"""
import argparse
import sys

import engine
import models_mae_cnn
from data import add_data_args
from engine_pretrain import PretrainTask
from util.args import ExitCode, add_pretrain_args
from util.masking import no_patch_removed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("CNN masked-reconstruction pre-training on chest X-rays", add_help=False)
    add_pretrain_args(parser)
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="densenet121", type=str, metavar="ENCODER",
                       help="any segmentation-models-pytorch encoder, e.g. densenet121 or resnet50; 'list' prints all "
                            "(default: densenet121)")
    group.add_argument("--model_arch", default="Unet", choices=models_mae_cnn.ARCHITECTURES,
                       help="SMP architecture around the encoder (default: Unet)")
    group.add_argument("--patch_size", default=16, type=int, help="masking patch size in pixels (default: 16)")
    group.add_argument("--cnn_loss", default="all", choices=models_mae_cnn.LOSS_REGIONS,
                       help="'all': MSE over every pixel (the reference); 'masked': removed patches only "
                            "(default: all)")
    add_data_args(parser)
    return parser


def check_model_args(args) -> list[str]:
    try:
        models_mae_cnn.check_cnn_config(args.model, args.model_arch, args.input_size, args.patch_size)
    except ValueError as e:
        return [str(e)]
    problem = no_patch_removed((args.input_size // args.patch_size) ** 2, args.mask_ratio)
    if args.cnn_loss == "masked" and problem:  # 'all' (the reference's) is defined without a removed patch
        return [problem]
    if args.deterministic and args.model_arch in models_mae_cnn.NONDETERMINISTIC_ON_CUDA and args.device != "cpu":
        return [f"--deterministic with --model_arch {args.model_arch}: its CUDA backward (bilinear upsampling or "
                "adaptive pooling) has no deterministic kernel and would fail at the first step; use --model_arch "
                f"Unet, UnetPlusPlus, Linknet or MAnet, or drop --deterministic (or train with --device cpu)"]
    return []


def build_model(args):
    return models_mae_cnn.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size,
                                       model_arch=args.model_arch, in_chans=args.in_chans,
                                       norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio,
                                       loss_region=args.cnn_loss)


def main(argv=None) -> int:
    """Parse, answer --model list, check every flag and run; the process exit code (PRETRAIN.md section 6)."""
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)
    if args.model == "list":
        print("\n".join(models_mae_cnn.encoder_names()))
        return ExitCode.OK
    return engine.run(PretrainTask(build_model, check_model_args), args)


if __name__ == "__main__":
    sys.exit(main())
