"""`multimed`: the command-line interface. Heavy imports happen inside each subcommand so that
`multimed catalog` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

DEFAULT_BUNDLE = Path("artifacts/default-bundle")


def _catalog(args) -> int:
    from multimed.models.catalog import CATALOG

    doc = CATALOG.to_json()
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    print(f"MultiMed catalog v{doc['catalog_version']}\n\nModalities:")
    for m in doc["modalities"]:
        print(f"  {m['id']:10s} {m['description']}  [{', '.join(m['forms'])}]")
    print("\nTasks:")
    for t in doc["tasks"]:
        req = t["required"]
        needs = " + ".join(
            req["all_of"] + ([f"any of ({', '.join(req['any_of'])})"] if req["any_of"] else [])
        )
        optional = f"; optional {', '.join(t['optional'])}" if t["optional"] else ""
        print(f"  {t['id']:38s} {t['output']:16s} needs {needs}{optional}")
        print(f"  {'':38s} labels: {', '.join(t['labels'])}  metric: {t['metric']}")
    return 0


def _synth(args) -> int:
    from multimed.models.cohort.writer import write_cohort

    written = write_cohort(args.out, args.n, args.seed)
    print(f"wrote {written} patients to {args.out} (labels in {args.out / 'labels.json'})")
    return 0


def _train(args) -> int:
    from multimed.models.config import ModelConfig
    from multimed.models.evaluate import format_table
    from multimed.models.train import TrainSettings, train

    overrides = {
        k: v
        for k, v in (
            ("tasks", args.tasks),
            ("modalities", args.modalities),
            ("patients", args.patients),
            ("epochs", args.epochs),
            ("seed", args.seed),
        )
        if v is not None
    }
    settings = TrainSettings(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    )
    bundle = train(args.out, settings, ModelConfig(fusion=args.fusion, size=args.size))
    print(
        f"bundle {bundle.version} written to {bundle.path} "
        f"({bundle.manifest['training']['seconds']} s)\n"
    )
    print(format_table(bundle.manifest["metrics"]))
    return 0


def _report(args) -> int:
    from tqdm import tqdm

    from multimed.models.report import QUICK, ReportSettings, build_report, steps
    from multimed.models.report_writer import update_readme

    settings = QUICK if args.quick else ReportSettings()
    with tqdm(total=steps(settings), unit="stage", disable=args.no_progress) as bar:

        def progress(stage: str) -> None:  # a stage starts: the one before it is done
            bar.update(0 if bar.desc == "" else 1)
            bar.set_description(stage)

        build_report(args.out, settings, progress)
        bar.update(1)
    print(f"report written to {args.out / 'report.md'} (numbers in results.json, figures as PNG)")
    if args.readme is not None:
        update_readme(args.readme, args.out)
        print(f"{args.readme}: results section updated")
    return 0


def _evaluate(args) -> int:
    from multimed.models.evaluate import format_table
    from multimed.models.train import evaluate_bundle

    metrics = evaluate_bundle(args.bundle)
    print(json.dumps(metrics, indent=2) if args.json else format_table(metrics))
    return 0


def _serve(args) -> int:
    if args.ray_address is None:
        # An embedded Ray serves this host alone: in Ray's local-only mode its node address is
        # loopback, so its GCS, raylet and workers listen on 127.0.0.1 only. Read when ray is
        # first imported, hence before any import below.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray starts its workers at nice 15, as if they were background batch work; here they are
    # the service, the gateway among them, and at nice 15 anything else on the host starves it
    # (measured: refusals under overload took 10x longer). On a cluster, `ray start` reads it.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from multimed.services.config import load_serve_config
    from multimed.services.server import ServeOptions, serve_forever

    config = load_serve_config(args.config)
    app_args = config.app.args
    gateway = app_args.gateway.model_dump()
    overrides = {
        "host": args.host,
        "port": args.port,
        "max_message_mb": args.max_message_mb,
        "token_file": args.token_file,
        "audit_log": args.audit_log,
    }
    gateway.update({k: v for k, v in overrides.items() if v is not None})
    if args.front and gateway.get("front") is None:
        gateway["front"] = {}  # nginx with the defaults of FrontSettings
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        gateway["tls"] = {
            "cert": args.tls_cert,
            "key": args.tls_key,
            "client_ca": args.tls_client_ca,
        }
    app_args = app_args.model_copy(
        update={
            "gateway": app_args.gateway.model_validate(gateway),
            "bundle": str(args.bundle) if args.bundle is not None else app_args.bundle,
            "metrics_port": args.metrics_port
            if args.metrics_port is not None
            else app_args.metrics_port,
        }
    )
    app = config.app.model_copy(update={"args": app_args})
    serve_forever(
        ServeOptions(
            config.model_copy(update={"applications": [app]}),
            args.ray_address,
            args.dashboard_port,
        )
    )
    return 0


def _client_options(args) -> dict:
    """The SDK's connection arguments from --url, --token-file (else MULTIMED_TOKEN), --tls-*."""
    from multimed.services.tokens import client_token

    return {
        "url": args.url,
        "token": client_token(args.token_file),
        "tls": args.tls,
        "tls_ca": args.tls_ca,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }


def _predict_inputs(args) -> dict[str, object]:
    """Each --<modality> value: a path when one exists (a file, or a DICOM series' directory),
    else the text or sequence itself."""
    from multimed.models.catalog import CATALOG

    inputs: dict[str, object] = {}
    for m in CATALOG.modalities:
        value = getattr(args, m)
        if value is not None:
            inputs[m] = Path(value) if Path(value).exists() else value
    return inputs


def _predict(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from multimed.client import MultiMedClient

    try:
        with MultiMedClient(**_client_options(args)) as client:
            response = client.predict(
                args.task, _predict_inputs(args), explain=args.explain, timeout=args.timeout
            )
    except grpc.RpcError as e:
        print(f"multimed predict: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(response, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"task        {response.task}  (request {response.request_id})")
    if response.tokens:
        print("predicted   " + "".join(t.label for t in response.tokens))
    else:
        print(f"predicted   {', '.join(response.predicted) or '-'}")
        for s in sorted(response.scores, key=lambda s: -s.score)[:5]:
            print(f"            {s.label:36s} {s.score:.3f}")
    print(f"used        {', '.join(response.modalities_used)}")
    if response.modalities_missing:
        print(f"missing     {', '.join(response.modalities_missing)}")
    for m, c in response.contributions.items():
        print(f"contrib     {m:10s} {c:.3f}")
    for m, o in response.out_of_distribution.items():
        verdict = (
            "OUT OF DISTRIBUTION: do not trust this answer" if o.flagged else "in distribution"
        )
        print(f"ood         {m:10s} {o.score:.2f} (threshold {o.threshold:.2f})  {verdict}")
    print(f"bundle      {response.bundle_version}   server {response.timing.server_ms:.1f} ms")
    return 0


def _study(args) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from multimed.client import MultiMedClient

    try:
        with MultiMedClient(**_client_options(args)) as client:
            response = client.predict_study(
                args.pacs,
                args.study,
                args.task or (),
                _predict_inputs(args),
                store_sr=args.store_sr,
                timeout=args.timeout,
            )
    except grpc.RpcError as e:
        print(f"multimed study: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    if args.fhir_out:
        bundle = json.loads(response.fhir_bundle)
        args.fhir_out.write_text(json.dumps(bundle, indent=2))
    if args.json:
        doc = MessageToDict(response, preserving_proto_field_name=True)
        doc.pop("fhir_bundle", None)  # --fhir-out writes it
        print(json.dumps(doc, indent=2))
        return 0
    print(f"study       {response.study_instance_uid}  (request {response.request_id})")
    for a in response.answers:
        p = a.prediction
        predicted = "".join(t.label for t in p.tokens) if p.tokens else ", ".join(p.predicted)
        print(f"  {p.task:38s} {predicted or '-'}   ({', '.join(p.modalities_used)})")
    for s in response.skipped:
        print(f"  {s.task:38s} skipped: {s.message}")
    for s in response.series:
        use = s.modality or f"not used: {s.ignored_reason}"
        print(f"series {s.series_number:>4d} {s.dicom_modality:4s} {s.instances:4d} inst.  {use}")
    if response.HasField("sr"):
        sr = response.sr
        print(f"SR          {'stored ' + sr.sop_instance_uid if sr.stored else sr.message}")
    if response.HasField("fhir"):
        f = response.fhir
        print(f"FHIR        {'sent' if f.sent else 'NOT sent: ' + f.message} ({f.attempts} tries)")
    print(f"bundle      {response.bundle_version}   server {response.timing.server_ms:.0f} ms")
    return 0


def _hospital(args):
    """--config's (the serve config's) hospital settings, which must name the PACS --pacs."""
    from multimed.services.config import load_serve_config

    hospital = load_serve_config(args.config).app.args.hospital()
    if args.pacs not in hospital.pacs:
        known = ", ".join(sorted(hospital.pacs)) or "none"
        raise ValueError(f"no PACS {args.pacs!r} in {args.config}; configured: {known}")
    return hospital


def _configured_pacs(args):
    """The PACS named by --pacs, as --config describes it."""
    from multimed.services.frontends.hospital.pacs import Pacs

    return Pacs(args.pacs, _hospital(args).pacs[args.pacs])


def _pacs_upload(args) -> int:
    from tqdm import tqdm

    from multimed.services.frontends.hospital.pacs import dicom_files, upload

    pacs = _configured_pacs(args)
    files = list(dicom_files(args.dir))
    if not files:
        raise ValueError(f"no DICOM files under {args.dir}")
    with tqdm(total=len(files), unit="file", desc=args.pacs, disable=args.no_progress) as bar:
        stored, failed = upload(pacs, files, bar.update)
    print(f"stored {stored} instances in {args.pacs}; {len(failed)} refused")
    for path, reason in failed[:20]:
        print(f"  refused {path}: {reason}", file=sys.stderr)
    return 0 if not failed else 1


def _watch(args) -> int:
    import signal

    from multimed.client import MultiMedClient
    from multimed.services.frontends.hospital import watch

    state = watch.State(args.state)
    try:
        if args.status or args.retry_failed:
            if args.retry_failed:
                print(f"{state.retry_failed(args.pacs)} failed studies will be tried again")
            for study, st, attempts, error, updated in state.rows(args.pacs):
                print(f"{updated}  {st:8s} {attempts:2d}  {study}  {error}")
            return 0
        pacs = _configured_pacs(args)
        source = (
            watch.OrthancChanges(pacs, pacs.settings.orthanc_url)
            if pacs.settings.orthanc_url
            else watch.QidoPolling(pacs, args.stable_s)
        )
        with MultiMedClient(**_client_options(args)) as client:

            def predict(study: str) -> str:
                response = client.predict_study(
                    args.pacs, study, args.task or (), store_sr=True, timeout=args.timeout
                )
                return watch.summary(response)

            watcher = watch.Watcher(
                args.pacs, source, state, predict, lambda line: print(line, flush=True)
            )

            def stop(*_):
                print("stopping after the study in hand (Ctrl-C again to abort)", flush=True)
                watcher.stopping = True
                signal.signal(signal.SIGINT, signal.default_int_handler)

            signal.signal(signal.SIGINT, stop)
            signal.signal(signal.SIGTERM, stop)
            print(f"watching PACS {args.pacs} (state in {args.state})", flush=True)
            watcher.run()
        return 0
    finally:
        state.close()


def _loadtest(args) -> int:
    from multimed.client import loadtest
    from multimed.client.channel import ChannelSettings
    from multimed.client.loadtest.inputs import cohort_inputs, parse_task, synthetic_inputs

    tasks = [parse_task(t) for t in args.task]
    if len({t for t, _ in tasks}) < len(tasks):
        raise ValueError("--task: each task once (give it a weight, TASK:WEIGHT, instead)")
    bounds = loadtest.Bounds(args.duration, args.max_requests)
    warmup = None
    if args.warmup or args.warmup_s:
        warmup = loadtest.Bounds(args.warmup_s or args.duration, args.warmup or args.max_requests)
    if args.rate is None:
        load = loadtest.ClosedLoop(args.concurrency)
    else:
        load = loadtest.OpenLoop(args.rate, loadtest.Arrival(args.arrival), args.max_outstanding)
    # Each input is sent once unless --repeat-inputs: the router's embedding cache cannot answer.
    total = args.distinct or (min(args.max_requests, 256) + (args.warmup or 0))
    print(f"preparing {total} inputs", file=sys.stderr)
    if args.cohort:
        inputs = cohort_inputs(args.cohort, tasks, total, args.all_modalities)
    else:
        inputs = synthetic_inputs(tasks, total, args.seed, args.all_modalities)
    api = loadtest.APIS[args.api]
    prepared = tuple(loadtest.prepare(api, t, inputs[t], w) for t, w in tasks)
    wanted = args.max_requests + (args.warmup or 0)
    if not args.repeat_inputs and sum(len(t.requests) for t in prepared) < wanted:
        print(
            "the run ends when the distinct inputs are used up: raise --distinct, or cycle them "
            "with --repeat-inputs",
            file=sys.stderr,
        )
    plan = loadtest.Plan(
        prepared,
        load,
        bounds,
        warmup=warmup,
        timeout_s=args.timeout,
        repeat_inputs=args.repeat_inputs,
        mix=loadtest.Mix(args.mix),
        seed=args.seed,
        connections=args.connections,
    )
    progress = sys.stderr if sys.stderr.isatty() and not args.no_progress else None
    result = loadtest.run(ChannelSettings(**_client_options(args)), api, plan, progress)
    print(json.dumps(result.to_json(), indent=2) if args.json else loadtest.format_table(result))
    return 0


def _score(args) -> int:
    if args.ray_address is None:  # a local-only Ray, as `multimed serve`'s (see _serve)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    from multimed.services.score import FolderSource, PacsSource, ScoreOptions, score

    if (args.input is None) == (args.pacs is None) or (args.pacs is None) != (args.studies is None):
        raise ValueError("score: either --input DIR, or --pacs NAME with --studies FILE")
    if args.input is not None:
        source = FolderSource(args.input.resolve())
    else:
        hospital = _hospital(args)
        studies = [line.strip() for line in args.studies.read_text().splitlines()]
        studies = [s for s in studies if s and not s.startswith("#")]
        settings = hospital.pacs[args.pacs]
        source = PacsSource(args.pacs, settings, hospital.series_rules, studies)
    summary = score(
        ScoreOptions(
            bundle=args.bundle,
            tasks=tuple(dict.fromkeys(args.task)),
            source=source,
            out=args.out,
            ray_address=args.ray_address,
            batch_size=args.batch_size,
            workers=args.workers,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    )
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(summary.statuses.items())) or "none"
    print(
        f"{summary.items} items: {summary.skipped} already scored, {summary.scored} scored in "
        f"{summary.seconds:.1f} s ({summary.items_per_s:.1f} items/s); rows: {statuses}\n"
        f"wrote {summary.out}"
    )
    return 0


def _export(args) -> int:
    from multimed.services.export import export_triton

    report = export_triton(args.bundle, args.out)
    print(f"wrote a Triton model repository to {args.out}: {len(report)} encoders (ONNX)")
    print("max |onnxruntime - torch| on held-out inputs:")
    for m, diff in report.items():
        print(f"  encoder_{m:10s} {diff:.2e}")
    return 0


def _perf_data(args) -> int:
    from multimed.services.export import perf_analyzer_data

    data = perf_analyzer_data(args.bundle, args.task, args.patients, args.seed)
    args.out.write_text(json.dumps(data))
    print(f"wrote {len(data['data'])} {args.task} requests to {args.out}")
    return 0


def _add_client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument(
        "--token-file", type=Path, help="send this file's first token (or MULTIMED_TOKEN)"
    )
    p.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    p.add_argument("--tls-ca", type=Path, help="TLS: the CA of the server's certificate (PEM)")
    p.add_argument("--tls-cert", type=Path, help="mTLS: this client's certificate (PEM)")
    p.add_argument("--tls-key", type=Path, help="mTLS: its private key (PEM)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multimed", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("catalog", help="list modalities and tasks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_catalog)

    p = sub.add_parser("synth", help="write a synthetic cohort as files in real formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth)

    p = sub.add_parser("train", help="train a multitask bundle on the synthetic cohort")
    p.add_argument("--out", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--tasks", nargs="+")
    p.add_argument("--modalities", nargs="+")
    p.add_argument("--fusion", choices=("late", "early", "attention"), default="attention")
    p.add_argument("--size", choices=("tiny", "base"), default="tiny")
    p.add_argument("--patients", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="evaluate a bundle on its held-out data")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "report", help="train and compare models; write the results tables and figures (~40 min)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the command only")
    p.add_argument("--readme", type=Path, help="also fill this README's results section")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_report)

    p = sub.add_parser("export", help="write the encoders as a Triton model repository")
    p.add_argument("--format", choices=("triton",), default="triton")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_export)

    p = sub.add_parser(
        "perf-data", help="perf_analyzer --input-data for a task, from synthetic patients"
    )
    p.add_argument("--task", required=True)
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_perf_data)

    p = sub.add_parser("serve", help="serve the model over gRPC (embedded local Ray)")
    p.add_argument("--config", type=Path, help="Ray Serve config (deploy/serve_config.yaml)")
    p.add_argument("--bundle", type=Path, help="bundle directory (default: the config's)")
    p.add_argument("--host", help="gRPC and metrics address (default: the config's, 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default: the config's, 8001)")
    p.add_argument("--metrics-port", type=int, help="/metrics port (default: 8002)")
    p.add_argument("--max-message-mb", type=float, help="largest request (default: 64)")
    p.add_argument(
        "--token-file",
        help="named bearer tokens, one 'NAME TOKEN' a line (or MULTIMED_TOKEN); default: no auth",
    )
    p.add_argument("--tls-cert", help="TLS certificate (PEM); no plaintext port then")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-client-ca", help="mTLS: clients need a certificate signed by this CA")
    p.add_argument("--audit-log", help="also append the audit log's lines here")
    p.add_argument(
        "--front",
        action="store_true",
        help="nginx on the port before the listener: calls past gateway.front.max_calls (128) "
        "get RESOURCE_EXHAUSTED from it, fast under any overload (needs nginx)",
    )
    p.add_argument("--ray-address", help="join a running Ray cluster ('auto') instead")
    p.add_argument(
        "--dashboard-port",
        type=int,
        default=8265,
        help="the embedded Ray's dashboard, on loopback (`serve status` needs it); 0: off",
    )
    p.set_defaults(func=_serve)

    from multimed.models.catalog import CATALOG

    p = sub.add_parser("score", help="score an archive on Ray Data into parquet (resumable)")
    p.add_argument("--task", action="append", required=True, help="repeatable")
    p.add_argument("--input", type=Path, help="a folder of item folders (a synth cohort)")
    p.add_argument("--pacs", help="instead: a PACS named in --config's args.pacs")
    p.add_argument("--studies", type=Path, help="with --pacs: Study Instance UIDs, one a line")
    p.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    p.add_argument("--out", type=Path, required=True, help="results.parquet")
    p.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    p.add_argument("--ray-address", help="a Ray cluster (paths must be the same on its nodes)")
    p.add_argument("--batch-size", type=int, default=16, help="items per batch")
    p.add_argument("--workers", type=int, default=1, help="scoring actors (a core each)")
    p.add_argument("--checkpoint-every", type=int, default=64, help="items per saved part")
    p.add_argument("--device", default="auto", help="auto (CUDA when there), cpu, cuda")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_score)

    p = sub.add_parser("predict", help="ask a running server for one task")
    p.add_argument("--task", required=True)
    _add_client_arguments(p)
    p.add_argument("--timeout", type=float, default=60)
    p.add_argument("--explain", action="store_true", help="per-modality contributions")
    p.add_argument("--json", action="store_true")
    for m in CATALOG.modalities.values():
        forms = ", ".join(sorted(m.forms))
        p.add_argument(
            f"--{m.id}", metavar="VALUE", help=f"{m.description}: file or text ({forms})"
        )
    p.set_defaults(func=_predict)

    p = sub.add_parser("study", help="answer a study in a PACS the server has configured")
    p.add_argument("--pacs", required=True, help="a PACS name from the server's config")
    p.add_argument("--study", required=True, help="Study Instance UID")
    p.add_argument("--task", action="append", help="repeatable; default: every task it can")
    _add_client_arguments(p)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--store-sr", action="store_true", help="store a DICOM SR into the study")
    p.add_argument("--fhir-out", type=Path, help="write the FHIR R4 bundle here")
    p.add_argument("--json", action="store_true")
    for m in CATALOG.modalities.values():
        if "dicom" not in m.forms and "dicom_series" not in m.forms:
            p.add_argument(f"--{m.id}", metavar="VALUE", help=f"{m.description}, sent along")
        else:
            p.set_defaults(**{m.id: None})
    p.set_defaults(func=_study)

    p = sub.add_parser("pacs", help="work with a PACS from the serve config")
    pacs = p.add_subparsers(dest="pacs_command", required=True)
    p = pacs.add_parser("upload", help="store a DICOM folder (a cohort) by STOW-RS")
    p.add_argument("dir", type=Path)
    p.add_argument("--pacs", required=True, help="a PACS name in the config's args.pacs")
    p.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_pacs_upload)

    p = sub.add_parser("watch", help="answer each new study of a PACS once (SR + FHIR)")
    p.add_argument("--pacs", required=True, help="a PACS name in the config's args.pacs")
    p.add_argument("--task", action="append", help="repeatable; default: every task it can")
    p.add_argument("--config", type=Path, default=Path("deploy/serve_config.yaml"))
    p.add_argument("--state", type=Path, default=Path("multimed-watch.sqlite"))
    p.add_argument("--status", action="store_true", help="list the studies seen and stop")
    p.add_argument("--retry-failed", action="store_true", help="try failed studies again")
    p.add_argument("--stable-s", type=float, default=60, help="QIDO polling: quiet seconds")
    p.add_argument("--timeout", type=float, default=300)
    _add_client_arguments(p)
    p.set_defaults(func=_watch)

    p = sub.add_parser("loadtest", help="load a running server; latency, throughput, errors")
    _add_client_arguments(p)
    p.add_argument("--api", choices=("multimed", "oip"), default="multimed")
    p.add_argument(
        "--task", action="append", required=True, metavar="TASK[:WEIGHT]", help="repeatable"
    )
    p.add_argument("--mix", choices=("round-robin", "random"), default="round-robin")
    p.add_argument("--cohort", type=Path, help="patients from `multimed synth` (else synthesised)")
    p.add_argument("--all-modalities", action="store_true", help="not only the required ones")
    loop = p.add_mutually_exclusive_group(required=True)
    loop.add_argument("--concurrency", type=int, help="closed loop: callers back to back")
    loop.add_argument("--rate", type=float, help="open loop: requests per second")
    p.add_argument("--arrival", choices=("poisson", "fixed"), default="poisson")
    p.add_argument("--max-outstanding", type=int, default=256, help="open loop's in-flight cap")
    p.add_argument(
        "--connections",
        type=int,
        default=1,
        help="connections to deal the load over (router replicas sharing a port: one each)",
    )
    p.add_argument("--duration", type=float, default=10, help="seconds")
    p.add_argument("--max-requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, help="warm-up requests, not counted")
    p.add_argument("--warmup-s", type=float, help="warm-up seconds, not counted")
    p.add_argument("--timeout", type=float, default=30, help="each request's deadline (s)")
    p.add_argument(
        "--distinct", type=int, help="inputs to prepare (default: max requests up to 256, +warm-up)"
    )
    p.add_argument("--repeat-inputs", action="store_true", help="cycle them (cache hits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pydantic import ValidationError

    from multimed.models.errors import MultiMedError

    try:
        return args.func(args)
    except (MultiMedError, ValidationError, ValueError, OSError) as e:
        print(f"multimed {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
