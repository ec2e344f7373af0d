"""Write a small synthetic chest X-ray collection in the three reference layouts (for make demo), the fine-tuning
demo sets (for make finetune-demo): NIH-style labelled lists in <out>/nih_labelled/, COVIDx in <out>/covidx/ and
NODE21 in <out>/node21/, with findings drawn in so a short fine-tuning learns them (data/synthetic.py says how), and
for make segment-demo lung masks in <out>/lungs/ (images/ and masks/, the lungs as drawn).

    python -m tools.make_demo_data --out demo_run/data [--scale 8]
"""
import argparse
import os

from data.synthetic import (
    NIH_SUBSET_LIST,
    make_covidx,
    make_lung_masks,
    make_nih_labelled,
    make_node21,
    make_reference_layout,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to use as --data_path")
    parser.add_argument("--scale", type=int, default=8, help="patients per source = 6 x scale (default: 8)")
    parser.add_argument("--size", type=int, nargs=2, default=[160, 136], metavar=("H", "W"),
                        help="image height and width (default: 160 136)")
    args = parser.parse_args()
    subset = os.path.join(args.out, "nih_chestxray", NIH_SUBSET_LIST)
    if os.path.isfile(subset):
        print(f"pre-training demo data already in {args.out}; delete it to rebuild")
    else:
        counts = make_reference_layout(args.out, scale=args.scale, size=tuple(args.size))
        print(f"demo data in {args.out}: " + ", ".join(f"{k} {v} pre-training images" for k, v in counts.items()))
        print(f"NIH holds a few images of the default train_official.txt: train on them with --train_list {subset}")
    labelled_root = os.path.join(args.out, "nih_labelled")
    if not os.path.isdir(labelled_root):
        lists = make_nih_labelled(labelled_root, patients=(10 * args.scale, 3 * args.scale, 3 * args.scale),
                                  size=(128, 128))
        print(f"fine-tuning demo lists in {labelled_root}: " + ", ".join(
            f"--{role}_list {path}" for role, path in lists.items()))
    covidx_root, node21_root = os.path.join(args.out, "covidx"), os.path.join(args.out, "node21")
    if not os.path.isdir(covidx_root):
        make_covidx(covidx_root, train=20 * args.scale, test=6 * args.scale, size=(128, 128))
        print(f"COVIDx demo in {covidx_root}: --dataset covidx --nb_classes 4 --data_path {covidx_root}")
    if not os.path.isdir(node21_root):
        make_node21(node21_root, images=20 * args.scale, size=(128, 128))
        print(f"NODE21 demo in {node21_root}: --dataset node21 --nb_classes 1 --data_path {node21_root}")
    lungs_root = os.path.join(args.out, "lungs")
    if not os.path.isdir(lungs_root):
        make_lung_masks(lungs_root, images=10 * args.scale, size=(128, 128))
        print(f"lung-mask demo in {lungs_root}: --dataset folder --mask_suffix _mask --data_path {lungs_root}")


if __name__ == "__main__":
    main()
