"""Packager benchmark on real pretrained models: per model x profile, what each package costs and buys.

Models: the pretrained zoo (:mod:`edgefleet.packager.zoo`: ResNet-50 Open-NSFW, PP-OCRv4 text
detection/recognition and direction classifier, MTCNN R-Net/O-Net, Silero VAD; each where its
extra is installed) and a MobileNet-class conv net trained and exported here with torch (the
``bench`` extra). Every model is packaged for every profile by the real pipeline
(``package_model``: calibration set, gate judged on the confident validation set), and measured
in the same run, at one intra-op thread, side by side with its FP32 source and with plain ONNX
Runtime (its ``quant_pre_process``, then ``quantize_static``: QDQ U8S8, per channel,
``reduce_range=False``, MinMax): latency
ratios, size, and agreement on the confident and on the hard (low-confidence) inputs, judged per
task (:func:`edgefleet.packager.zoo.agreement`).

``python -m bench packager [--quick] [--json OUT] [--profile ID] [--model NAME] [--no-vendor]``.
With a vendor backend's extra installed (``nncf``), the profile it serves also gets that
backend's candidate for the run (shown as ``profile+backend``). ``--quick``: one small model,
two profiles, few timed runs (a smoke test).
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
from rich.markup import escape
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


def task_judging(task: str) -> Any:
    """How the packager's gates judge a zoo task's agreement (the same sense as the table's):
    DB text maps binarised at 0.3, CTC strings, a voice-activity decision at 0.5."""
    from edgefleet.packager.evaluate import Judging

    return {
        "text-detection": Judging("map", threshold=0.3),
        "text-recognition": Judging("ctc"),
        "vad": Judging("binary"),
    }.get(task, Judging())


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


def own_export(use_cache: bool) -> dict[str, Any] | None:
    """The MobileNet-class net trained and exported here (needs torch), as a bench model set."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    from edgefleet.packager.evaluate import run_all, session
    from edgefleet.packager.npzio import load_npz, save_npz
    from edgefleet.packager.zoo import split, task_confidence

    m = mobilenet(EPOCHS, use_cache=use_cache)
    val = load_npz(m["validation"])
    x = val["image"]
    conf = task_confidence("classifier", run_all(session(m["model"]), {"image": x}))
    n_val = len(x) // 3
    _, confident, hard = split(conf, 0, n_val, seed=0)
    out = Path(m["model"]).parent
    save_npz(out / "confident.npz", {"image": x[confident], "labels": val["labels"][confident]})
    save_npz(out / "hard.npz", {"image": x[hard], "labels": val["labels"][hard]})
    return {
        "name": "mobilenet-digits32",
        "model": m["model"],
        "calibration": m["calibration"],
        "confident": out / "confident.npz",
        "hard": out / "hard.npz",
        "task": "classifier",
        "cnn": True,
        "source": f"own export: MobileNetV1 layout, {m['params'] / 1e6:.2f}M params, torch",
    }


def zoo_sets(names: list[str], out: Path, quick: bool) -> tuple[list[dict[str, Any]], list[str]]:
    from edgefleet.packager import zoo

    sets, skipped = [], []
    for name in names:
        why = zoo.unavailable(name)
        if why:
            skipped.append(f"{name}: {why}")
            continue
        t0 = time.perf_counter()
        sizes = {"n_calibration": 32, "n_validation": 32} if quick else {}
        zs = zoo.prepare(name, out, **sizes)  # type: ignore[arg-type]
        m = zoo.MODELS[name]
        sets.append(
            {
                "name": name,
                "model": zs.model,
                "calibration": zs.calibration,
                "confident": zs.confident,
                "hard": zs.hard,
                "task": m.task,
                "cnn": m.cnn,
                "source": f"{m.distribution} {zs.info['version']}: {m.architecture}",
                "prepare_s": time.perf_counter() - t0,
            }
        )
    return sets, skipped


def vendor_profiles(profiles: list[str]) -> tuple[list[Any], dict[str, str]]:
    """The profiles, each given its vendor backend's candidate when that backend can run here."""
    from dataclasses import replace

    from edgefleet.packager.backends import BackendUnavailable, get
    from edgefleet.packager.profiles import get_profile
    from edgefleet.packager.recipe import Recipe

    vendor: dict[str, list[Recipe]] = {
        "npu-openvino": [
            Recipe(
                "nncf-int8-mixed",
                "static",
                backend="nncf",
                backend_options={"preset": "mixed", "target_device": "NPU"},
            ),
        ],
        "fpga-vitisai": [
            Recipe(
                "quark-xint8-cle",
                "static",
                activation_type="QInt8",
                power_of_two=True,
                backend="quark",
                backend_options={"config": "XINT8", "algorithms": ["cle"]},
            ),
            Recipe(
                "quark-xint8-cle-adaround",
                "static",
                activation_type="QInt8",
                power_of_two=True,
                backend="quark",
                backend_options={
                    "config": "XINT8",
                    "algorithms": ["cle", "adaround"],
                    "iterations": ADAROUND_ITERATIONS,
                },
            ),
        ],
        "npu-qnn": [
            Recipe("aimet-a16w8-htp", "qnn", activation_type="QUInt16", backend="aimet"),
            Recipe("aimet-a8w8-htp", "qnn", activation_type="QUInt8", backend="aimet"),
        ],
    }
    out, labels = [], {}
    for pid in profiles:
        p = get_profile(pid)
        shipped = {c.backend for c in p.candidates}
        extra = []
        for r in vendor.get(pid, []):
            if r.backend in shipped:
                continue
            try:
                get(r.backend)
            except BackendUnavailable:
                continue
            extra.append(r)
        if extra:
            p = replace(p, candidates=(*p.candidates, *extra))
            labels[pid] = f"{pid}+{extra[0].backend}"
        out.append(p)
    return out, labels


def _package_model_file(package: Path, out: Path) -> Path:
    """The model.onnx inside a built package (the bench's own output; no trust decision)."""
    import tarfile

    with tarfile.open(package) as tar:
        member = tar.extractfile("model.onnx")
        assert member is not None
        out.write_bytes(member.read())
    return out


def _measure_model(
    path: Path, task: str, ref: dict[str, Any], data: dict[str, Any], runs: int, seconds: float
) -> dict[str, Any]:
    from edgefleet.packager.benchmark import measure
    from edgefleet.packager.evaluate import run_all, session
    from edgefleet.packager.quantize import model_size
    from edgefleet.packager.zoo import task_agreement

    sess = session(path, threads=1)
    row: dict[str, Any] = {"size_bytes": model_size(path)}
    for k in ("confident", "hard"):
        got = run_all(sess, data[k])
        ok = task_agreement(task, ref[k], got)
        row[f"agree_{k}"] = (int(ok.sum()), len(ok))
    row["p50_ms"] = measure(sess, data["confident"], runs=runs, max_seconds=seconds).p50_ms
    return row


def plain_pre_process(model: Path, out: Path) -> Path:
    """ONNX Runtime's own ``quant_pre_process``, as a user of plain ORT runs it (the packager's
    pre-processing does more: it folds batch-norm arithmetic into convolutions); the source
    model when it fails."""
    import contextlib

    from onnxruntime.quantization.shape_inference import quant_pre_process

    # Symbolic shape inference may leave a temp file in the working directory.
    with contextlib.chdir(out.parent):
        for skip in (False, True):
            try:
                quant_pre_process(str(model), str(out), skip_symbolic_shape=skip)
                return out
            except Exception:
                continue
    return model


def bench_model(
    m: dict[str, Any],
    profiles: list[Any],
    labels: dict[str, str],
    key: Path,
    work: Path,
    runs: int,
    seconds: float,
) -> list[dict[str, Any]]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgefleet.packager.evaluate import run_all, session
    from edgefleet.packager.npzio import load_npz
    from edgefleet.packager.pipeline import package_model
    from edgefleet.packager.quantize import make_reader

    work.mkdir(parents=True, exist_ok=True)
    fp32 = session(m["model"], threads=1)
    names = [i.name for i in fp32.get_inputs()]
    data = {k: {n: load_npz(m[k])[n] for n in names} for k in ("confident", "hard")}
    cal = {n: load_npz(m["calibration"])[n] for n in names}
    ref = {k: run_all(fp32, v) for k, v in data.items()}
    rows: list[dict[str, Any]] = []
    base = {"model": m["name"], "cnn": m["cnn"], "task": m["task"]}
    src = _measure_model(m["model"], m["task"], ref, data, runs, seconds)
    rows.append(base | {"profile": "-", "what": "FP32 source", "status": "source"} | src)
    t0 = time.perf_counter()
    plain = work / "plain-ort.onnx"
    try:
        prepared = plain_pre_process(m["model"], work / "prep.onnx")
        quantize_static(
            str(prepared),
            str(plain),
            make_reader(prepared, cal),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=False,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        p = _measure_model(plain, m["task"], ref, data, runs, seconds)
        rows.append(
            base
            | {"profile": "-", "what": "plain ORT quantize_static", "status": "baseline"}
            | p
            | {"package_s": time.perf_counter() - t0}
        )
    except Exception as exc:
        rows.append(base | {"profile": "-", "what": "plain ORT", "status": f"failed: {exc}"})
    t0 = time.perf_counter()
    report = package_model(
        m["model"],
        name=m["name"],
        version="1.0.0",
        profiles=profiles,
        calibration=m["calibration"],
        validation=m["confident"],
        key=key,
        out_dir=work / "packages",
        bench_runs=runs,
        bench_seconds=seconds,
        training_run="bench",
        judging=task_judging(m["task"]),
    )
    shared_s = time.perf_counter() - t0 - sum(pr.seconds for pr in report.profiles)
    for pr in report.profiles:
        row = base | {
            "profile": labels.get(pr.profile, pr.profile),
            "status": pr.status,
            "what": pr.chosen or "-",
            # This profile's own search and packaging; the source's preparation (shared by
            # all profiles) is reported once, on the FP32 row.
            "package_s": pr.seconds,
            "backends_tried": sorted({c.backend for c in pr.candidates if not c.skipped}),
            "provider_on_host": pr.provider_on_host,
            "validated_on": pr.validated_on,
            "candidates": [c.to_dict() for c in pr.candidates],
        }
        if pr.ok and pr.package is not None:
            chosen = next(c for c in pr.candidates if c.candidate == pr.chosen)
            row["backend"] = chosen.backend  # the toolkit that built it, after any fallback
            model = _package_model_file(pr.package, work / f"{pr.profile}.onnx")
            row |= _measure_model(model, m["task"], ref, data, runs, seconds)
        else:
            row["failure"] = pr.failure
        rows.append(row)
    rows[0]["package_s"] = shared_s
    for r in rows:
        if "p50_ms" in r:
            r["vs_fp32"] = src["p50_ms"] / r["p50_ms"]
            if rows[1].get("p50_ms"):
                r["vs_plain"] = rows[1]["p50_ms"] / r["p50_ms"]
            r["size_x"] = r["size_bytes"] / src["size_bytes"]
    return rows


def _frac(a: tuple[int, int] | None) -> str:
    return f"{a[0]}/{a[1]}" if a else "-"


def vendor_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What each vendor backend's candidate did (chosen or not), from the pipeline's search."""
    lines = []
    for r in rows:
        for c in r.get("candidates", []):
            asked = c["recipe"].get("backend", "ort")
            if asked == "ort":
                continue
            backend = c.get("backend") or asked
            if c.get("skipped"):  # e.g. only-if-needed once a cheaper one passed: null backend
                backend = f"{asked} recipe"
                what = f"not built: {c['skipped']}"
            elif c["error"]:
                what = f"[red]failed[/]: {str(c['error'])[:160]}"
            else:
                what = (
                    f"agreement {c['agreement']:.3f}, p50 {c['p50_ms']:.3f} ms, "
                    f"{'within gate' if c['accepted'] else 'gate missed'}"
                    f"{', chosen' if c['chosen'] else ''}"
                )
            if not c.get("skipped") and backend != asked:  # extra absent: ort built the recipe
                backend = f"{asked} -> {backend}: {c.get('backend_note') or ''}"[:120]
            lines.append(f"  {r['model']} {r['profile']} {c['candidate']} ({backend}): {what}")
    return (
        (["vendor candidates (pipeline's validation set, CPU provider):", *lines]) if lines else []
    )


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, checked on the measured rows: one line per model/profile verdict."""
    lines = []
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        plain = next((r for r in mine if r["status"] == "baseline"), None)
        cpu = next((r for r in mine if r["profile"].startswith("cpu-x86_64")), None)
        if mine[0]["cnn"] and cpu is not None and plain is not None:
            if cpu["status"] != "packaged":
                lines.append(f"{name}: cpu-x86_64 produced no package -> [red]missed[/]")
            else:
                lost_pkg = [n - k for k, n in (cpu["agree_confident"], cpu["agree_hard"])]
                lost_plain = [n - k for k, n in (plain["agree_confident"], plain["agree_hard"])]
                ok = (
                    cpu["vs_fp32"] >= 1.8
                    and cpu["vs_plain"] >= 0.95
                    and all(a <= b for a, b in zip(lost_pkg, lost_plain, strict=True))
                )
                lines.append(
                    f"{name}: cpu-x86_64 {cpu['vs_fp32']:.2f}x FP32, {cpu['vs_plain']:.2f}x plain "
                    f"ORT, disagreements {lost_pkg} vs plain {lost_plain} (confident, hard) -> "
                    f"{'[green]met[/]' if ok else '[yellow]missed[/]'}"
                )
        missing = [
            r["profile"]
            for r in mine
            if r["profile"] != "-"
            and (
                r["status"] != "packaged"
                or r["agree_confident"][0] < 0.97 * r["agree_confident"][1]
            )
        ]
        lines.append(
            f"{name}: a package >= 97 % agreement for every profile -> "
            + ("[green]met[/]" if not missing else f"[yellow]missed[/] ({', '.join(missing)})")
        )
    return lines


# AdaRound's steps per layer: Quark's default is 1000 (minutes of CPU on a MobileNet); the bench
# uses fewer so that a run fits in a CI-sized budget.
ADAROUND_ITERATIONS = 200

ZOO_ORDER = (
    "open-nsfw",
    "ppocr-cls",
    "ppocr-det",
    "ppocr-rec",
    "mtcnn-rnet",
    "mtcnn-onet",
    "silero-vad",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_packager")
    parser.add_argument("--quick", action="store_true", help="one small model, two profiles")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--profile", action="append", help="only these profiles (repeatable)")
    parser.add_argument("--model", action="append", help="only these models (repeatable)")
    parser.add_argument("--no-cache", action="store_true", help="retrain the own-export model")
    parser.add_argument("--no-vendor", action="store_true", help="shipped profiles only")
    args = parser.parse_args(argv)

    from edgefleet.keys import generate_keypair
    from edgefleet.packager.profiles import get_profile, load_profiles

    console = Console(width=max(Console().width, 170))
    quick = args.quick
    profile_ids = args.profile or (
        ["cpu-x86_64", "npu-openvino"] if quick else list(load_profiles())
    )
    profiles, labels = (
        ([get_profile(p) for p in profile_ids], {})
        if args.no_vendor
        else vendor_profiles(profile_ids)
    )
    runs, seconds = (20, 0.3) if quick else (100, 1.5)
    wanted = args.model or (["mtcnn-rnet"] if quick else [*ZOO_ORDER, "mobilenet-digits32"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-packager-") as tmp_dir:
        tmp = Path(tmp_dir)
        key = generate_keypair(tmp / "keys", "bench")
        sets, skipped = zoo_sets([n for n in wanted if n in ZOO_ORDER], cache_dir() / "zoo", quick)
        if "mobilenet-digits32" in wanted:
            own = own_export(use_cache=not args.no_cache)
            if own is None:
                skipped.append("mobilenet-digits32: needs torch (pip install 'edgefleet[bench]')")
            else:
                sets.append(own)
        for s in skipped:
            console.print(f"[yellow]skipped[/] {escape(s)}")  # its hint names an extra in [...]
        if not sets:
            console.print("[red]no model to benchmark[/]: install 'edgefleet[zoo]'")
            return 1
        for m in sets:
            t0 = time.perf_counter()
            console.print(f"{m['name']}: {m['source']}", highlight=False)
            rows += bench_model(
                m, profiles, labels, key.private_path, tmp / m["name"], runs, seconds
            )
            console.print(f"  benchmarked in {time.perf_counter() - t0:.0f}s")
    table = Table(
        title="packager on pretrained models: 1 intra-op thread, batch 1, CPU provider "
        "(* = profile's own provider absent: validated and timed on CPU)"
    )
    for col in (
        "model",
        "profile",
        "package",
        "recipe",
        "backend",
        "vs FP32",
        "vs plain ORT",
        "size x",
        "agree confident",
        "agree hard",
        "p50 ms",
        "package s",
    ):
        table.add_column(col)
    for r in rows:
        star = "" if r.get("provider_on_host", True) else "*"
        status = r["status"]
        pkg = (
            "[green]yes[/]"
            if status == "packaged"
            else ("" if status in ("source", "baseline") else f"[red]{status}[/]")
        )
        table.add_row(
            r["model"],
            r["profile"] + star,
            pkg,
            r.get("what", ""),
            r.get("backend")
            or ("ort" if status == "baseline" else "/".join(r.get("backends_tried", []))),
            f"{r['vs_fp32']:.2f}x" if "vs_fp32" in r else "",
            f"{r['vs_plain']:.2f}x" if "vs_plain" in r else "",
            f"{r['size_x']:.2f}" if "size_x" in r else "",
            _frac(r.get("agree_confident")),
            _frac(r.get("agree_hard")),
            f"{r['p50_ms']:.3f}" if "p50_ms" in r else "",
            f"{r['package_s']:.0f}" if "package_s" in r else "",
        )
    if args.json:  # first: the rows are what an hour of packaging measured
        args.json.write_text(json.dumps({"rows": rows}, indent=2, default=str))
    console.print(table)
    console.print(
        "package s: seconds of each profile's own candidate search and packaging (a build an "
        "earlier profile made is reused, and counted there); the FP32 row: preparing the source "
        "(pre-processing, reference outputs), shared by every profile; backend: the toolkit that "
        "built the package, or the ones tried when none passed",
        highlight=False,
    )
    for line in vendor_lines(rows):
        console.print(line, highlight=False)
    for line in targets(rows):
        console.print(line, highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
