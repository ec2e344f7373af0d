# Two commands set up and run everything on a fresh machine (Python 3.11 with pip):
#   make demo   install, build demo data, pre-train ViT-S on CPU (time: README), write checkpoints + PNGs
#   make test   install, run the test suite (make test-fast: the unit tests alone, in under a minute)
# make finetune-demo: fine-tune make demo's checkpoint (pre-training a short one first if there is none) on demo
# labelled lists and print the test AUROC table with confidence intervals, in a few minutes on CPU.
# make segment-demo: pre-train a short DenseNet-121 U-Net on the demo data, then segment the demo's drawn lungs three
# ways (the whole pre-trained U-Net, its encoder alone, random initialisation), with overlays, in a few minutes on CPU.
# make gpu-check: the CUDA acceptance command (tests + throughput, JSON + markdown in gpu_check/); on a machine
# without CUDA it runs the same checks at toy sizes on CPU.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DEMO_DIR ?= demo_run
DEMO_EPOCHS ?= 20
BENCH_LOADER_ARGS ?= --seconds 3 --repeats 3
BENCH_STEP_ARGS ?= --steps 5 --rounds 2 --compile

FT_EPOCHS ?= 5
FT_TASK_EPOCHS ?= 5
FT_BLR ?= 1e-3
# pytest workers (pytest-xdist), whole test files per worker so module fixtures (SLURM, namespaces) are built once.
# Most tests wait on process start-up or on two-rank runs, so two workers halve the suite's time on CI's 2 cores;
# more workers multiply the memory of the multi-process tests (about 1.5 GB per rank).
TEST_WORKERS ?= 2

.PHONY: install install-test demo finetune-demo segment-demo test test-fast gpu-check bench lint

install:
	$(PIP) install -q -r requirements.txt

install-test: install
	$(PIP) install -q -r requirements-test.txt

demo: install
	$(PYTHON) -m tools.make_demo_data --out $(DEMO_DIR)/data
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_pretrain_multi_datasets_xray.py \
	    --output_dir $(DEMO_DIR)/output --log_dir $(DEMO_DIR)/output \
	    --batch_size 16 --model mae_vit_small_patch16_dec512d2b --mask_ratio 0.90 \
	    --epochs $(DEMO_EPOCHS) --warmup_epochs 2 --blr 1.5e-3 --weight_decay 0.05 --num_workers 1 \
	    --input_size 112 --random_resize_range 0.5 1.0 --datasets_names chexpert chestxray_nih mimic_cxr \
	    --data_path $(DEMO_DIR)/data --train_list $(DEMO_DIR)/data/nih_chestxray/train_official_subset.txt \
	    --device cpu --save_freq 5 --keep_last 1 --vis_freq 5 --print_freq 5
	@echo "Demo done: see $(DEMO_DIR)/output (reconstruction-*.png, loss_curve.png, log.txt, checkpoints)"

# the demo fine-tuning settings, shared by its three tasks
FT_DEMO = --model vit_small_patch16 --finetune $(DEMO_DIR)/output/checkpoint-last.pth --input_size 112 \
	--batch_size 16 --warmup_epochs 1 --blr $(FT_BLR) --layer_decay 0.75 --drop_path 0.1 \
	--num_workers 1 --device cpu --print_freq 5 --bootstrap 200

finetune-demo: install
	$(PYTHON) -m tools.make_demo_data --out $(DEMO_DIR)/data
	@test -f $(DEMO_DIR)/output/checkpoint-last.pth || $(MAKE) demo DEMO_EPOCHS=5
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_finetune_chestxray.py $(FT_DEMO) \
	    --output_dir $(DEMO_DIR)/finetune --log_dir $(DEMO_DIR)/finetune --epochs $(FT_EPOCHS) \
	    --data_path $(DEMO_DIR)/data/nih_labelled --train_list $(DEMO_DIR)/data/nih_labelled/train_labelled.txt \
	    --val_list $(DEMO_DIR)/data/nih_labelled/val_labelled.txt \
	    --test_list $(DEMO_DIR)/data/nih_labelled/test_labelled.txt
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_finetune_chestxray.py $(FT_DEMO) \
	    --output_dir $(DEMO_DIR)/finetune_covidx --log_dir $(DEMO_DIR)/finetune_covidx --epochs $(FT_TASK_EPOCHS) \
	    --dataset covidx --nb_classes 4 --data_path $(DEMO_DIR)/data/covidx
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_finetune_chestxray.py $(FT_DEMO) \
	    --output_dir $(DEMO_DIR)/finetune_node21 --log_dir $(DEMO_DIR)/finetune_node21 --epochs $(FT_TASK_EPOCHS) \
	    --dataset node21 --nb_classes 1 --data_path $(DEMO_DIR)/data/node21
	@echo "Fine-tuning demo done: NIH-style lists in $(DEMO_DIR)/finetune (results.json, roc/, val_auroc.png,"
	@echo "test_predictions.csv), COVIDx in $(DEMO_DIR)/finetune_covidx, NODE21 in $(DEMO_DIR)/finetune_node21."
	@echo "These are synthetic images with findings drawn in (NIH: Atelectasis, Cardiomegaly and Effusion; the other"
	@echo "11 are random labels, at chance by design): the numbers say the pipeline learns what is drawn, nothing"
	@echo "about chest X-rays or the paper. The paper's numbers need the real NIH ChestX-ray14 and its official lists."

SEG_PRETRAIN_EPOCHS ?= 10
SEG_EPOCHS ?= 10
# the segmentation demo's settings, shared by its three runs (lr 9.4e-4 at batch 8)
SEG_DEMO = --model unet_densenet121 --dataset folder --data_path $(DEMO_DIR)/data/lungs --mask_suffix _mask \
	--input_size 128 --batch_size 8 --epochs $(SEG_EPOCHS) --warmup_epochs 1 --blr 3e-2 --num_workers 1 --device cpu \
	--print_freq 10 --bootstrap 200

segment-demo: install
	$(PYTHON) -m tools.make_demo_data --out $(DEMO_DIR)/data
	@test -f $(DEMO_DIR)/unet/checkpoint-last.pth || OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} \
	    $(PYTHON) main_pretrain_multi_datasets_xray_cnn.py --output_dir $(DEMO_DIR)/unet --log_dir $(DEMO_DIR)/unet \
	    --batch_size 16 --model densenet121 --mask_ratio 0.75 --epochs $(SEG_PRETRAIN_EPOCHS) --warmup_epochs 1 \
	    --blr 1.5e-3 --weight_decay 0.05 --num_workers 1 --input_size 128 --random_resize_range 0.5 1.0 \
	    --datasets_names chexpert chestxray_nih mimic_cxr --data_path $(DEMO_DIR)/data \
	    --train_list $(DEMO_DIR)/data/nih_chestxray/train_official_subset.txt --device cpu --save_freq 5 --keep_last 1 \
	    --print_freq 10
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_segment_chestxray.py $(SEG_DEMO) \
	    --finetune $(DEMO_DIR)/unet/checkpoint-last.pth --output_dir $(DEMO_DIR)/segment_unet \
	    --log_dir $(DEMO_DIR)/segment_unet
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_segment_chestxray.py $(SEG_DEMO) \
	    --finetune $(DEMO_DIR)/unet/checkpoint-last.pth --decoder_init random \
	    --output_dir $(DEMO_DIR)/segment_encoder_only --log_dir $(DEMO_DIR)/segment_encoder_only
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(PYTHON) main_segment_chestxray.py $(SEG_DEMO) \
	    --output_dir $(DEMO_DIR)/segment_random_init --log_dir $(DEMO_DIR)/segment_random_init
	@echo "Segmentation demo done: $(DEMO_DIR)/segment_*/ (results.json, overlays_best.png, overlays_worst.png, val_dice.png)"

test: install-test
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -n $(TEST_WORKERS) --dist loadfile

# The edit-test loop: the unit tests in this one process, no torchrun, SLURM or CLI process, under a minute on 2 cores
# (tests marked slow are left out; `make test` runs everything). Installs nothing: run make install-test once first.
test-fast:
	$(PYTHON) -m pytest -m "not slow" -p no:xdist -q

gpu-check: install-test
	$(PYTHON) -m benchmarks.gpu_check --out gpu_check

# input pipeline (3 file kinds) then train step (ViT-S, DenseNet-121 U-Net), each printing same-run ratios
bench: install
	$(PYTHON) -m benchmarks.bench_loader $(BENCH_LOADER_ARGS)
	$(PYTHON) -m benchmarks.bench_step $(BENCH_STEP_ARGS)

lint: install-test
	$(PYTHON) -m ruff check .
