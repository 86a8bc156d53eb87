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
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tlearn.backbones import Backbone
from tlearn.fileio import atomic_path, atomic_write_text, default_cache_dir, file_sha256, identity_key
from tlearn.images import ImageDecodeError, load_image
from tlearn.progress import tqdm

# Bump when decoding or preprocessing code changes in a way that changes features.
PIPELINE_VERSION = "pil-2"


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Decoding worker processes of the training loaders when --workers is not given: one per core, at most 4."""
    return min(cpu_cores(), 4)


class FeatureCache:
    """Pooled features on disk, one float32 ``.npy`` per image content hash, namespaced by backbone identity.

    ``top``, the name of a split point of the base (``models.split_top``), makes it the cache of what enters the
    base's top stage instead: one float16 (C, H, W) activation per image, beside the pooled features and under
    the same rules."""

    def __init__(self, root: Path | str | None, backbone: Backbone, numerics: str = "fp32", view: str = "center",
                 top: str | None = None):
        # fp32 features agree across runtimes to about 1e-5, so they share entries; bf16/fp16 ones get their own
        identity = {**backbone.identity(), "pipeline": PIPELINE_VERSION, "numerics": numerics}
        if view != "center":  # each test-time view (the mirror image, a corner crop) has entries of its own
            identity["view"] = view
        if top is not None:
            identity["top"] = top
        self.view, self.top = view, top
        self.dir = Path(root or default_cache_dir()) / "features" / identity_key(identity)
        self.dim = backbone.num_features
        self.dtype = np.float32 if top is None else np.float16
        about = self.dir / "identity.json"
        if not about.exists():
            atomic_write_text(about, json.dumps({**identity, "name": backbone.name}, indent=2))

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def has(self, digest: str) -> bool:
        return self._path(digest).is_file()

    def get(self, digest: str) -> np.ndarray | None:
        try:
            feat = np.load(self._path(digest), allow_pickle=False)
        except (OSError, ValueError, EOFError):  # missing or damaged: extract (again)
            return None
        if feat.dtype != self.dtype:
            return None
        return feat if (feat.shape == (self.dim,) if self.top is None else feat.ndim == 3) else None

    def put(self, digest: str, feat: np.ndarray) -> None:
        """Written atomically but not synced: an entry torn by a crash fails ``get``'s checks and is made again."""
        with atomic_path(self._path(digest), sync=False) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(feat, dtype=self.dtype), allow_pickle=False)


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


@dataclass
class Features:
    """Features aligned with the input paths; rows of failed paths are zero and listed in ``failed``."""

    X: np.ndarray  # (N, F) float32
    failed: dict[Path, str] = field(default_factory=dict)
    extracted: int = 0
    cached: int = 0
    seconds: float = 0.0


def in_order(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """``pool.map(fn, items)`` with at most ``ahead`` items in flight, so memory stays flat however many there are."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def extract(paths: Sequence[Path], forward: Callable[[torch.Tensor], torch.Tensor | np.ndarray], *,
            transform: Callable, dim: int, cache: FeatureCache | None = None, batch_size: int = 8,
            lanes: int = 1, progress: bool = True) -> Features:
    """Outputs of ``forward`` for the images at ``paths``, from the cache where possible, computing only misses.

    ``transform`` turns a PIL image into a (3, H, W) tensor and ``forward`` maps a batch (B, 3, H, W) to
    (B, ``dim``): pooled features for training, or logits for prediction. ``lanes`` threads each decode a batch
    and run ``forward`` on it (decoding, resizing and the forward pass all release the GIL), so on a CPU with as
    many lanes as cores, no core waits for another; ``forward`` must therefore be safe to call from several
    threads at once.
    """
    return _extract(paths, forward, transform, dim, [cache], [False], batch_size, lanes, progress, [None])[0]


def extract_views(paths: Sequence[Path], forward: Callable, *, transform: Callable, dim: int,
                  caches: list[FeatureCache | None], flips: list[bool], tops: list[FeatureCache | None],
                  batch_size: int = 8, lanes: int = 1, progress: bool = True) -> list[Features]:
    """``extract`` of one or two views (the image, and with ``flips`` [False, True] its mirror image as in
    ``extract_mirrored``) where ``forward`` also gives what enters the base's top stage: it returns (features,
    activations), the features go to ``caches`` and the returned ``Features`` as usual, and the activations only
    to the caches ``tops`` (one per view). An image is computed when any of its caches lacks it."""
    return _extract(paths, forward, transform, dim, caches, flips, batch_size, lanes, progress, tops)


def extract_mirrored(paths: Sequence[Path], forward: Callable[[torch.Tensor], torch.Tensor | np.ndarray], *,
                     transform: Callable, dim: int, caches: tuple[FeatureCache | None, FeatureCache | None],
                     batch_size: int = 8, lanes: int = 1, progress: bool = True) -> tuple[Features, Features]:
    """``extract`` of the images and of their mirror images at once: each image is decoded and resized once, and
    its mirror view is the preprocessed tensor flipped left to right, which is what ``transform`` would give for
    the mirrored picture where the flip commutes with it (a crop resampled first and flipped after, as
    ``images.CropResize`` does). ``caches`` are the two views' caches; both views go through ``forward`` as one
    batch."""
    centre, mirror = extract_views(paths, forward, transform=transform, dim=dim, caches=list(caches),
                                   flips=[False, True], tops=[None, None], batch_size=batch_size, lanes=lanes,
                                   progress=progress)
    return centre, mirror


def _extract(paths: Sequence[Path], forward: Callable, transform: Callable, dim: int,
             caches: list[FeatureCache | None], flips: list[bool], batch_size: int, lanes: int, progress: bool,
             tops: list[FeatureCache | None]) -> list[Features]:
    """One pass over ``paths`` for one or more views, each the transformed image, flipped where ``flips`` says;
    an image is computed when any view's cache (or top-stage cache, ``tops``) lacks it."""
    start = time.perf_counter()
    views = range(len(flips))
    X = [np.zeros((len(paths), dim), dtype=np.float32) for _ in views]
    failed: dict[Path, str] = {}
    todo: dict[str, list[int]] = {}  # content digest -> rows that need it (duplicates are extracted once)
    for row, path in enumerate(paths):
        try:
            digest = file_sha256(path)
        except OSError as e:
            failed[Path(path)] = f"cannot read: {e.strerror or e}"
            continue
        feats = [cache.get(digest) if cache else None for cache in caches]
        if any(f is None for f in feats) or any(top.get(digest) is None for top in tops if top):
            todo.setdefault(digest, []).append(row)
        else:
            for v in views:
                X[v][row] = feats[v]
    cached = len(paths) - len(failed) - sum(len(r) for r in todo.values())
    digests = list(todo)

    def run(batch: list[str]) -> tuple[list[str], list[list[np.ndarray]] | None, list[tuple[str, str]]]:
        images, ok, bad = [], [], []
        for digest in batch:
            try:
                images.append(transform(load_image(paths[todo[digest][0]])))
                ok.append(digest)
            except ImageDecodeError as e:
                bad.append((digest, str(e)))
        if not images:
            return ok, None, bad
        x = torch.stack(images)
        with torch.inference_mode():
            out = forward(torch.cat([x.flip(-1) if flip else x for flip in flips]))
        outs = [o.float().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o, np.float32)
                for o in (out if isinstance(out, (tuple, list)) else [out])]
        return ok, [np.split(o, len(flips)) for o in outs], bad  # [output][view]

    batches = [digests[i:i + batch_size] for i in range(0, len(digests), batch_size)]
    n_bad = 0
    with tqdm(total=len(digests), unit="img", desc="extracting features", disable=not progress or None,
              leave=False) as bar, ThreadPoolExecutor(max(1, lanes), thread_name_prefix="tlearn-lane") as pool:
        for ok, feats, bad in in_order(pool, run, batches, ahead=2 * max(1, lanes)):
            n_bad += len(bad)
            for digest, reason in bad:
                for row in todo[digest]:
                    failed[Path(paths[row])] = reason
            for v in views if feats is not None else ():
                for j, digest in enumerate(ok):
                    X[v][todo[digest]] = feats[0][v][j]
                    if caches[v]:
                        caches[v].put(digest, feats[0][v][j])
                    if tops[v]:
                        tops[v].put(digest, feats[1][v][j])
            bar.update(len(ok) + len(bad))
    seconds = time.perf_counter() - start
    return [Features(X[v], failed, extracted=len(digests) - n_bad, cached=cached, seconds=seconds) for v in views]
