"""
The machine a run uses: its device and compute precision, the peak FLOP/s of known GPUs (for
the MFU), and sums over the processes of a torchrun job. train.py, sample.py and bench.py call it.
"""
import os
import sys

import torch


def device_and_dtype(device='auto', dtype='auto', local_rank=None, deterministic=None):
    """The torch.device and compute dtype the settings ask for, or exit with one line. 'auto':
    CUDA, MPS or the CPU; bfloat16 on GPUs that have it, else float16; float32 on CPUs."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = ['cpu'] + ['cuda'] * (gpus > 0) + [f'cuda:{i}' for i in range(gpus)] + \
        ['mps'] * torch.backends.mps.is_available()
    if device == 'auto':
        device = 'cuda' if gpus else 'mps' if 'mps' in have else 'cpu'
    if device not in have:
        sys.exit(f"error: device={device!r} is not available here (this machine has "
                 f"{', '.join(have)}); use --device=cpu")
    device = torch.device(device)
    if device.type == 'cuda' and local_rank is not None:  # torchrun: this process's GPU
        device = torch.device('cuda', local_rank)
    if dtype == 'auto':
        dtype = 'float32' if device.type != 'cuda' else (
            'bfloat16' if torch.cuda.is_bf16_supported() else 'float16')
    if dtype not in ('float32', 'bfloat16', 'float16'):
        sys.exit(f"error: dtype must be 'auto', 'float32', 'bfloat16' or 'float16'; got {dtype!r}")
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision('high')  # TF32 for float32 matmuls outside autocast
    if deterministic == 'true' or (deterministic == 'auto' and device.type == 'cpu'):
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')  # exact resumes
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, dtype


# dense bf16 peak FLOP/s by a part of the GPU's name, most specific first, for the MFU
PEAK_FLOPS = [
    ("GH200", 989e12), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
    ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("B200", 2250e12), ("B100", 1750e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("RTX A6000", 155e12), ("RTX 6000 Ada", 364e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
    ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops(device):
    """The device's peak dense bf16 FLOP/s, or None where it is not known (CPUs, MPS)."""
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((flops for key, flops in PEAK_FLOPS if name and key in name), None)


def sum_over_processes(stats):
    """The named tensors in stats summed over all processes with one all_reduce (gloo has no
    average) and one host sync, as floats and lists of floats."""
    flat = torch.cat([v.reshape(-1) for v in stats.values()])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flat)
    values, out = flat.tolist(), {}
    for k, v in stats.items():
        out[k], values = (values[:v.numel()] if v.dim() else values[0]), values[v.numel():]
    return out
