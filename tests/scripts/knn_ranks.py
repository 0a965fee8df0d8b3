"""One rank of a k-NN evaluation through the real loaders: `python knn_ranks.py SHARDS` under
RANK/WORLD_SIZE/ MASTER_*. Rank 0 prints the result as JSON."""

import json
import sys

import torch
import torch.distributed as dist

from tests.helpers import tiny_preset_model
from train.knn import knn_monitor

dist.init_process_group("gloo")
torch.manual_seed(0)
model = tiny_preset_model().eval()
monitor = knn_monitor(
    sys.argv[1],
    "val",
    0,
    0,
    local_batch_size=4,
    img_size=64,
    rank=dist.get_rank(),
    world_size=dist.get_world_size(),
    device="cpu",
    num_threads=1,
)
with torch.no_grad():
    result = monitor(model.forward_features, torch.device("cpu"), 20, 0.07)
if dist.get_rank() == 0:
    print(json.dumps(result))
dist.destroy_process_group()
