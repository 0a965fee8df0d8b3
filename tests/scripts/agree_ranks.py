"""One rank of `train.distributed.agree`: `python agree_ranks.py` under RANK/WORLD_SIZE/MASTER_*.
Rank 1 fails each piece of work in turn (a refusal, then a bug); every rank prints, per piece, the
type and message it raised."""

import json

import torch.distributed as dist

from pipeline.errors import DataError
from train.distributed import agree

dist.init_process_group("gloo")
rank = dist.get_rank()
for kind in (DataError, KeyError):
    def work(kind: type = kind) -> str:
        if rank == 1:
            raise kind("shard train-000003.tar is damaged")
        return "done"

    try:
        print(json.dumps({"result": agree(work, None)}), flush=True)
    except Exception as err:
        print(json.dumps({"type": type(err).__name__, "message": str(err)}), flush=True)
dist.destroy_process_group()
