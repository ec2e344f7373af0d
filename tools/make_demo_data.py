"""Write a small synthetic chest X-ray collection in the three reference layouts (for make demo).

    python -m tools.make_demo_data --out demo_run/data [--scale 8]
"""
import argparse
import os

from data.synthetic import NIH_SUBSET_LIST, make_reference_layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to use as --data_path")
    parser.add_argument("--scale", type=int, default=8, help="patients per source = 6 x scale (default: 8)")
    parser.add_argument("--size", type=int, nargs=2, default=[160, 136], metavar=("H", "W"),
                        help="image height and width (default: 160 136)")
    args = parser.parse_args()
    subset = os.path.join(args.out, "nih_chestxray", NIH_SUBSET_LIST)
    if os.path.isfile(subset):
        print(f"demo data already in {args.out}; delete it to rebuild")
        return
    counts = make_reference_layout(args.out, scale=args.scale, size=tuple(args.size))
    print(f"demo data in {args.out}: " + ", ".join(f"{k} {v} pre-training images" for k, v in counts.items()))
    print(f"NIH holds a few images of the default train_official.txt: train on them with --train_list {subset}")


if __name__ == "__main__":
    main()
