"""MAE pre-training of a ViT on chest X-rays (WACV 2023 "Delving into Masked Autoencoders for
Multi-Label Thorax Disease Classification"; the reference is lambert-x/medical_mae).

One process, CPU or one GPU:
    python main_pretrain_multi_datasets_xray.py --model mae_vit_small_patch16_dec512d2b --mask_ratio 0.90 \
        --data_path data --datasets_names chexpert chestxray_nih --output_dir out --log_dir out
One node, 8 GPUs (torchrun, or the reference's python -m torch.distributed.launch --use_env):
    torchrun --nproc_per_node=8 main_pretrain_multi_datasets_xray.py ...
SLURM, one task per GPU or torchrun per node: scripts/ and PRETRAIN.md.
"""
import argparse
import sys

import engine
import models_mae
from data import add_data_args
from engine_pretrain import PretrainTask
from util.args import ExitCode, add_pretrain_args
from util.masking import no_patch_removed


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE pre-training on chest X-rays", add_help=False)
    add_pretrain_args(parser)
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                       help="model name, e.g. mae_vit_small_patch16_dec512d2b (the paper's ViT-S); 'list' prints all "
                            "(default: mae_vit_large_patch16)")
    add_data_args(parser)
    return parser


def check_model_args(args) -> list[str]:
    try:
        config = models_mae.MODELS.config(args.model)
    except ValueError as e:
        return [f"--model: {e}"]
    problems = []
    if args.input_size % config["patch_size"]:
        problems.append(f"--input_size {args.input_size} must be divisible by the patch size {config['patch_size']} "
                        f"of {args.model}")
    if config.get("fixed_input_size") and args.input_size != config["input_size"]:
        problems.append(f"--model {args.model} is the {config['input_size']}-pixel variant; pass --input_size "
                        f"{config['input_size']}")
    problem = no_patch_removed((args.input_size // config["patch_size"]) ** 2, args.mask_ratio)
    return problems + ([problem] if problem else [])


def build_model(args):
    return models_mae.create_model(args.model, img_size=args.input_size, in_chans=args.in_chans,
                                   norm_pix_loss=args.norm_pix_loss, mask_ratio=args.mask_ratio)


def main(argv=None) -> int:
    """Parse, answer --model list, check every flag and run; the process exit code (PRETRAIN.md section 6)."""
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)
    if args.model == "list":
        print("\n".join(models_mae.MODELS.names()))
        return ExitCode.OK
    return engine.run(PretrainTask(build_model, check_model_args), args)


if __name__ == "__main__":
    sys.exit(main())
