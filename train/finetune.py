"""Fine-tuning and the linear probe of a pre-trained MAE encoder (He et al. 2021, appendix A.2 and
A.3).

    deepspeed --num_gpus 8 train/finetune.py --config finetune_vit_b16 --data /data/shards --output
    runs/ft_b \
        --set model.init=runs/vit_b [--max-steps N] [--resume] [--set finetune.mode=linear_probe
        ...]

Launched, configured, checkpointed and resumed like train/pretrain.py (same flags, exit codes,
metrics.jsonl, TensorBoard, resume on any rank count). `model.init` is a maeflow pre-training run
folder, a `train.export` file or a reference-layout .pth. The task (classifier, batch augmentation,
top-1 with the best weights in OUTPUT/best.pth) is `train.classifier_task`.
"""

import sys
from pathlib import Path

# run as a script by a launcher: import from the repo, not from train/ itself
if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from train import launch
from train.classifier_task import ClassifierTask


def main(argv: list[str] | None = None) -> int:
    return launch.main(ClassifierTask, argv)


if __name__ == "__main__":
    sys.exit(main())
