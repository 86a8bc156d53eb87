"""Frozen base → pooled features, cached on disk by image content.

A cache entry's key is the SHA-256 of the image file's bytes, inside a namespace that hashes the backbone
architecture, its weights identity and the preprocessing. Renaming or moving a file reuses its entry; changing
its bytes, the weights or the preprocessing misses. Each entry is one ``.npy`` file written atomically, so a
killed extraction leaves only complete entries, and an unreadable entry is simply extracted again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import timm.data
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from tlearn.backbones import Backbone, identity_key
from tlearn.data import ImageDecodeError, load_image
from tlearn.fileio import atomic_path, atomic_write_text, file_sha256

# Bump when decoding or preprocessing code changes in a way that changes features.
PIPELINE_VERSION = "pil-1"


def default_workers() -> int:
    """Decoding worker processes when --workers is not given: one per core, at most 4."""
    return min(os.cpu_count() or 1, 4)


def default_cache_dir() -> Path:
    return Path(os.environ.get("TLEARN_CACHE_DIR") or Path.home() / ".cache" / "tlearn").expanduser()


class FeatureCache:
    """Pooled features on disk, one float32 ``.npy`` per image content hash, namespaced by backbone identity."""

    def __init__(self, root: Path | str | None, backbone: Backbone):
        identity = {**backbone.identity(), "pipeline": PIPELINE_VERSION}
        self.dir = Path(root or default_cache_dir()) / "features" / identity_key(identity)
        self.dim = backbone.num_features
        about = self.dir / "identity.json"
        if not about.exists():
            atomic_write_text(about, json.dumps({**identity, "name": backbone.name}, indent=2))

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            feat = np.load(self._path(digest), allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing or damaged: extract (again)
            return None
        return feat if feat.shape == (self.dim,) and feat.dtype == np.float32 else None

    def put(self, digest: str, feat: np.ndarray) -> None:
        with atomic_path(self._path(digest)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(feat, dtype=np.float32), allow_pickle=False)


class ImageFiles(Dataset):
    """Decoded, preprocessed images; a file that fails to decode yields its reason instead of a tensor."""

    def __init__(self, paths: Sequence[Path], transform: Callable):
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, self.transform(load_image(self.paths[i])), ""
        except ImageDecodeError as e:
            return i, None, str(e)


def collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[list[int], torch.Tensor | None,
                                                                        list[tuple[int, str]]]:
    ok = [(i, x) for i, x, _ in items if x is not None]
    failed = [(i, reason) for i, x, reason in items if x is None]
    batch = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], batch, failed


def eval_transform(preprocessing: dict) -> Callable:
    """Resize, centre-crop and normalise as timm's pretrained cfg says (e.g. 256 → 224, bicubic)."""
    return timm.data.create_transform(**preprocessing, is_training=False)


@dataclass
class Features:
    """Features aligned with the input paths; rows of failed paths are zero and listed in ``failed``."""

    X: np.ndarray  # (N, F) float32
    failed: dict[Path, str] = field(default_factory=dict)
    extracted: int = 0
    cached: int = 0
    seconds: float = 0.0


def extract(paths: Sequence[Path], forward: Callable[[torch.Tensor], torch.Tensor], *, transform: Callable,
            dim: int, cache: FeatureCache | None = None, batch_size: int = 32, workers: int | None = None,
            progress: bool = True) -> Features:
    """Outputs of ``forward`` for the images at ``paths``, from the cache where possible, computing only misses.

    ``transform`` turns a PIL image into a (3, H, W) tensor and ``forward`` maps a batch (B, 3, H, W) to
    (B, ``dim``): pooled features for training, or logits for ImageNet prediction.
    """
    start = time.perf_counter()
    X = np.zeros((len(paths), dim), dtype=np.float32)
    failed: dict[Path, str] = {}
    todo: dict[str, list[int]] = {}  # content digest -> rows that need it (duplicates are extracted once)
    for row, path in enumerate(paths):
        try:
            digest = file_sha256(path)
        except OSError as e:
            failed[Path(path)] = f"cannot read: {e.strerror or e}"
            continue
        feat = cache.get(digest) if cache else None
        if feat is None:
            todo.setdefault(digest, []).append(row)
        else:
            X[row] = feat
    cached = len(paths) - len(failed) - sum(len(r) for r in todo.values())
    digests = list(todo)
    files = ImageFiles([paths[todo[d][0]] for d in digests], transform)
    if workers is None:
        workers = default_workers() if len(files) >= 4 * batch_size else 0  # small jobs: no start-up cost
    loader = DataLoader(files, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    n_bad = 0
    with tqdm(total=len(files), unit="img", desc="extracting features", disable=not progress or None,
              leave=False) as bar, torch.inference_mode():
        for ok, batch, bad in loader:
            n_bad += len(bad)
            for i, reason in bad:
                for row in todo[digests[i]]:
                    failed[Path(paths[row])] = reason
            if batch is not None:
                feats = forward(batch).float().cpu().numpy()  # (B, F)
                for i, feat in zip(ok, feats, strict=True):
                    X[todo[digests[i]]] = feat
                    if cache:
                        cache.put(digests[i], feat)
            bar.update(len(ok) + len(bad))
    return Features(X, failed, extracted=len(files) - n_bad, cached=cached, seconds=time.perf_counter() - start)
