"""Export the demo's classifier for inference from C++ (LibTorch), without Python.

Run: python -m attnpool.export [--model demo-output/model.pt] [--out DIR] [--samples N]

Reads the checkpoint ``python -m attnpool.demo`` saves and writes to DIR:

- ``model.pt2``: the whole classifier, ``(tokens [B, L] int64, mask [B, L] bool) ->
  logits [B, num_classes]``, captured by ``torch.export`` (batch size and sequence length
  dynamic) and compiled ahead of time by AOTInductor. C++ runs it with
  ``torch::inductor::AOTIModelPackageLoader`` in a program linked with attnpool, whose
  operator the package calls (``examples/cpp``). The code in it is compiled for this
  machine's CPU (its vector instruction set): export on the kind of machine that runs it.
- ``pooling.pt``: the AttentionPooling weights alone, for ``attnpool::load_state_dict`` into
  a C++ ``attnpool::AttentionPooling(AttentionPoolingOptions(embed_dim).num_heads(n))``.
- ``inputs.pt``: N test sequences from the demo's task: ``tokens`` and ``mask`` (padded to
  the longest of them), ``labels``, and ``features``, the ``[N, L, embed_dim]`` float32
  input the model's pooling receives.
- ``expected.pt``: Python's outputs on those inputs, to compare C++ against: ``logits``,
  ``predictions`` and ``pooled`` (the pooling's output on ``features``).

Every ``.pt`` file is ``torch.save`` of a plain ``dict`` of name -> tensor: C++ reads it
with ``torch::pickle_load`` (no Python, no TorchScript) and writes one Python reads back
with ``torch.load`` using ``torch::pickle_save``. A plain dict because the C++ unpickler
does not rebuild ``collections.OrderedDict``, which is what ``state_dict()`` returns.
"""

import argparse
import os
import sys
import time
import warnings

import torch

import attnpool
from attnpool.demo import Classifier, TaskConfig, make_dataset


def load_demo_model(path: str) -> tuple[Classifier, TaskConfig]:
    """The attention-pooling classifier saved by ``attnpool.demo``, in eval mode."""
    checkpoint = torch.load(path, map_location="cpu")
    config = TaskConfig(**checkpoint["config"])
    pooling = attnpool.AttentionPooling(config.embed_dim, num_heads=config.num_heads)
    model = Classifier(config, pooling)
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), config


def sample_inputs(config: TaskConfig, samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Test sequences of the demo's task, padded to the longest one rather than max_len."""
    tokens, mask, labels = make_dataset(config, samples, torch.Generator().manual_seed(seed))
    length = int(mask.sum(dim=1).max())
    return {
        "tokens": tokens[:, :length].contiguous(),
        "mask": mask[:, :length].contiguous(),
        "labels": labels,
    }


def python_outputs(model: Classifier, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Logits, predictions, and the pooling's input and output, from eager Python."""
    seen = {}

    def record(module, args, output):
        seen["features"], seen["pooled"] = args[0].detach(), output.detach()

    hook = model.pool.register_forward_hook(record)
    try:
        with torch.no_grad():
            logits = model(inputs["tokens"], inputs["mask"])
    finally:
        hook.remove()
    return {"logits": logits, "predictions": logits.argmax(-1), **seen}


def export_aoti(model: Classifier, config: TaskConfig, path: str) -> str:
    """torch.export with dynamic batch and sequence length, then AOTInductor."""
    # Traced on its own small batch: example sizes of 0 or 1, or a batch size
    # equal to the length, would be specialised into the program.
    example = sample_inputs(config, 3, seed=12345)
    tokens, mask = example["tokens"], example["mask"]
    batch, seq_len = torch.export.Dim("batch"), torch.export.Dim("seq_len")
    shapes = ({0: batch, 1: seq_len}, {0: batch, 1: seq_len})
    with warnings.catch_warnings():
        # torch's own pytree code trips this deprecation; nothing to act on here.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        program = torch.export.export(model, (tokens, mask), dynamic_shapes=shapes)
        return torch._inductor.aoti_compile_and_package(program, package_path=path)


def export(model_path: str, out_dir: str, samples: int = 32, seed: int = 1) -> None:
    model, config = load_demo_model(model_path)
    os.makedirs(out_dir, exist_ok=True)
    inputs = sample_inputs(config, samples, seed)
    outputs = python_outputs(model, inputs)
    inputs["features"] = outputs.pop("features")
    torch.save(inputs, os.path.join(out_dir, "inputs.pt"))
    torch.save(outputs, os.path.join(out_dir, "expected.pt"))
    torch.save(dict(model.pool.state_dict()), os.path.join(out_dir, "pooling.pt"))
    start = time.perf_counter()
    export_aoti(model, config, os.path.join(out_dir, "model.pt2"))
    accuracy = (outputs["predictions"] == inputs["labels"]).float().mean().item()
    print(
        f"exported {model_path} to {out_dir}/model.pt2 (AOTInductor, "
        f"{time.perf_counter() - start:.1f} s) and the pooling weights to "
        f"{out_dir}/pooling.pt (AttentionPooling embed_dim={config.embed_dim}, "
        f"num_heads={config.num_heads}); {samples} test inputs in {out_dir}/inputs.pt, "
        f"Python's outputs in {out_dir}/expected.pt (accuracy {accuracy:.1%})"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-output/model.pt", help="saved by attnpool.demo")
    parser.add_argument("--out", default="demo-output/cpp", help="where the files are written")
    parser.add_argument("--samples", type=int, default=32, help="test sequences in inputs.pt")
    parser.add_argument("--seed", type=int, default=1, help="seed of the test sequences")
    args = parser.parse_args(argv)
    if args.samples < 1:
        parser.error(f"--samples must be >= 1, got {args.samples}")
    export(args.model, args.out, args.samples, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
