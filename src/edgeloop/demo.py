"""``make demo``: the loop end to end on built-in data, in a few minutes on a laptop CPU.

1. train the MNIST-1D reference CNN;
2. quantize it with every scheme and compare accuracy, size and latency with fp32 and
   with onnxruntime's stock quantizer;
3. ``optimize``: the fastest model on this machine within 0.5 accuracy points, searching
   post-training schemes and, from the torch model and its training data, structured
   pruning and quantization-aware training;
4. ship it: a signed TUF repository served on 127.0.0.1, a device that verifies,
   health-checks and installs it, then refuses a tampered copy;
5. serve it with a cascade and an offload server: a narrow CNN (8 channels, trained
   briefly) in front of the shipped model, thresholds chosen on the validation split,
   published as one signed cascade bundle and installed on the device (its health
   check measures the whole cascade); the runtime answers the test split with it, then
   again from the cascade's files with an offload server on 127.0.0.1 (the fp32 CNN)
   taking what the small model is unsure of, and prints how many inputs each stage
   answered;
6. watch it: the model republished with the monitor's reference sketch; the device's
   runtime answers a clean stream, then a noisy one, and its monitor flags the drift;
   the device sends one local-DP report (within its owner's ε budget) to a telemetry
   collector on 127.0.0.1, which de-biases what it holds; the budget's fifth report of
   the day is refused;
7. personalise it privately: 20 simulated devices with non-IID MNIST-1D train a shared
   model over Flower under SecAgg+ (the server sees only the sum of their updates), each
   keeping a private head fine-tuned on its own data.

Everything it writes lands in ``demo-out/`` (or the folder given as the first argument);
each step prints the CLI command that does the same.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.table import Table

from edgeloop._progress import quiet_libraries
from edgeloop.compress import SCHEMES, make_scheme, run_pass
from edgeloop.data import Dataset, load_builtin, save_npz
from edgeloop.errors import EdgeloopError
from edgeloop.measure import LatencyConfig, evaluate
from edgeloop.zoo import build, train_zoo_model

if TYPE_CHECKING:
    from edgeloop.bundle import Device
    from edgeloop.device import Cascade
    from edgeloop.federated.server import RoundReport

console = Console()
_SMALL_WIDTH, _SMALL_EPOCHS = 8, 10    # the cascade's small model, trained briefly


def _step(title: str, command: str) -> None:
    console.rule(f"[bold]{title}")
    console.print(f"[dim]$ {command}[/dim]", highlight=False)


def _compare(out: Path, fp32: Path) -> None:
    calib = load_builtin("mnist1d", "calib")
    models = {"fp32": fp32}
    for scheme in SCHEMES:
        models[scheme] = out / "quantized" / f"{scheme}.onnx"
        run_pass(make_scheme(scheme), fp32, models[scheme], calib)
    test = load_builtin("mnist1d", "test")
    timing = LatencyConfig(min_runs=300, max_seconds=1.5)
    reports = {k: evaluate(p, test, reference=fp32, latency_config=timing)
               for k, p in models.items()}
    base = reports["fp32"]
    table = Table(title="MNIST-1D CNN on this machine (onnxruntime CPU); "
                        "ort-* = onnxruntime's stock quantizer")
    for col in ("model", "accuracy", "size", "vs fp32", "batch 1 p50", "batch 32 p50",
                "speed-up b32", "cosine", "float ops left"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, r in reports.items():
        b1, b32 = r.latency
        table.add_row(
            name, f"{r.accuracy:.2%}", f"{r.size_bytes / 1024:.1f} KB",
            f"{r.size_bytes / base.size_bytes:.2f}x", f"{b1.p50_ms:.3f} ms",
            f"{b32.p50_ms:.3f} ms", f"{base.latency[1].p50_ms / b32.p50_ms:.2f}x",
            f"{r.fidelity.mean_cosine:.4f}" if r.fidelity else "",
            str(sum(r.float_compute_ops.values())))
    console.print(table)


def _optimize(out: Path, checkpoint: Path) -> Path:
    from edgeloop.optimize import OptimizeConfig, optimize
    from edgeloop.report import write_report
    from edgeloop.targets import detect

    result = optimize(checkpoint, calib=load_builtin("mnist1d", "calib"),
                      val=load_builtin("mnist1d", "val"), target=detect(),
                      train=load_builtin("mnist1d", "train"),
                      config=OptimizeConfig(metric="accuracy", max_drop=0.5, batch=32,
                                            time_budget_s=120.0),
                      on_result=lambda r: console.print(f"   measured {r.name}"))
    paths = write_report(result, out / "optimized")
    chosen = next((c for c in result.candidates if c.name == result.chosen), None)
    if chosen is None:
        console.print("   no candidate fit the budget; best.onnx is the float model")
    else:
        console.print(f"   chosen: [bold]{result.chosen}[/bold] -> {paths['best.onnx']} "
                      f"(report: {paths['report.md']}, plot: {paths['pareto.png']})")
    return paths["best.onnx"]


def _ship(out: Path, best: Path) -> None:
    from edgeloop.bundle import Device, build_manifest, init_repo, publish_bundle, serve_repo

    repo, keys, device_dir = out / "repo", out / "keys", out / "device"
    for d in (repo, keys, device_dir):
        shutil.rmtree(d, ignore_errors=True)
    golden = load_builtin("mnist1d", "val")
    root = init_repo(repo, keys=keys)
    publish_bundle(repo, best, keys=keys, manifest=build_manifest(
        best, name="mnist1d", version="1.0.0", golden=golden))
    server, _ = serve_repo(repo, port=0)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        device = Device.init(device_dir, trusted_root=root, golden=out / "val.npz")
        result = device.update(url, "mnist1d")
        console.print(f"   device update: installed={result.installed} "
                      f"version={result.version} ({result.reason})")
        # An attacker swaps the published model bytes: the device must refuse them.
        console.print("   publishing 1.1.0, then flipping a byte of its model file...")
        publish_bundle(repo, best, keys=keys, manifest=build_manifest(
            best, name="mnist1d", version="1.1.0", golden=golden))
        for f in (repo / "targets" / "mnist1d").glob("*.onnx"):
            data = bytearray(f.read_bytes())
            data[len(data) // 2] ^= 0xFF
            f.write_bytes(bytes(data))
        try:
            device.update(url, "mnist1d")
            console.print("   [red]the tampered model was accepted[/red]")
        except EdgeloopError as e:
            console.print(f"   refused: {e}")
        active = device.active()
        console.print(f"   still serving version {active[1].version if active else None}")
    finally:
        server.shutdown()


def _offload_threshold(cascade: Cascade, small: Path, server_model: Path, val: Dataset,
                       round_trip_ms: float) -> float | None:
    """The small stage's threshold when what it is unsure of goes to the server: chosen
    on ``val`` as the shipped one was, with the server's round trip as the cost of the
    last stage and the server model's answers as its accuracy."""
    from edgeloop._onnx import session
    from edgeloop.device import choose_thresholds, confidence, softmax
    from edgeloop.measure import predict

    first = cascade.stages[0]
    logits = predict(session(small), val)
    correct = [logits.argmax(1) == val.labels,
               predict(session(server_model), val).argmax(1) == val.labels]
    conf = confidence(softmax(logits, first.temperature), cascade.measure)
    choice = choose_thresholds([conf], correct, [first.latency_ms, round_trip_ms],
                               max_drop=cascade.max_drop)
    return choice.chosen.thresholds[0]


def _round_trip_ms(url: str, data: Dataset, n: int = 50) -> float:
    """Median time of one offloaded sample (batch 1) to the server at ``url``."""
    from edgeloop.device.offload import OffloadClient, OffloadPolicy

    with OffloadClient(OffloadPolicy(url=url)) as client:
        return float(np.median([client.predict({k: v[i:i + 1] for k, v in data.inputs.items()},
                                               "public").latency_ms for i in range(n)]))


def _update(out: Path, note: str) -> Device:
    """The demo device updated from the demo repository, served on 127.0.0.1 meanwhile."""
    from edgeloop.bundle import Device, serve_repo

    repo, _ = serve_repo(out / "repo", port=0)
    try:
        device = Device(out / "device")
        r = device.update(f"http://127.0.0.1:{repo.server_address[1]}", "mnist1d")
        console.print(f"   device update: installed={r.installed} version={r.version} "
                      f"({r.reason}{note})")
    finally:
        repo.shutdown()
    return device


def _serve(out: Path, best: Path, fp32: Path) -> None:
    from edgeloop._trainconfig import TrainConfig
    from edgeloop.device import (
        Policy,
        Runtime,
        build_cascade,
        publish_cascade,
        summarize,
    )
    from edgeloop.serve.loadgen import ServerProcess

    small = out / "small"
    result = train_zoo_model("mnist1d-cnn", small, config=TrainConfig(epochs=_SMALL_EPOCHS),
                             width=_SMALL_WIDTH)
    console.print(f"   small model: mnist1d-cnn of width {_SMALL_WIDTH}, test accuracy "
                  f"{result['test_accuracy']:.2%}")
    val = load_builtin("mnist1d", "val")
    path = out / "cascade" / "cascade.json"
    c = build_cascade([small / "model.onnx", best], val, max_drop=0.5, out=path)
    console.print(f"   batch-1 latency: small {c.stages[0].latency_ms:.3f} ms, large "
                  f"{c.stages[-1].latency_ms:.3f} ms; thresholds on the validation split let "
                  f"the small model answer {c.expected['answered'][0]:.0%}")  # type: ignore[index]
    publish_cascade(path, out / "repo", keys=out / "keys", name="mnist1d", version="2.0.0",
                    golden=val)
    device = _update(out, "")

    test = load_builtin("mnist1d", "test")
    table = Table(title=f"the device answering the {len(test)} test inputs one at a time")
    for col in ("runtime", "small", "large", "offload", "accuracy", "mean latency"):
        table.add_column(col, justify="left" if col == "runtime" else "right")
    with ServerProcess(fp32, max_batch=1) as server:      # stopped on leaving, error or not
        rtt = _round_trip_ms(server.url, val)
        t = _offload_threshold(c, small / "model.onnx", fp32, val, rtt)
        console.print(f"   offload round trip {rtt:.2f} ms: with the server as the last "
                      f"stage, the small model's threshold on the validation split is "
                      f"{'never' if t is None else f'{t:.3f}'}")
        thresholds = f"[{'inf' if t is None else t}]"
        (out / "policy.toml").write_text(
            f'cascade = "cascade/cascade.json"\nthresholds = {thresholds}\n[offload]\n'
            f'mode = "when-unsure"\nurl = "{server.url}"\nprivacy_class = "public"\n')
        runs = (("the device's cascade bundle", device, Policy()),
                ("its files, thresholds for offloading, offload when unsure", None,
                 Policy.load(out / "policy.toml")))
        for name, state, policy in runs:
            with Runtime(state, policy) as rt:
                s = summarize(rt.predict_each(test), test.labels)
            table.add_row(name, *(str(s.answered.get(k, 0)) for k in
                                  (c.stages[0].name, c.stages[-1].name, "offload")),
                          f"{s.accuracy:.2%}", f"{s.mean_latency_ms:.3f} ms")
    console.print(table)


def _watch(out: Path, best: Path) -> None:
    from edgeloop.bundle import build_manifest, publish_bundle
    from edgeloop.device import Runtime
    from edgeloop.monitor import REFERENCE_FILE, sketch_bundle
    from edgeloop.monitor.telemetry import Budget, Reporter, read_key
    from edgeloop.monitor.telemetry.client import KEY_FILE
    from edgeloop.serve.loadgen import ServerProcess
    from edgeloop.serve.telemetry_store import TelemetryStore

    golden = load_builtin("mnist1d", "val")
    with tempfile.TemporaryDirectory(prefix="edgeloop-demo-") as tmp:
        files = {REFERENCE_FILE: sketch_bundle(best, golden).write(tmp)}
        publish_bundle(out / "repo", best, keys=out / "keys", files=files,
                       manifest=build_manifest(best, name="mnist1d", version="3.0.0",
                                               golden=golden, files=files))
    device = _update(out, "; its bundle ships the monitor's reference sketch")

    x = load_builtin("mnist1d", "test").inputs["x"]
    noisy = (x + np.random.default_rng(0).normal(0, 0.5 * x.std(), x.shape)).astype(x.dtype)
    seen = 0
    with Runtime(device) as rt:
        assert rt.monitor is not None
        for _ in range(2):                     # the monitor works in blocks of 2048 calls
            for i in range(len(x)):
                rt.predict({"x": x[i:i + 1]})
        console.print(f"   {2 * len(x)} clean inputs: drift flagged: {rt.monitor.drifted}")
        while not rt.monitor.drifted and seen < 8 * len(x):
            for i in range(len(x)):
                rt.predict({"x": noisy[i:i + 1]})
            seen += len(x)
        flag = rt.monitor.flag()
    console.print(f"   then {seen} noisy inputs (Gaussian noise, 0.5 x the data's std): "
                  f"drift flagged: {flag.drifted}", highlight=False)
    for a in flag.alerts:
        console.print(f"     [bold]{a.detector}[/bold] at watched sample {a.first_sample}: "
                      f"{a.evidence}", highlight=False)

    db = out / "telemetry.db"
    db.unlink(missing_ok=True)
    store = TelemetryStore(f"sqlite:///{db}")
    store.enroll(read_key(device.dir / KEY_FILE))
    reporter = Reporter(device.dir)
    reporter.set_budget(Budget(epsilon=4.0, period_s=86400))
    active = device.state().current()
    # what `edgeloop device report` sends by default: the monitor's last window and flag
    seen_obs = reporter.observed(model_sha256=active.sha256 if active else None)
    with ServerProcess.collector(f"sqlite:///{db}") as collector:
        sent = [reporter.report(seen_obs, collector.url, epsilon=1.0) for _ in range(4)]
        console.print(f"   4 reports of ε 1 sent to the collector at {collector.url} "
                      f"(budget ε 4 per day, set by the device's owner); spent ε "
                      f"{sent[-1].spent[0]:g}", highlight=False)
        try:
            reporter.report(seen_obs, collector.url, epsilon=1.0)
        except EdgeloopError as e:
            console.print(f"   a fifth: refused: {e}", highlight=False)
    s = store.summary()
    store.close()
    console.print(f"   the collector holds {s.reports} reports from {s.devices} device, each "
                  f"one class by randomized response, the drift flag by randomized "
                  f"response and the mean confidence with Laplace noise (ε split three "
                  f"ways): a fleet's reports de-bias into its class mix, drift rate and "
                  f"confidence (`edgeloop telemetry summary`)", highlight=False)


DEMO_ROUNDS, DEMO_DP_ROUNDS, DEMO_EPSILON = 12, 3, 8.0


def _federate(out: Path) -> None:
    from importlib.util import find_spec

    if find_spec("flwr") is None:
        console.print("   skipped: Flower is not installed (pip install 'edgeloop[federated]' "
                      "&& pip install --no-deps flwr==1.42.0 dp-accounting==0.6.0)")
        return
    from edgeloop.federated.config import PrivateConfig, SimulationConfig
    from edgeloop.federated.privacy import noise_to_clip
    from edgeloop.federated.simulation import simulate
    from edgeloop.federated.split import split_model

    config = SimulationConfig(clients=20, rounds=DEMO_ROUNDS, fraction=0.5, local_epochs=5,
                              private=PrivateConfig(secagg=True))

    def show(r: RoundReport) -> None:
        console.print(f"   round {r.round}: {r.replies} devices summed under SecAgg+, global "
                      f"{r.global_accuracy:.1%}, with own heads {r.accuracy:.1%}"
                      + ("" if r.epsilon is None else f", ε spent {r.epsilon:.2f}"),
                      highlight=False)

    result = simulate(config, out=out / "federated", on_round=show)
    console.print(f"   personalised (global body + each device's private head, its own test "
                  f"data) {result.personalised_accuracy:.1%}; global model "
                  f"{result.global_accuracy:.1%}; each device alone "
                  f"{result.local_only_accuracy:.1%}", highlight=False)
    console.print(f"   the same with differential privacy, ε {DEMO_EPSILON:g} (δ 1e-5) over "
                  f"{DEMO_DP_ROUNDS} rounds:", highlight=False)
    dp = replace(config, rounds=DEMO_DP_ROUNDS,
                 private=PrivateConfig(secagg=True, dp_epsilon=DEMO_EPSILON))
    private = simulate(dp, on_round=show)
    z = private.noise_multiplier or 0.0
    model = build(config.arch)
    entries = split_model(model).shared_entries(model)
    console.print(f"   ε spent {private.rounds[-1].epsilon:.2f}; personalised "
                  f"{private.personalised_accuracy:.1%}, global {private.global_accuracy:.1%}: "
                  f"at {dp.sampled} devices a round the noise (z {z:.2f} over {entries:,} "
                  f"weights) is {noise_to_clip(z, sampled=dp.sampled, entries=entries):.0f} "
                  f"times a round's clipped update; DP-FedAvg needs thousands of devices a "
                  f"round (BENCHMARKS.md)", highlight=False)


def main(out_dir: str = "demo-out") -> None:
    """Run the demo, writing into ``out_dir``."""
    quiet_libraries()
    out = Path(out_dir)
    _step("1. train the reference CNN on MNIST-1D (generated offline)",
          f"edgeloop zoo train mnist1d-cnn --out {out}/fp32")
    result = train_zoo_model("mnist1d-cnn", out / "fp32")
    console.print(f"   test accuracy {result['test_accuracy']:.2%}")
    for split in ("train", "calib", "val", "test"):
        save_npz(out / f"{split}.npz", load_builtin("mnist1d", split))
    fp32 = out / "fp32" / "model.onnx"

    _step("2. quantize with every scheme and measure each on the test split",
          f"edgeloop quantize {fp32} --scheme int8-static --data {out}/calib.npz "
          f"--out {out}/quantized/int8-static.onnx  (and every other scheme)")
    _compare(out, fp32)

    _step("3. find the fastest model within 0.5 accuracy points",
          f"edgeloop optimize {out}/fp32/model.pt --train {out}/train.npz "
          f"--data {out}/calib.npz --val {out}/val.npz --metric accuracy --max-drop 0.5 "
          f"--batch 32 --time-budget 2m --out {out}/optimized")
    best = _optimize(out, out / "fp32" / "model.pt")

    _step("4. sign, publish, and install it on a device over HTTP",
          f"edgeloop repo init {out}/repo --keys {out}/keys; edgeloop publish {best} "
          f"--repo {out}/repo --name mnist1d --version 1.0.0 --golden {out}/val.npz; "
          f"edgeloop device update {out}/device --repo URL --name mnist1d")
    _ship(out, best)

    _step("5. serve it: a cascade (a narrow CNN first) and an offload server for what it is "
          "unsure of",
          f"edgeloop zoo train mnist1d-cnn --width {_SMALL_WIDTH} --epochs {_SMALL_EPOCHS} "
          f"--out {out}/small; "
          f"edgeloop cascade {out}/small/model.onnx {best} --val {out}/val.npz "
          f"--out {out}/cascade/cascade.json; edgeloop publish {out}/cascade/cascade.json "
          f"--repo {out}/repo --name mnist1d --version 2.0.0 --golden {out}/val.npz; "
          f"edgeloop device update {out}/device --repo URL --name mnist1d; "
          f"edgeloop device run {out}/device --data {out}/test.npz; "
          f"edgeloop offload-server {fp32} --port PORT & edgeloop device run "
          f"--data {out}/test.npz --policy {out}/policy.toml")
    _serve(out, best, fp32)

    _step("6. watch it: drift flagged on the device, a private report to the fleet",
          f"edgeloop publish {best} --repo {out}/repo --name mnist1d --version 3.0.0 "
          f"--golden {out}/val.npz; edgeloop device update {out}/device --repo URL --name "
          f"mnist1d; edgeloop device run {out}/device --data NOISY.npz; edgeloop device "
          f"status {out}/device; edgeloop telemetry serve --db {out}/telemetry.db --port P "
          f"& edgeloop telemetry enroll {out}/device/telemetry.key --db {out}/telemetry.db; "
          f"edgeloop device privacy {out}/device --budget 4 --period 1d; edgeloop device "
          f"report {out}/device --to URL --epsilon 1 --drift; edgeloop telemetry summary "
          f"--db {out}/telemetry.db")
    _watch(out, best)

    _step("7. personalise it privately: federated rounds over Flower with SecAgg+, then DP",
          f"edgeloop federated simulate --clients 20 --rounds {DEMO_ROUNDS} --fraction 0.5 "
          f"--local-epochs 5 --secagg --out {out}/federated; the same with --rounds "
          f"{DEMO_DP_ROUNDS} --dp-epsilon {DEMO_EPSILON:g}")
    _federate(out)
    console.rule("[bold]done")
    console.print(f"Everything is in {out}/. Next: `edgeloop evaluate MODEL --data "
                  f"{out}/test.npz --reference {fp32}`, `edgeloop bench MODEL`.")


if __name__ == "__main__":
    main(*sys.argv[1:2])
