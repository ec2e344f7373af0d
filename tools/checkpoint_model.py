"""Rebuild the pre-training model a checkpoint came from (shared by the export and visualisation tools)."""
import argparse

import main_pretrain_multi_datasets_xray as vit_main
import main_pretrain_multi_datasets_xray_cnn as cnn_main
import models_mae
import models_mae_cnn
from util.checkpoint import load_checkpoint


def model_from_checkpoint(path: str):
    """(model with weights loaded, args namespace, checkpoint dict). Reference checkpoints work too."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt or "args" not in ckpt:
        raise ValueError(f"{path} is not a pre-training checkpoint (it has no 'model' and 'args'); "
                         "an encoder export cannot be visualised or re-exported")
    if ckpt.get("task"):
        what = {"finetune": "a classifier", "linprobe": "a classifier", "segment": "a segmenter"}.get(ckpt["task"])
        held = f" ({what})" if what else ""
        pointer = " (tools.export_classifier exports a fine-tuned classifier)" if what == "a classifier" else ""
        raise ValueError(f"{path} is a {ckpt['task']} checkpoint{held}; this tool takes a pre-training checkpoint "
                         f"(main_pretrain_multi_datasets_xray*.py), whose encoder and decoder it rebuilds{pointer}")
    saved = ckpt["args"]
    name = saved.get("model")
    if name not in models_mae.MODELS and name not in models_mae_cnn.encoder_names():
        raise ValueError(f"{path} records the model {name!r} in its args, which no pre-training script here builds "
                         f"(MAE ViTs: {', '.join(models_mae.MODELS.names())}; U-Nets: any SMP encoder name)")
    script = vit_main if name in models_mae.MODELS else cnn_main
    args = argparse.ArgumentParser(parents=[script.get_args_parser()]).parse_args([])
    for key, value in saved.items():
        setattr(args, key, value)
    model = script.build_model(args)
    if not any(k.startswith(("decoder_", "model.decoder")) for k in ckpt["model"]):
        raise ValueError(f"{path} has no decoder weights, so it cannot reconstruct images")
    model.load_state_dict(ckpt["model"])
    return model.eval(), args, ckpt
