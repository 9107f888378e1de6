#!/usr/bin/env python
"""GenLIP pretraining on megatron-core.

    python pretrain_genlip.py --config examples/configs/demo_cpu.yaml              # CPU demo
    torchrun --nproc-per-node 8 pretrain_genlip.py --config examples/configs/<cfg>.yaml \\
        --set parallel.tp=2 training.train_steps=1000
    srun python pretrain_genlip.py --config ...        # Slurm: one task per GPU

Everything lives in genlip_megatron.run (importable and tested); this file only
forwards the command line.
"""

from genlip_megatron.run import main
from genlip_megatron.training.preemption import exit_process

if __name__ == "__main__":
    exit_process(main())
