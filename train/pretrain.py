"""MAE pre-training with DeepSpeed ZeRO.

    deepspeed --num_gpus 8 train/pretrain.py --config vit_h14_1600ep --data /data/shards \
        --output runs/vit_h [--max-steps N] [--log-every K] [--resume] [--set
        optim.local_batch_size=64 ...]

The task (model, masked loss, k-NN monitor, reconstructions) is `train.mae_task`; the loop,
checkpoints and resume are `train.trainer`'s; the flags and exit codes `train.launch`'s.
"""

import sys
from pathlib import Path

# run as a script by a launcher: import from the repo, not from train/ itself,
if __package__ in (None, ""):
    # whose module names (distributed, evaluate) would shadow packages of the same names.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train import launch
from train.mae_task import MaeTask


def main(argv: list[str] | None = None) -> int:
    return launch.main(MaeTask, argv)


if __name__ == "__main__":
    sys.exit(main())
