"""Multi-process parallelism over torch.distributed (NCCL on GPUs, gloo on CPUs)."""
