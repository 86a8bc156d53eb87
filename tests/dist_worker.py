"""Run by tests/test_dist.py under the real launcher (``python -m torch.distributed.run --nproc-per-node 2``):
what one process of a data-parallel run sees, written to OUT/rank<R>.json for the test to compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import TINY
from tlearn import ImageClassifier, dist
from tlearn.data import DataConfig, scan
from tlearn.features import ImageFiles
from tlearn.recipes.images import _image_batches
from tlearn.runtime import Engine


def shards(data: Path) -> dict:
    """The training and evaluation images each process's batches hold, over two epochs."""
    seen: list[str] = []
    original = ImageFiles.__getitem__

    def record(self: ImageFiles, i: int):
        seen.append(str(self.paths[i]))
        return original(self, i)

    ImageFiles.__getitem__ = record
    clf = ImageClassifier(**TINY, verbose=False, workers=0, batch_size=8, mode="finetune")
    clf._join_processes()
    folder = scan(DataConfig(path=str(data)))
    job = type("Job", (), {"runtime": clf.runtime, "train": clf.train_config, "run": clf.extractor.run,
                           "data": folder})()
    generator = torch.Generator().manual_seed(0)
    train = _image_batches(job, folder.split("train"), lambda image: torch.zeros(3, 8, 8), {}, generator)
    epochs = []
    for _ in range(2):
        seen.clear()
        sizes = [len(y) for _, y in train()]
        epochs.append({"paths": list(seen), "batch_sizes": sizes})
    seen.clear()
    list(_image_batches(job, folder.split("validation"), lambda image: torch.zeros(3, 8, 8), {})())
    return {"train": epochs, "validation": list(seen), "all_train": [str(s.path) for s in folder.split("train")],
            "all_validation": [str(s.path) for s in folder.split("validation")]}


def extract(data: Path) -> dict:
    """The images each process extracts itself when the cache is filled, and what every process reads back."""
    extracted: list[str] = []
    original = Engine.extract

    def record(self: Engine, paths, cache=None, progress=True, view="center"):
        out = original(self, paths, cache, progress, view)
        if out.extracted:  # the sharded pass; the reading pass that follows finds everything cached
            extracted.extend(str(p) for p in paths)
        return out

    Engine.extract = record
    clf = ImageClassifier(**TINY, verbose=False, workers=0, mode="features")
    clf._join_processes()
    paths = sorted(Path(data).rglob("*.png"))
    feats = clf.extractor.features(paths)
    return {"extracted": extracted, "rows": len(feats.X), "cached_after": feats.cached,
            "checksum": float(feats.X.sum())}


def race(data: Path) -> dict:
    """Both processes write the same cache entries at the same time, again and again, and read them back."""
    import numpy as np

    from tlearn.backbones import BackboneConfig, load_backbone
    from tlearn.features import FeatureCache

    dist.init(torch.device("cpu"))
    cache = FeatureCache(data / "cache", load_backbone(BackboneConfig(**TINY)))
    digests = [f"{i:064x}" for i in range(40)]
    dist.barrier()
    for _ in range(5):
        for i, digest in enumerate(digests):
            cache.put(digest, np.full(cache.dim, i, dtype=np.float32))
    dist.barrier()
    got = [cache.get(d) for d in digests]
    return {"intact": all(g is not None and float(g[0]) == i and (g == g[0]).all() for i, g in enumerate(got))}


def uneven(_data: Path) -> dict:
    """One epoch in which rank 1 has one batch fewer than rank 0 (its last batch failed to decode)."""
    from torch.nn.parallel import DistributedDataParallel

    from tlearn.train import CPU, train_one_epoch

    dist.init(torch.device("cpu"))
    torch.manual_seed(0)
    model = CPU.module(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(3, 4), torch.tensor([0, 1, 0])) for _ in range(4 - dist.rank())]
    parallel = DistributedDataParallel(model)
    loss, accuracy = train_one_epoch(parallel, batches, opt, CPU)
    del parallel  # before the process group goes: its reducer holds the group's work
    dist.barrier()
    return {"loss": loss, "accuracy": accuracy, "weight": model.weight.detach().sum().item()}


if __name__ == "__main__":
    what, data, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    result = {"shards": shards, "extract": extract, "uneven": uneven, "race": race}[what](data)
    (out / f"rank{dist.rank()}.json").write_text(json.dumps({"rank": dist.rank(), "world": dist.world_size(),
                                                              **result}))
    dist.finish()
