"""What the machine says about its GPUs, apart from what torch sees: so that a GPU torch cannot use (a driver older
than torch's CUDA needs, a card whose architecture the build has no code for, a container started without GPUs) is
an error naming the cause, never a silent fall-back to the CPU. Shared by the training scripts and gpu_check."""
import os
import subprocess

import torch


def gpu_signs(visible_devices: bool = True) -> list[str]:
    """The GPUs nvidia-smi lists, and (visible_devices) a CUDA_VISIBLE_DEVICES that names devices. The training
    scripts look at nvidia-smi alone: the reference's commands set CUDA_VISIBLE_DEVICES=0,...,7 and run as written on
    a machine without GPUs too."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""  # no nvidia-smi, or it hangs: no sign from it; the variable below may still give one
    signs = [f"nvidia-smi lists {line.strip()}" for line in listed.splitlines() if line.startswith("GPU ")]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() if visible_devices else ""
    if visible and visible not in ("-1", "none", "NoDevFiles"):
        signs.append(f"CUDA_VISIBLE_DEVICES={visible}")
    return signs


def cuda_diagnosis() -> str:
    """The driver and card as nvidia-smi reports them, against torch's CUDA build and the architectures it has code
    for, and what to do."""
    try:
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20).stdout.strip() or "nothing"
    except (OSError, subprocess.SubprocessError) as e:
        query = f"not run ({e})"
    return (f"nvidia-smi reports (name, driver, compute capability): {query}; torch {torch.__version__} is built "
            f"for CUDA {torch.version.cuda} with code for {torch.cuda.get_arch_list() or 'no architecture'}. A driver "
            "older than this CUDA needs, a card whose capability is not in the list (a V100 is sm_70), or a "
            "container started without --gpus all each look like this (PRETRAIN.md section 4).")


def arch_problem(capability: tuple[int, int], arch_list: list[str], name: str) -> str | None:
    """None if torch's build has code for a card of this compute capability (its own sm_XY, or PTX it can compile
    from), else what is wrong."""
    major, minor = capability
    if f"sm_{major}{minor}" in arch_list:
        return None
    ptx = [a for a in arch_list if a.startswith("compute_")]
    if any(int(a.split("_")[1]) <= major * 10 + minor for a in ptx):
        return None
    return (f"{name} (compute capability {major}.{minor}, sm_{major}{minor}) has no code in this torch build "
            f"(torch {torch.__version__}, CUDA {torch.version.cuda}, built for {arch_list}); install a torch build "
            f"whose torch.cuda.get_arch_list() includes sm_{major}{minor} (PRETRAIN.md section 4)")
