"""Linear probing of a pre-trained ViT or CNN on labelled chest X-rays: the encoder is frozen, only a linear head
(after a BatchNorm without affine parameters, as MAE's main_linprobe) is trained, with LARS.

    python main_linprobe_chestxray.py --model vit_small_patch16 --finetune exports/vit_s.pth \
        --data_path data/nih_chestxray --output_dir out --log_dir out
    torchrun --nproc_per_node=8 main_linprobe_chestxray.py ...
Same data, protocol (selection by validation, one test score), outputs and launch modes as main_finetune_chestxray.py.
"""
import sys

from main_finetune_chestxray import main

if __name__ == "__main__":
    sys.exit(main(linear_probe=True))
