# The paper's three recipes, the commands of PRETRAIN.md section 2 (tests/test_docs.py holds them to it). Sourced by
# slurm_pretrain.sh; sets SCRIPT and RECIPE_ARGS from $RECIPE.
# Per-process batch 256 on 8 GPUs = effective batch 2048; change BATCH_SIZE / ACCUM_ITER to keep 2048 elsewhere.
case "${RECIPE:-vit_s}" in
    vit_s) SCRIPT=main_pretrain_multi_datasets_xray.py; MODEL=mae_vit_small_patch16_dec512d2b; MASK=0.90
           DATASETS=(chexpert chestxray_nih); MODEL_ARGS=(--mask_strategy random) ;;
    vit_b) SCRIPT=main_pretrain_multi_datasets_xray.py; MODEL=mae_vit_base_patch16_dec512d8b; MASK=0.90
           DATASETS=(chexpert chestxray_nih mimic_cxr); MODEL_ARGS=(--mask_strategy random) ;;
    densenet121) SCRIPT=main_pretrain_multi_datasets_xray_cnn.py; MODEL=densenet121; MASK=0.75
           DATASETS=(chexpert chestxray_nih); MODEL_ARGS=() ;;
    *) echo "recipes.sh: RECIPE must be vit_s, vit_b or densenet121, got '$RECIPE'" >&2; exit 2 ;;
esac
# --device cuda: a GPU node with a broken CUDA install must fail at start-up, not train on its CPUs
RECIPE_ARGS=(--device cuda --batch_size "${BATCH_SIZE:-256}" --accum_iter "${ACCUM_ITER:-1}" --model "$MODEL"
             --mask_ratio "$MASK" --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --num_workers "${NUM_WORKERS:-8}"
             --input_size 224 "${MODEL_ARGS[@]}" --random_resize_range 0.5 1.0 --datasets_names "${DATASETS[@]}")
