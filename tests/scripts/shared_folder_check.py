"""One rank of the shared-output check: `python shared_folder_check.py FOLDER` under
RANK/WORLD_SIZE/MASTER_*. Prints "shared" or the error and exits 2."""

import sys
from pathlib import Path

import torch.distributed as dist

from train.checkpoint import ResumeError, check_shared_folder

dist.init_process_group("gloo")
try:
    check_shared_folder(Path(sys.argv[1]))
    print("shared")
    code = 0
except ResumeError as err:
    print(err)
    code = 2
dist.destroy_process_group()
sys.exit(code)
