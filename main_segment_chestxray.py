"""Segmentation fine-tuning of a pre-trained U-Net or ViT on chest X-ray masks (SIIM-ACR pneumothorax, lung masks,
your own CSV lists): FINETUNE.md section 11.

One process, CPU or one GPU:
    python main_segment_chestxray.py --model unet_densenet121 --finetune runs/unet/checkpoint-last.pth \
        --dataset siim --data_path data/siim --output_dir out_seg --log_dir out_seg
One node, 8 GPUs: torchrun --nproc_per_node=8 main_segment_chestxray.py ...
SLURM: RECIPE=segment_siim_unet sbatch scripts/pretrain_1node.sbatch.
The checkpoint is selected by mean validation Dice; the test list is scored once, at the end.
"""
import argparse
import sys

import engine
import models_seg
from data.segmentation import add_data_args
from engine_segment import LOSSES, SegmentationTask
from util.args import ExitCode, add_common_args, add_protocol_args
from util.model_api import Segmenter


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Segmentation fine-tuning on chest X-rays", add_help=False)
    # AdamW at lr 1e-4 for batch 16 (blr 1.6e-3), the usual U-Net fine-tuning rate, with decay 0.05 as classification
    add_common_args(parser, batch_size=16, epochs=50, weight_decay=0.05, blr=1.6e-3, min_lr=1e-6, warmup_epochs=2,
                    save_freq=0, output_help="checkpoints, log.txt, results.json, test_metrics.csv and overlays")
    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="unet_densenet121", type=str, metavar="MODEL",
                       help="unet_<SMP encoder> (the U-Net masked reconstruction's network, e.g. unet_densenet121) or "
                            "dpt_vit_small_patch16 / dpt_vit_base_patch16 / dpt_vit_large_patch16 (an MAE ViT under "
                            "smp's DPT); 'list' prints all (default: unet_densenet121)")
    group.add_argument("--finetune", default="", type=str,
                       help="pre-trained weights: a U-Net pre-training checkpoint (encoder and decoder), an encoder "
                            "file (the reference's densenet121_CXR_0.3M_mae.pth, a tools/export_encoder.py output, "
                            "torchvision ImageNet weights saved locally) or an MAE ViT checkpoint (default: none, "
                            "random initialisation)")
    group.add_argument("--decoder_init", default="pretrained", choices=models_seg.DECODER_INITS,
                       help="pretrained: a U-Net's decoder from --finetune too (only the last layer is new); random: "
                            "the encoder alone, to measure what the pre-trained decoder adds (a ViT's DPT decoder is "
                            "always random) (default: pretrained)")
    group.add_argument("--drop_path", type=float, default=0.0,
                       help="ViT stochastic depth rate; a U-Net takes 0 (default: 0)")
    group.add_argument("--loss", default="dice_bce", choices=LOSSES,
                       help="dice_bce: soft Dice + BCE on the mask logits; dice or bce alone (default: dice_bce)")
    add_data_args(parser)
    add_protocol_args(parser, "mean validation Dice", "test Dice and IoU")
    return parser


def check_model_args(args) -> list[str]:
    problems = models_seg.check_model(args.model, args.input_size)
    if models_seg.is_unet(args.model) and args.drop_path:
        problems.append(f"--drop_path {args.drop_path}: stochastic depth is for ViT encoders; a U-Net takes 0")
    if args.finetune and not models_seg.is_unet(args.model) and args.decoder_init == "pretrained":
        problems.append(f"--decoder_init pretrained: an MAE checkpoint holds no decoder for {args.model}; pass "
                        "--decoder_init random")
    return problems


def build_segmenter(args) -> Segmenter:
    model = models_seg.create_model(args.model, args.input_size, args.in_chans, classes=1, drop_path=args.drop_path)
    return Segmenter(model, lambda ckpt, decoder_init: models_seg.load_pretrained(model, ckpt, decoder_init),
                     lambda weight_decay: models_seg.param_groups(model, weight_decay))


def main(argv=None) -> int:
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)
    if args.model == "list":
        print("\n".join(models_seg.model_names()))
        return ExitCode.OK
    return engine.run(SegmentationTask(build_segmenter, check_model_args), args)


if __name__ == "__main__":
    sys.exit(main())
