"""Train a classifier head on cached features: a visible loop with early stopping, or scikit-learn's
logistic regression folded into the same Linear head."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import nn

from tlearn.config import TrainConfig


def make_head(num_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.2) -> nn.Sequential:
    """Dropout + Linear, or with ``hidden`` > 0: Dropout + Linear + ReLU + Dropout + Linear (the Keras tutorials'
    ``Dense(256, relu)`` head)."""
    if hidden:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, hidden), nn.ReLU(),
                             nn.Dropout(dropout), nn.Linear(hidden, num_classes))
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(num_features, num_classes))


@dataclass
class History:
    """Per-epoch metrics in Keras's vocabulary: ``history["loss"]``, ``["accuracy"]``, ``["val_loss"]``,
    ``["val_accuracy"]``; ``best_epoch`` is the epoch whose weights were kept."""

    epoch: list[int] = field(default_factory=list)
    history: dict[str, list[float]] = field(
        default_factory=lambda: {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []})
    best_epoch: int = 0

    def append(self, epoch: int, **metrics: float) -> None:
        self.epoch.append(epoch)
        for k, v in metrics.items():
            self.history[k].append(float(v))


def train_one_epoch(head: nn.Module, X: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer,
                    batch_size: int, generator: torch.Generator) -> tuple[float, float]:
    """One pass over shuffled mini-batches of (N, F) features; returns mean loss and accuracy."""
    head.train()
    total_loss, correct = 0.0, 0
    for idx in torch.randperm(len(X), generator=generator).split(batch_size):
        logits = head(X[idx])  # (B, C)
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total_loss += loss.item() * len(idx)
        correct += (logits.argmax(1) == y[idx]).sum().item()
    return total_loss / len(X), correct / len(X)


@torch.no_grad()
def evaluate(head: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean loss and accuracy of ``head`` on (N, F) features, in eval mode."""
    head.eval()
    logits = head(X)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def fit_head(X_train: np.ndarray, y_train: np.ndarray, X_val: np.ndarray, y_val: np.ndarray, num_classes: int,
             config: TrainConfig, on_epoch=None) -> tuple[nn.Sequential, History]:
    """Train a head on features; the weights of the epoch with the lowest validation loss are restored."""
    Xt, yt = torch.from_numpy(X_train), torch.from_numpy(y_train).long()
    Xv, yv = torch.from_numpy(X_val), torch.from_numpy(y_val).long()
    if config.head == "logreg":
        head = _logreg_head(X_train, y_train, num_classes, config)
        history = History(best_epoch=1)
        loss, acc = evaluate(head, Xt, yt)
        val_loss, val_acc = evaluate(head, Xv, yv)
        history.append(1, loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
        return head, history

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    head = make_head(Xt.shape[1], num_classes, config.hidden, config.dropout)
    opt = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history, best_loss, best_state, waited = History(), float("inf"), None, 0
    for epoch in range(1, config.epochs + 1):
        loss, acc = train_one_epoch(head, Xt, yt, opt, config.batch_size, generator)
        val_loss, val_acc = evaluate(head, Xv, yv)
        history.append(epoch, loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc)
        if on_epoch:
            on_epoch(epoch, history)
        if val_loss < best_loss:
            best_loss, best_state, history.best_epoch, waited = val_loss, copy.deepcopy(head.state_dict()), epoch, 0
        else:
            waited += 1
            if waited >= config.patience:
                break
    head.load_state_dict(best_state)
    return head.eval(), history


def _logreg_head(X: np.ndarray, y: np.ndarray, num_classes: int, config: TrainConfig) -> nn.Sequential:
    """scikit-learn's multinomial logistic regression on standardised features, folded into one Linear layer
    so that it is saved, loaded and served exactly like the dense head."""
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=2000, random_state=config.seed)
    clf.fit(scaler.transform(X), y)
    coef, bias = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one logit z for class 1; softmax([0, z]) == sigmoid(z)
        coef, bias = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, bias[0]])
    if clf.classes_.tolist() != list(range(num_classes)):
        raise ValueError("logistic regression saw only some classes")  # a split without a class is caught earlier
    # (x - mean) / scale @ W.T + b  ==  x @ (W / scale).T + (b - W @ (mean / scale))
    weight = coef / scaler.scale_
    head = make_head(X.shape[1], num_classes, hidden=0, dropout=0.0)
    with torch.no_grad():
        head[1].weight.copy_(torch.from_numpy(weight))
        head[1].bias.copy_(torch.from_numpy(bias - weight @ scaler.mean_))
    return head.eval()
