# The paper's recipes. Pre-training: the commands of PRETRAIN.md section 2; fine-tuning: FINETUNE.md section 2 (the
# reference's FINETUNE.md), plus a linear probe and segmentation. tests/test_docs.py and tests/test_finetune.py hold them to the
# documents. Sourced by slurm_pretrain.sh; sets SCRIPT and RECIPE_ARGS from $RECIPE.
# Pre-training: per-process batch 256 on 8 GPUs = effective batch 2048; change BATCH_SIZE / ACCUM_ITER to keep 2048
# elsewhere. Fine-tuning: PRETRAINED names the checkpoint; TRAIN_LIST/VAL_LIST/TEST_LIST default to the official
# NIH lists shipped in data_splits/chestxray/.
FINETUNE_SETTINGS=(--device cuda --batch_size "${BATCH_SIZE:-128}" --accum_iter "${ACCUM_ITER:-1}" --epochs 75
                   --blr 2.5e-4 --weight_decay 0.05 --warmup_epochs 5 --mixup 0 --cutmix 0 --reprob 0
                   --vit_dropout_rate 0 --num_workers "${NUM_WORKERS:-4}" --eval_interval 10 --min_lr 1e-5
                   --build_timm_transform --aa rand-m6-mstd0.5-inc1)
NIH_LISTS=(--train_list "${TRAIN_LIST:-data_splits/chestxray/train_official.txt}"
           --val_list "${VAL_LIST:-data_splits/chestxray/val_official.txt}"
           --test_list "${TEST_LIST:-data_splits/chestxray/test_official.txt}" --nb_classes 14)
VIT_S_FINETUNE=(--model vit_small_patch16 --layer_decay 0.55 --drop_path 0.2)
case "${RECIPE:-vit_s}" in
    finetune_vit_s) SCRIPT=main_finetune_chestxray.py
           RECIPE_ARGS=("${FINETUNE_SETTINGS[@]}" "${NIH_LISTS[@]}" "${VIT_S_FINETUNE[@]}"
                        --finetune "${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune}") ;;
    finetune_densenet121) SCRIPT=main_finetune_chestxray.py
           RECIPE_ARGS=("${FINETUNE_SETTINGS[@]}" "${NIH_LISTS[@]}" --model densenet121 --drop_path 0
                        --checkpoint_type smp_encoder
                        --finetune "${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune}") ;;
    # no published commands for COVIDx and NODE21: the NIH ViT-S settings on those tasks (DATA_PATH names the data)
    finetune_covidx_vit_s) SCRIPT=main_finetune_chestxray.py
           RECIPE_ARGS=("${FINETUNE_SETTINGS[@]}" --dataset covidx --nb_classes 4 "${VIT_S_FINETUNE[@]}"
                        --finetune "${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune}") ;;
    finetune_node21_vit_s) SCRIPT=main_finetune_chestxray.py
           RECIPE_ARGS=("${FINETUNE_SETTINGS[@]}" --dataset node21 --nb_classes 1 "${VIT_S_FINETUNE[@]}"
                        --finetune "${PRETRAINED:?set PRETRAINED to the checkpoint to fine-tune}") ;;
    linprobe_vit_s) SCRIPT=main_linprobe_chestxray.py
           RECIPE_ARGS=(--device cuda --batch_size "${BATCH_SIZE:-512}" --accum_iter "${ACCUM_ITER:-1}" --epochs 90
                        --blr 0.1 --weight_decay 0 --warmup_epochs 10 --num_workers "${NUM_WORKERS:-8}"
                        --finetune "${PRETRAINED:?set PRETRAINED to the checkpoint to probe}" --model vit_small_patch16
                        --train_list "${TRAIN_LIST:-data_splits/chestxray/train_official.txt}"
                        --val_list "${VAL_LIST:-data_splits/chestxray/val_official.txt}"
                        --test_list "${TEST_LIST:-data_splits/chestxray/test_official.txt}"
                        --nb_classes 14 --eval_interval 10) ;;
    # segmentation (FINETUNE.md section 11): SIIM-ACR pneumothorax at 512 pixels from the DenseNet-121 U-Net's whole
    # pre-training checkpoint, or a ViT-S MAE under DPT at its own 224 (DATASET=folder with MASK_SUFFIX for lung masks)
    segment_unet) SCRIPT=main_segment_chestxray.py
           RECIPE_ARGS=(--device cuda --batch_size "${BATCH_SIZE:-16}" --accum_iter "${ACCUM_ITER:-1}" --epochs 50
                        --num_workers "${NUM_WORKERS:-8}" --input_size "${INPUT_SIZE:-512}" --model unet_densenet121
                        --dataset "${DATASET:-siim}" --mask_suffix "${MASK_SUFFIX:-}"
                        --decoder_init "${DECODER_INIT:-pretrained}"
                        --finetune "${PRETRAINED:?set PRETRAINED to the U-Net pre-training checkpoint}") ;;
    segment_vit_s) SCRIPT=main_segment_chestxray.py
           RECIPE_ARGS=(--device cuda --batch_size "${BATCH_SIZE:-16}" --accum_iter "${ACCUM_ITER:-1}" --epochs 50
                        --num_workers "${NUM_WORKERS:-8}" --input_size 224 --model dpt_vit_small_patch16
                        --drop_path 0.1 --dataset "${DATASET:-siim}" --mask_suffix "${MASK_SUFFIX:-}"
                        --decoder_init random
                        --finetune "${PRETRAINED:?set PRETRAINED to the MAE checkpoint}") ;;
    vit_s) SCRIPT=main_pretrain_multi_datasets_xray.py; MODEL=mae_vit_small_patch16_dec512d2b; MASK=0.90
           DATASETS=(chexpert chestxray_nih); MODEL_ARGS=(--mask_strategy random) ;;
    vit_b) SCRIPT=main_pretrain_multi_datasets_xray.py; MODEL=mae_vit_base_patch16_dec512d8b; MASK=0.90
           DATASETS=(chexpert chestxray_nih mimic_cxr); MODEL_ARGS=(--mask_strategy random) ;;
    densenet121) SCRIPT=main_pretrain_multi_datasets_xray_cnn.py; MODEL=densenet121; MASK=0.75
           DATASETS=(chexpert chestxray_nih); MODEL_ARGS=() ;;
    *) echo "recipes.sh: RECIPE must be vit_s, vit_b, densenet121, finetune_vit_s, finetune_densenet121," \
            "finetune_covidx_vit_s, finetune_node21_vit_s, linprobe_vit_s, segment_unet or segment_vit_s, got" \
            "'$RECIPE'" >&2; exit 2 ;;
esac
# --device cuda: a GPU node with a broken CUDA install must fail at start-up, not train on its CPUs
if [[ "$SCRIPT" == main_pretrain* ]]; then
    RECIPE_ARGS=(--device cuda --batch_size "${BATCH_SIZE:-256}" --accum_iter "${ACCUM_ITER:-1}" --model "$MODEL"
                 --mask_ratio "$MASK" --epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05
                 --num_workers "${NUM_WORKERS:-8}" --input_size 224 "${MODEL_ARGS[@]}" --random_resize_range 0.5 1.0
                 --datasets_names "${DATASETS[@]}")
fi
