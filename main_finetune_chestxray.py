"""Fine-tuning of a pre-trained ViT or CNN on labelled chest X-rays (NIH ChestX-ray14 official split, CheXpert), the
downstream evaluation of "Delving into Masked Autoencoders for Multi-Label Thorax Disease Classification".

One process, CPU or one GPU:
    python main_finetune_chestxray.py --model vit_small_patch16 --finetune exports/vit_s.pth \
        --data_path data/nih_chestxray --output_dir out --log_dir out
One node, 8 GPUs: the reference's FINETUNE.md commands (python -m torch.distributed.launch --use_env), or
    torchrun --nproc_per_node=8 main_finetune_chestxray.py ...
SLURM: RECIPE=finetune_vit_s sbatch scripts/pretrain_1node.sbatch (FINETUNE.md section 5).
The checkpoint is selected by validation AUROC; the test list is scored once, at the end (FINETUNE.md).
"""
import argparse
import functools
import sys

import engine
import models_cnn
import models_vit
from data.labelled import add_data_args, is_single_label
from engine_finetune import ClassificationTask, SingleLabelTask
from util.args import ExitCode, add_finetune_args
from util.model_api import Classifier

CHECKPOINT_TYPES = ("smp_encoder", "mae", "timm", "torchvision")


def get_args_parser(linear_probe: bool = False) -> argparse.ArgumentParser:
    task = "Linear probing" if linear_probe else "Fine-tuning"
    parser = argparse.ArgumentParser(f"{task} on chest X-rays", add_help=False)
    add_finetune_args(parser, linear_probe)
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="vit_large_patch16", type=str, metavar="MODEL",
                       help="vit_small_patch16 (the paper's ViT-S), vit_base_patch16, ..., densenet121, resnet50; "
                            "'list' prints all (default: vit_large_patch16)")
    group.add_argument("--finetune", default="", type=str,
                       help="pre-trained weights: a pre-training checkpoint of this project, a tools/export_encoder.py "
                            "output, the reference's published checkpoints, or timm/torchvision ImageNet weights "
                            "saved to a local file (default: none, random initialisation)")
    group.add_argument("--checkpoint_type", default=None, choices=CHECKPOINT_TYPES,
                       help="what --finetune holds; the format is recognised from its keys, this only checks it "
                            "(smp_encoder: a CNN encoder, the reference's CNN checkpoints) (default: from the keys)")
    group.add_argument("--nb_classes", default=14, type=int,
                       help="number of findings: 14 for NIH, 5 for CheXpert (default: 14)")
    group.add_argument("--drop_path", type=float, default=0.1,
                       help="ViT stochastic depth rate; 0 for a CNN (default: 0.1, the reference's for both scripts)")
    if linear_probe:
        group.add_argument("--frozen_encoder_eval", action="store_true",
                           help="keep the frozen encoder in eval mode while the head trains (no drop path or dropout "
                                "in it, a CNN's BatchNorm statistics fixed); the reference trains the whole model in "
                                "train mode (default: off)")
    group.add_argument("--vit_dropout_rate", type=float, default=0.0,
                       help="dropout rate: timm's drop_rate for ViTs, the DenseNet's drop_rate (default: 0)")
    group.add_argument("--global_pool", dest="global_pool", action="store_true", default=not linear_probe,
                       help="ViT: average the patch tokens (MAE's fine-tuning default); --cls_token: the class "
                            f"token (MAE's linear-probe default) (default: {'on' if not linear_probe else 'off'})")
    group.add_argument("--cls_token", dest="global_pool", action="store_false", help=argparse.SUPPRESS)
    add_data_args(parser)
    return parser


def model_names() -> list[str]:
    return models_vit.MODELS.names() + models_cnn.MODELS.names()


def check_model_args(args) -> list[str]:
    vit = args.model in models_vit.MODELS
    if not vit and args.model not in models_cnn.MODELS:
        try:
            models_vit.MODELS.get(args.model)
        except ValueError as e:
            return [f"--model: {e}"]
    problems = []
    if vit and args.input_size % models_vit.MODELS.config(args.model)["patch_size"]:
        problems.append(f"--input_size {args.input_size} must be divisible by the patch size of {args.model}")
    if not vit and args.drop_path:
        problems.append(f"--drop_path {args.drop_path}: stochastic depth is for ViTs; {args.model} takes "
                        "--drop_path 0")
    if not vit and args.input_size % 32:
        problems.append(f"--input_size {args.input_size}: {args.model} needs a multiple of 32")
    if args.checkpoint_type == "smp_encoder" and vit:
        problems.append("--checkpoint_type smp_encoder holds a CNN encoder; --model is a ViT")
    if args.checkpoint_type == "mae" and not vit:
        problems.append(f"--checkpoint_type mae holds a ViT MAE; --model {args.model} is a CNN")
    return problems


def build_classifier(args, linear_probe: bool = False) -> Classifier:
    if args.model in models_vit.MODELS:
        model = models_vit.create_model(args.model, args.nb_classes, args.input_size, args.in_chans, args.drop_path,
                                        args.vit_dropout_rate, args.global_pool, linear_probe)
        return Classifier(model, model.head, lambda ckpt: models_vit.load_pretrained(model, ckpt), layer_decay=True)
    model = models_cnn.create_model(args.model, args.nb_classes, args.in_chans, args.vit_dropout_rate, linear_probe)
    return Classifier(model, getattr(model, models_cnn.head_name(args.model)),
                      lambda ckpt: models_cnn.load_pretrained(model, ckpt), layer_decay=False)


def main(argv=None, linear_probe: bool = False) -> int:
    """Parse, answer --model list, check every flag and run; the process exit code (FINETUNE.md)."""
    args = argparse.ArgumentParser(parents=[get_args_parser(linear_probe)]).parse_args(argv)
    if args.model == "list":
        print("\n".join(model_names()))
        return ExitCode.OK
    kind = SingleLabelTask if is_single_label(args) else ClassificationTask  # COVIDx, a CSV's --label_column
    task = kind(functools.partial(build_classifier, linear_probe=linear_probe),
                "linprobe" if linear_probe else "finetune", check_model_args)
    return engine.run(task, args)


if __name__ == "__main__":
    sys.exit(main())
