"""The tutorial-style script for fast feature extraction, as one whole program: what tlearn replaces.

Usage: python bench/tutorial_features.py DATA OUT

"Deep Learning with Python" (5.3.1) in PyTorch, written plainly as the classic tutorials do: class folders split
70/15/15, the frozen pretrained base run once over each split (PIL decode, timm's eval transform, batch 32,
eager fp32), a Dense(256) + Dropout(0.5) head trained for 30 epochs on the features, the accuracy and loss curves
plotted, and the test accuracy printed. The base is EfficientNet-Lite0 with the same packaged weights tlearn uses,
so both do the same work on the same network. bench/bench_command.py times it as a whole process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import numpy as np
import timm.data
import torch
from PIL import Image
from sklearn.model_selection import train_test_split
from torch import nn

from tlearn.backbones import REGISTRY, _from_package, packaged_weights_file

matplotlib.use("Agg")
import matplotlib.pyplot as plt

data, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
classes = sorted(d.name for d in data.iterdir() if d.is_dir())
files = [(p, i) for i, c in enumerate(classes) for p in sorted((data / c).iterdir())]
labels = np.array([y for _, y in files])
train, rest = train_test_split(np.arange(len(files)), test_size=0.3, stratify=labels, random_state=0)
val, test = train_test_split(rest, test_size=0.5, stratify=labels[rest], random_state=0)

entry = REGISTRY["efficientnet_lite0"]
model = _from_package(entry, packaged_weights_file(entry)).eval()
transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model), is_training=False)


def extract(index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    feats = []
    for i in range(0, len(index), 32):
        x = torch.stack([transform(Image.open(files[j][0]).convert("RGB")) for j in index[i:i + 32]])
        with torch.no_grad():
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True))
    return torch.cat(feats), torch.from_numpy(labels[index])


(X_train, y_train), (X_val, y_val), (X_test, y_test) = extract(train), extract(val), extract(test)
torch.manual_seed(0)
head = nn.Sequential(nn.Linear(X_train.shape[1], 256), nn.ReLU(), nn.Dropout(0.5), nn.Linear(256, len(classes)))
optimizer = torch.optim.Adam(head.parameters(), lr=1e-3)
history = {"acc": [], "val_acc": [], "loss": [], "val_loss": []}
for _ in range(30):  # epochs
    head.train()
    for idx in torch.randperm(len(X_train)).split(20):
        loss = nn.functional.cross_entropy(head(X_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        for X, y, key in ((X_train, y_train, ""), (X_val, y_val, "val_")):
            logits = head(X)
            history[f"{key}loss"].append(nn.functional.cross_entropy(logits, y).item())
            history[f"{key}acc"].append((logits.argmax(1) == y).float().mean().item())

fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
a.plot(history["acc"], "bo", label="Training acc")
a.plot(history["val_acc"], "b", label="Validation acc")
b.plot(history["loss"], "bo", label="Training loss")
b.plot(history["val_loss"], "b", label="Validation loss")
a.legend()
b.legend()
fig.savefig(out / "curves.png")
with torch.no_grad():
    accuracy = (head(X_test).argmax(1) == y_test).float().mean().item()
torch.save(head.state_dict(), out / "head.pt")
print(f"test accuracy {accuracy:.4f}")
