"""Demo: which pooling can find the token that matters?

Task ("what follows the marker"): each sequence is 8 to 64 random tokens,
padded to a batch, with one MARK token somewhere; the label is the token right
after MARK. The encoder is an embedding plus a linear mix of each token with
its predecessor, deliberately position-wise and linear, so the pooling is the
only place where the model can choose which position to read:

- mean pooling sees a bag of tokens and cannot tell which one followed MARK;
- WeightedPooling learns one weight per position, but MARK moves around;
- AttentionPooling scores each position by content and reads the right one.

Run: python -m attnpool.demo [--epochs N] [--out DIR]
Trains the three models, prints a table, and saves the attention model to
DIR/model.pt (state_dict + config) for later use (e.g. C++ inference).
"""

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import attnpool
from attnpool import reference

PAD, MARK = 0, 1


@dataclass
class TaskConfig:
    num_classes: int = 16  # tokens 2 .. num_classes + 1 are the classes
    min_len: int = 8
    max_len: int = 64
    embed_dim: int = 64
    num_heads: int = 4

    @property
    def vocab_size(self) -> int:
        return self.num_classes + 2


def make_dataset(config: TaskConfig, size: int, generator: torch.Generator):
    """Padded token batches [size, max_len], their masks and labels."""
    lengths = torch.randint(config.min_len, config.max_len + 1, (size,), generator=generator)
    tokens = torch.randint(2, config.vocab_size, (size, config.max_len), generator=generator)
    positions = torch.arange(config.max_len)
    mask = positions[None, :] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, PAD)
    # MARK anywhere but the last real position; the label is what follows it.
    mark_at = (torch.rand(size, generator=generator) * (lengths - 1)).long()
    rows = torch.arange(size)
    tokens[rows, mark_at] = MARK
    labels = tokens[rows, mark_at + 1] - 2
    return tokens, mask, labels


class MeanPooling(nn.Module):
    def forward(self, x, mask=None):
        return reference.mean_pool(x, mask)


class Classifier(nn.Module):
    """Embedding, linear mix with the previous token, pooling, linear head."""

    def __init__(self, config: TaskConfig, pooling: nn.Module):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=PAD)
        self.previous = nn.Linear(config.embed_dim, config.embed_dim, bias=False)
        self.pool = pooling
        self.head = nn.Linear(config.embed_dim, config.num_classes)

    def forward(self, tokens, mask):
        h = self.embed(tokens)
        shifted = nn.functional.pad(h, (0, 0, 1, 0))[:, :-1]
        return self.head(self.pool(h + self.previous(shifted), mask))


def make_pooling(kind: str, config: TaskConfig) -> nn.Module:
    if kind == "attention":
        return attnpool.AttentionPooling(config.embed_dim, num_heads=config.num_heads)
    if kind == "weighted":
        return attnpool.WeightedPooling(config.max_len)
    return MeanPooling()


class ProgressBar:
    def __init__(self, label: str, total: int, width: int = 24):
        self.label, self.total, self.width = label, total, width
        self.interactive = sys.stdout.isatty()

    def update(self, done: int, note: str = "") -> None:
        if not self.interactive and done < self.total:
            return
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        end = "\n" if done >= self.total else ""
        print(f"\r{self.label} [{bar}] {done}/{self.total} {note}", end=end, flush=True)


def accuracy(model, tokens, mask, labels, batch_size=512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(tokens[start : start + batch_size], mask[start : start + batch_size])
            correct += (logits.argmax(-1) == labels[start : start + batch_size]).sum().item()
    return correct / len(labels)


def train(kind, config, train_set, test_set, epochs, batch_size, seed):
    torch.manual_seed(seed)
    model = Classifier(config, make_pooling(kind, config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    tokens, mask, labels = train_set
    batches = (len(labels) + batch_size - 1) // batch_size
    epoch_seconds = []
    for epoch in range(epochs):
        model.train()
        bar = ProgressBar(f"{kind:>9} epoch {epoch + 1}/{epochs}", batches)
        order = torch.randperm(len(labels))
        start_time = time.perf_counter()
        for step in range(batches):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(tokens[idx], mask[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(step + 1, f"loss {loss.item():.3f}")
        epoch_seconds.append(time.perf_counter() - start_time)
    return model, accuracy(model, *test_set), sorted(epoch_seconds)[len(epoch_seconds) // 2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-size", type=int, default=8000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo-output", help="where model.pt is written")
    args = parser.parse_args(argv)

    config = TaskConfig()
    generator = torch.Generator().manual_seed(args.seed)
    train_set = make_dataset(config, args.train_size, generator)
    test_set = make_dataset(config, args.test_size, generator)
    print(
        f"attnpool {attnpool.__version__} demo: label = the token after MARK, "
        f"{config.num_classes} classes (chance {1 / config.num_classes:.1%}), lengths "
        f"{config.min_len}-{config.max_len}; CPU kernels {attnpool._C.cpu_kernel_isa()}, "
        f"{torch.get_num_threads()} threads"
    )

    results = []
    for kind in ("mean", "weighted", "attention"):
        model, acc, seconds = train(
            kind, config, train_set, test_set, args.epochs, args.batch_size, args.seed
        )
        results.append((kind, acc, seconds))
        if kind == "attention":
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, "model.pt")
            torch.save({"config": asdict(config), "state_dict": model.state_dict()}, path)

    print(f"\n{'pooling':<10} {'test accuracy':>13} {'s / epoch':>10}")
    for kind, acc, seconds in results:
        print(f"{kind:<10} {acc:>13.1%} {seconds:>10.2f}")
    print(f"\nsaved the attention-pooling model to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
