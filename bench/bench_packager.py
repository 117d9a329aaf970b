"""Packager benchmark: per profile, what quantization buys on each model, against FP32 in the same run.

Models: the two example models (digits MLP, digits CNN) and a MobileNet-class conv net
(MobileNetV1 layout, depthwise-separable blocks, >1M parameters) trained here with torch on the
digits images upsampled to 32x32. Each is packaged for every profile with the real pipeline; the
table shows the chosen recipe, size ratio, accuracy and agreement, and p50 latency ratio vs the
FP32 source on the CPU provider (single thread, batch 1).

``python -m bench.bench_packager [--quick] [--json OUT] [--profile ID] [--no-cache]``. The trained
MobileNet is cached (``~/.cache/edgefleet/bench``; deterministic seed, so the cache is exact);
``--quick`` times fewer runs and packages the MobileNet for cpu-x86_64 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# MobileNetV1 (Howard et al. 2017) depthwise-separable blocks: (out channels, stride).
MOBILENET_BLOCKS = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
]
IMAGE = 32
EPOCHS = 4


def cache_dir() -> Path:
    """Where trained bench models are kept between runs (``EDGEFLEET_BENCH_CACHE`` overrides)."""
    default = Path.home() / ".cache" / "edgefleet" / "bench"
    return Path(os.environ.get("EDGEFLEET_BENCH_CACHE", str(default)))


def mobilenet(epochs: int, *, use_cache: bool, seed: int = 0) -> dict[str, Any]:
    """The trained MobileNet files, from the cache when an identical training run is there."""
    key = f"mobilenet-v1-{IMAGE}px-e{epochs}-s{seed}-torch{_torch_version()}"
    out = cache_dir() / key
    info = out / "info.json"
    if use_cache and info.exists():
        meta = json.loads(info.read_text())
        meta["cached"] = True
    else:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=_mkdir(cache_dir())))
        meta = build_mobilenet(tmp, epochs=epochs, seed=seed)
        (tmp / "info.json").write_text(
            json.dumps({"params": meta["params"], "train_s": meta["train_s"]})
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        meta["cached"] = False
    meta |= {
        n: out / f"{n}.{'onnx' if n == 'model' else 'npz'}"
        for n in ("model", "calibration", "validation")
    }
    return meta


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _torch_version() -> str:
    import torch

    return str(torch.__version__).split("+")[0]


def build_mobilenet(out_dir: Path, *, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Train the MobileNet-class net on upsampled digits; write model + calibration/validation."""
    import torch
    from torch import nn
    from torch.nn import functional as F

    from edgefleet.packager.examples import N_CALIBRATION, digits_split
    from edgefleet.packager.npzio import save_npz

    torch.manual_seed(seed)
    split = digits_split()

    def upsample(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x.reshape(-1, 1, 8, 8))
        return F.interpolate(t, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False).numpy()

    x_train, x_val = upsample(split.x_train), upsample(split.x_val)

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    layers: list[nn.Module] = [conv_bn(1, 32, 3, 1)]
    cin = 32
    for cout, stride in MOBILENET_BLOCKS:
        layers += [conv_bn(cin, cin, 3, stride, groups=cin), conv_bn(cin, cout, 1, 1)]
        cin = cout
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))
    params = sum(p.numel() for p in net.parameters())
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(split.y_train)
    batch = 64
    steps = len(xt) // batch  # the last partial batch is dropped (BatchNorm on 3 images is noise)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for i in range(steps):
            idx = order[i * batch : (i + 1) * batch]
            opt.zero_grad()
            loss = F.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
    train_s = time.perf_counter() - start
    net.eval()
    model = nn.Sequential(net, nn.Softmax(dim=1))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(x_val[:1]),),
        str(path),
        input_names=["image"],
        output_names=["probabilities"],
        dynamic_axes={"image": {0: "N"}, "probabilities": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    save_npz(out_dir / "calibration.npz", {"image": x_train[:N_CALIBRATION]})
    save_npz(out_dir / "validation.npz", {"image": x_val, "labels": split.y_val})
    return {
        "model": path,
        "calibration": out_dir / "calibration.npz",
        "validation": out_dir / "validation.npz",
        "params": params,
        "train_s": train_s,
    }


def dynamic_conv_probe(
    m: dict[str, Any], work: Path, src: dict[str, Any], runs: int, seconds: float
) -> dict[str, Any]:
    """Dynamic INT8 with Conv included (ConvInteger): why the profiles keep dynamic off Conv."""
    from edgefleet.packager.benchmark import measure
    from edgefleet.packager.evaluate import compare, run_all, session
    from edgefleet.packager.npzio import load_npz
    from edgefleet.packager.quantize import build_candidate, model_size, preprocess
    from edgefleet.packager.recipe import parse_recipe

    work.mkdir(parents=True, exist_ok=True)
    recipe = parse_recipe(
        {"id": "probe", "method": "dynamic", "op_types": ["Conv", "MatMul", "Gemm"]}, "probe"
    )
    prepared, _ = preprocess(m["model"], work / "prep.onnx", external=False)
    out = build_candidate(
        recipe,
        source=m["model"],
        prepared=prepared,
        out=work / "dyn-conv.onnx",
        calibration=load_npz(m["calibration"]),
        external=False,
    )
    val = load_npz(m["validation"])
    inputs = {k: v for k, v in val.items() if k != "labels"}
    sess, ref = session(out), session(m["model"])
    lat = measure(sess, inputs, runs=runs, max_seconds=seconds)
    metrics = compare(run_all(ref, inputs), run_all(sess, inputs))
    return {
        "candidate": "probe: dynamic INT8 incl. Conv (ConvInteger)",
        "p50_ms": lat.p50_ms,
        "speedup": src["p50_ms"] / lat.p50_ms,
        "agreement": metrics.agreement,
        "size_ratio": model_size(out) / src["size_bytes"],
        "accepted": "n/a",
        "chosen": False,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_packager")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timed runs")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--profile", action="append", help="only these profiles (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="retrain the MobileNet")
    args = parser.parse_args(argv)

    from edgefleet.keys import generate_keypair
    from edgefleet.packager.examples import build_examples
    from edgefleet.packager.pipeline import package_model
    from edgefleet.packager.profiles import load_profiles

    console = Console(width=max(Console().width, 150))
    profiles = args.profile or list(load_profiles())
    runs, seconds = (30, 0.5) if args.quick else (300, 3.0)
    rows: list[dict[str, Any]] = []
    search: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-packager-") as tmp_dir:
        tmp = Path(tmp_dir)
        key = generate_keypair(tmp / "keys", "bench")
        t0 = time.perf_counter()
        models: dict[str, dict[str, Any]] = {
            name: {"model": ex.model, "calibration": ex.calibration, "validation": ex.validation}
            for name, ex in build_examples(tmp / "examples").items()
        }
        console.print(f"example models built in {time.perf_counter() - t0:.1f}s")
        mnet = mobilenet(EPOCHS, use_cache=not args.no_cache)
        models["mobilenet-digits32"] = mnet
        console.print(
            f"mobilenet-digits32: {mnet['params'] / 1e6:.2f}M parameters, trained in "
            f"{mnet['train_s']:.1f}s{' (cached in ' + str(cache_dir()) + ')' if mnet['cached'] else ''}"
        )
        for name, m in models.items():
            t0 = time.perf_counter()
            report = package_model(
                m["model"],
                name=name,
                version="1.0.0",
                profiles=(
                    [p for p in profiles if p == "cpu-x86_64"] or profiles
                    if args.quick and name.startswith("mobilenet")
                    else profiles
                ),
                calibration=m["calibration"],
                validation=m["validation"],
                key=key.private_path,
                out_dir=tmp / "packages",
                bench_runs=runs,
                bench_seconds=seconds,
                training_run="bench",
            )
            elapsed = time.perf_counter() - t0
            src = report.source
            for p in report.profiles:
                row: dict[str, Any] = {
                    "model": name,
                    "profile": p.profile,
                    "status": p.status,
                    "recipe": p.chosen,
                    "source_accuracy": src["accuracy"],
                    "source_p50_ms": src["p50_ms"],
                    "package_s": elapsed,
                }
                if p.ok and p.metrics and p.latency and p.size_bytes:
                    row |= {
                        "size_ratio": p.size_bytes / src["size_bytes"],
                        "accuracy": p.metrics.accuracy,
                        "agreement": p.metrics.agreement,
                        "p50_ms": p.latency.p50_ms,
                        "speedup": src["p50_ms"] / p.latency.p50_ms,
                    }
                else:
                    row["failure"] = p.failure
                rows.append(row)
                if name.startswith("mobilenet") and p.profile == "cpu-x86_64":
                    search = [
                        {
                            "candidate": c.candidate,
                            "p50_ms": c.p50_ms,
                            "speedup": src["p50_ms"] / c.p50_ms if c.p50_ms else None,
                            "agreement": c.metrics.agreement if c.metrics else None,
                            "size_ratio": (c.size_bytes or 0) / src["size_bytes"],
                            "accepted": c.accepted,
                            "chosen": c.chosen,
                        }
                        for c in p.candidates
                    ]
                    search.append(dynamic_conv_probe(m, tmp / "probe", src, runs, seconds))
    table = Table(
        title="packager: chosen recipe per profile vs FP32 source (CPU provider, 1 thread)"
    )
    for col in (
        "model",
        "profile",
        "recipe",
        "size x",
        "acc src->pkg",
        "agree",
        "p50 ms",
        "speedup",
    ):
        table.add_column(col)
    for r in rows:
        if r["status"] != "packaged":
            table.add_row(r["model"], r["profile"], f"[red]{r['status']}[/]", "", "", "", "", "")
            continue
        table.add_row(
            r["model"],
            r["profile"],
            r["recipe"],
            f"{r['size_ratio']:.2f}",
            f"{r['source_accuracy']:.4f}->{r['accuracy']:.4f}",
            f"{r['agreement']:.4f}",
            f"{r['p50_ms']:.3f} (fp32 {r['source_p50_ms']:.3f})",
            f"{r['speedup']:.2f}x",
        )
    console.print(table)
    if search:
        st = Table(
            title="mobilenet-digits32 on cpu-x86_64: every candidate (+ dynamic INT8 on Conv)"
        )
        for col in ("candidate", "p50 ms", "speedup", "agree", "size x", "within gate", "chosen"):
            st.add_column(col)
        for c in search:
            st.add_row(
                c["candidate"],
                f"{c['p50_ms']:.3f}" if c["p50_ms"] else "-",
                f"{c['speedup']:.2f}x" if c["speedup"] else "-",
                f"{c['agreement']:.4f}" if c["agreement"] is not None else "-",
                f"{c['size_ratio']:.2f}",
                str(c["accepted"]),
                "yes" if c["chosen"] else "",
            )
        console.print(st)
    target = next(
        (r for r in rows if r["model"] == "mobilenet-digits32" and r["profile"] == "cpu-x86_64"),
        None,
    )
    if target and target["status"] == "packaged":
        lost = (target["source_accuracy"] - target["accuracy"]) * 100
        ok = target["speedup"] >= 2 and lost <= 1 and target["size_ratio"] <= 0.3
        console.print(
            f"MobileNet INT8 CPU target (>=2x faster, <=1 point lost, <=0.3x size): "
            f"{target['speedup']:.2f}x, {lost:.2f} points, {target['size_ratio']:.2f}x "
            f"-> {'[green]met[/]' if ok else '[yellow]not met[/]'}"
        )
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "search": search}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
