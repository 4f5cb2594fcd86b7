"""`kiosk`: the gate service's command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiosk.cli_support import Parser, add_commands, add_common, run_command
from kiosk.config import KioskConfig, load_config
from kiosk.errors import EXIT_OK, EXIT_RUNTIME, ConfigError, RuntimeFailure, UsageError

PROG = "kiosk"


def _config(args: argparse.Namespace) -> KioskConfig:
    """-c CONFIG, else $KIOSK_CONFIG, else the built-in defaults."""
    return load_config(args.config)


def _config_required(args: argparse.Namespace) -> KioskConfig:
    """The config of a command that needs cameras: from -c CONFIG or $KIOSK_CONFIG, never the defaults."""
    cfg = _config(args)
    if cfg.source is None:
        raise UsageError(f"{args.command} needs a config file with the cameras: -c CONFIG or $KIOSK_CONFIG")
    if not cfg.cameras:
        raise ConfigError(
            f"{cfg.source}: cameras: expected at least one camera, found none "
            "(add one, e.g. {id: cam-a1, gate: A1, source: 0})"
        )
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from kiosk.services.supervisor import run_supervisor

    cfg = _config_required(args)
    verbosity = ["-v"] * args.verbose + ["-q"] * args.quiet
    assert cfg.source is not None  # noqa: S101 - for the type checker: _config_required refused a config without a file
    return run_supervisor(cfg, cfg.source.resolve(), exit_on_eof=args.exit_on_eof, verbosity=verbosity)


def cmd_capture(args: argparse.Namespace) -> int:
    from kiosk.services.capture import run_capture

    return run_capture(_config_required(args), args.camera)


def cmd_verify(args: argparse.Namespace) -> int:
    from kiosk.services.verifier import run_verifier

    return run_verifier(_config_required(args))


def cmd_subscribe(args: argparse.Namespace) -> int:
    from kiosk.services.subscriber import build_hooks, run_subscriber

    cfg = _config(args)
    if not 0 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port: expected a port from 0 to 65535, found {args.metrics_port}")
    python = args.python or ([] if args.no_config_hooks else None)  # None: hooks.python of the config
    hooks = build_hooks(
        cfg,
        jsonl=args.jsonl,
        execs=args.exec,
        webhooks=args.webhook,
        python=python,
        mqtt=args.mqtt,
        gate=args.gate,
        name=args.name,
    )
    return run_subscriber(cfg, args.gate, hooks, args.metrics_port, args.name)


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from kiosk.tools.bench import main_bench, run_flight_scale, run_search_scale

    if args.flight_scale:
        try:
            passengers, enrolled = (int(v) for v in args.flight_scale.split(","))
            if not 2 <= passengers <= enrolled:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"--flight-scale: expected PASSENGERS,ENROLLED such as 300,100000 (2 <= passengers <= "
                f"enrolled), found {args.flight_scale!r}"
            ) from None
        flight = run_flight_scale(passengers, enrolled)
        if args.json:
            print(json.dumps(flight))
        else:
            f = flight["flight_scale"]
            print(
                f"flight of {passengers} passengers in a gallery of {enrolled} (synthetic, {f['dim']} dims, "
                f"{f['queries']} queries each); flight view built in {f['flight_view_build_ms']:.1f} ms"
            )
            print("case                            p50 ms  p99 ms  identified  false match")
            for name, r in f["cases"].items():
                print(
                    f"{name:<30}  {r['p50_ms']:>6.2f}  {r['p99_ms']:>6.2f}  "
                    f"{'-' if r['identified'] is None else format(r['identified'], '.3f'):>10}  "
                    f"{'-' if r['false_match'] is None else format(r['false_match'], '.3f'):>11}"
                )
        if not args.video and not args.search_scale:
            return EXIT_OK
    if args.search_scale:
        try:
            sizes = [int(v) for v in args.search_scale.split(",")]
            if min(sizes) < 2:
                raise ValueError
        except ValueError:
            raise UsageError(
                f"--search-scale: expected sizes like 1000,10000,100000, found {args.search_scale!r}"
            ) from None
        result = run_search_scale(sizes)
        if args.json:
            print(json.dumps(result))
        else:
            print("templates  p50 ms  p99 ms  full-scan ms  prefilter  top-1 correct")
            for r in result["search_scale"]:
                print(
                    f"{r['templates']:>9}  {r['p50_ms']:>6.2f}  {r['p99_ms']:>6.2f}  {r['full_scan_ms']:>12.2f}  "
                    f"{str(r['prefilter']):>9}  {r['top1_correct']:>13.3f}"
                )
        if not args.video:
            return EXIT_OK
    if not args.video:
        raise UsageError("bench needs --video PATH (or --search-scale SIZES)")
    if args.busy is not None and args.cameras is None:
        raise UsageError("--busy needs --cameras N")
    if args.cameras is not None:
        busy = args.cameras if args.busy is None else args.busy
        if not 1 <= args.cameras <= 64 or not 0 <= busy <= args.cameras:
            raise UsageError(
                f"--cameras {args.cameras} --busy {busy}: expected 1 to 64 cameras, of which 0 to all busy"
            )
        if args.compare:
            raise UsageError("--compare runs on one camera: leave out --cameras")
        return main_bench(_config(args), Path(args.video), None, args.json, cameras=args.cameras, busy=busy)
    return main_bench(_config(args), Path(args.video), args.compare, args.json, args.realtime)


def _gallery_hint(cfg: KioskConfig) -> str:
    """Why a verifier may be down: its SQLite gallery missing or corrupt (a verifier never starts on either;
    under `kiosk run` it is retried until the gallery is back)."""
    if cfg.gallery.url is not None:
        return ""
    from kiosk.store.gallery import SQLITE_MAGIC

    path = cfg.gallery.path
    config = f"-c {cfg.source} " if cfg.source else ""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except FileNotFoundError:
        return (
            f" The gallery {path} does not exist, so no verifier can start: run `kiosk-enroll {config}restore "
            f"BACKUP` (or `kiosk-enroll {config}init` for a new, empty one)."
        )
    except OSError as exc:
        return f" The gallery {path} cannot be read ({exc.strerror or exc})."
    if head != SQLITE_MAGIC:
        return (
            f" The gallery {path} is corrupt, so no verifier can start: run `kiosk-enroll {config}restore "
            "BACKUP` (it moves the corrupt file aside first)."
        )
    return ""


def _ask(cfg: KioskConfig, request: dict, role: str) -> dict:
    """The verifier's reply to one control request; RuntimeFailure (exit 1) that says what to check when
    it does not answer."""
    from kiosk.messaging.transport import ask_verifier, nothing_listens

    endpoint = cfg.transport.control
    if nothing_listens(endpoint):
        raise RuntimeFailure(
            f"no verifier is listening on {endpoint} (transport.control of "
            f"{cfg.source or 'the built-in defaults'}): is `kiosk run` or `kiosk verify` running "
            "with this config?" + _gallery_hint(cfg)
        )
    reply = ask_verifier(cfg, request, role=role)
    if reply is None:
        hint = (
            f"check that this machine's key {cfg.security.client_key!r} "
            f"({cfg.security.keys_dir}/{cfg.security.client_key}.key) is in the verifier's "
            "authorized_clients/ and that both use the same server key"
            if cfg.security.curve
            else "check that the verifier also runs with security.curve: false"
        )
        raise RuntimeFailure(
            f"the verifier at {endpoint} did not answer within 3 s: {hint}, or the verifier is stuck (see its log)"
        )
    return reply


def cmd_claim(args: argparse.Namespace) -> int:
    import json

    cfg = _config(args)
    request = {"cmd": "claim", "gate_id": args.gate, "subject_id": args.subject}
    if args.ttl is not None:
        request["ttl_s"] = args.ttl
    reply = _ask(cfg, request, "claim")
    if not reply.get("ok"):
        raise UsageError(f"claim refused: {reply.get('error')}")
    print(
        json.dumps(reply)
        if args.json
        else f"claim: next transaction at gate {args.gate} is checked against {args.subject} only"
    )
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from kiosk.messaging.status import StatusReply
    from kiosk.tools.status_text import format_status

    reply = _ask(_config(args), {"cmd": "status"}, "status")
    if reply.get("ok") is False:  # e.g. this key was deleted from the verifier's authorized_clients/
        raise RuntimeFailure(f"status refused: {reply.get('error')}")
    # --json: the reply as it came (whatever a newer verifier adds in it too); the text reads it typed.
    print(json.dumps(reply) if args.json else format_status(StatusReply.from_json(reply)))
    return EXIT_OK


def cmd_keys(args: argparse.Namespace) -> int:
    from kiosk.messaging.transport import init_keys
    from kiosk.store.sealing import KEY_FILE_NAME, write_key_file

    made = init_keys(Path(args.dir), client_name=args.client, role=args.role)
    template_key = Path(args.dir) / KEY_FILE_NAME
    if args.role == "all" and not template_key.exists():  # the key the gallery's templates are sealed with
        write_key_file(template_key)
        made.append(template_key)
    for path in made:
        print(f"wrote {path}")
    if not made:
        print(f"keys already present in {args.dir}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from kiosk.tools.demo import run_demo

    cfg = _config(args)
    ok = run_demo(cfg, Path(args.out))
    return EXIT_OK if ok else EXIT_RUNTIME


def cmd_console(args: argparse.Namespace) -> int:
    if args.hash_password:
        import getpass

        from kiosk.console.auth import MIN_PASSWORD_CHARS, hash_password

        password = getpass.getpass("console password: ") if sys.stdin.isatty() else sys.stdin.readline().strip()
        if len(password) < MIN_PASSWORD_CHARS:
            raise UsageError(f"--hash-password: the password must have at least {MIN_PASSWORD_CHARS} characters")
        print(hash_password(password))
        return EXIT_OK
    if args.open_crop:
        from kiosk.console.state import open_crop
        from kiosk.store.sealing import TemplateUnreadable, key_source

        path = Path(args.open_crop)
        if not path.is_file():
            raise UsageError(f"--open-crop: {path}: no such file")
        try:
            jpeg = open_crop(path, key_source(_config(args)).load())
        except TemplateUnreadable as exc:
            raise UsageError(f"--open-crop: {exc}") from None
        if sys.stdout.isatty():
            raise UsageError("--open-crop writes the JPEG to standard output: redirect it to a file")
        sys.stdout.buffer.write(jpeg)
        return EXIT_OK
    from kiosk.console.app import run_console

    cfg = _config(args)
    if not cfg.cameras:
        raise ConfigError(
            f"{cfg.source or '(built-in defaults)'}: cameras: the console shows the configured "
            "cameras' gates; found none"
        )
    return run_console(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Face verification for camera-driven boarding gates.")
    add_common(parser)
    sub = add_commands(parser, "command")
    p = sub.add_parser("run", help="supervise the verifier and one capture per camera")
    p.add_argument(
        "--exit-on-eof", action="store_true", help="stop once every file source is read and its decisions are published"
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("capture", help="send one camera's frames to the verifier")
    p.add_argument("--camera", required=True, metavar="ID")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("verify", help="detect, match and decide; publish events")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("subscribe", help="run hooks on the events of one gate (or all)")
    p.add_argument("--gate", metavar="ID", help="only this gate's events")
    p.add_argument("--jsonl", action="append", default=[], metavar="FILE", help="append each event to FILE")
    p.add_argument(
        "--exec",
        action="append",
        default=[],
        metavar="CMD",
        help="run CMD per event: event JSON on stdin, KIOSK_* environment variables",
    )
    p.add_argument("--webhook", action="append", default=[], metavar="URL", help="POST each event as JSON")
    p.add_argument(
        "--mqtt",
        action="append",
        default=[],
        metavar="URL",
        help="publish to the broker at mqtt://[USER@]HOST:PORT (or mqtts://) under hooks.mqtt_prefix; "
        "password from hooks.mqtt_password_file",
    )
    p.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="MODULE:FUNCTION",
        help="call a Python function with each event (default: hooks.python in the config)",
    )
    p.add_argument(
        "--name",
        help="this subscriber's name: where it keeps its position (hooks.state_dir/NAME.json; "
        "default gate-GATE or all-gates); give two subscribers of one gate different names",
    )
    p.add_argument("--no-config-hooks", action="store_true", help=argparse.SUPPRESS)  # kiosk run's subscribers
    p.add_argument(
        "--metrics-port",
        type=int,
        default=0,
        metavar="PORT",
        help="serve this subscriber's Prometheus metrics on 127.0.0.1:PORT (default 0: off)",
    )
    p.set_defaults(func=cmd_subscribe)

    p = sub.add_parser("bench", help="time the real pipeline on a video (and the obvious insightface loop)")
    p.add_argument("--video", metavar="PATH", help="video to run the pipeline on")
    p.add_argument(
        "--search-scale", metavar="SIZES", help="also time 1:N search on synthetic galleries, e.g. 1000,10000,100000"
    )
    p.add_argument(
        "--flight-scale",
        metavar="PASSENGERS,ENROLLED",
        help="also time matching at a gate boarding "
        "a flight of PASSENGERS within a gallery of ENROLLED (synthetic), e.g. 300,100000",
    )
    p.add_argument("--compare", choices=["insightface"], help="also run the obvious per-face insightface loop")
    p.add_argument(
        "--realtime",
        action="store_true",
        help="pace the video at its frame rate like a live camera (latency run; drops allowed)",
    )
    p.add_argument(
        "--cameras",
        type=int,
        metavar="N",
        help="N live cameras on one verifier, in real time, with "
        "per-camera figures (stale drops, decision latency, accepts) and each process's CPU",
    )
    p.add_argument(
        "--busy",
        type=int,
        metavar="M",
        help="with --cameras: M of them play --video, the others an empty gate area (default: all play it)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("claim", help="make the next transaction at a gate a 1:1 check against one subject")
    p.add_argument("--gate", required=True, metavar="GATE")
    p.add_argument("--subject", required=True, metavar="ID")
    p.add_argument("--ttl", type=float, help="seconds the claim stays valid (default policy.claim_ttl_s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_claim)

    p = sub.add_parser("status", help="the running verifier's status: cameras, latencies, gallery, claims")
    p.add_argument("--json", action="store_true", help="the whole status as one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="CurveZMQ keys and the template key")
    keys = add_commands(p, "keys_command")
    k = keys.add_parser(
        "init",
        help="make the server and a client key pair (client allow-listed), the webhook "
        "secret and (--role all) the template key DIR/template.key; existing ones are kept",
    )
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--client", default="client", help="name of the client key pair")
    k.add_argument(
        "--role",
        choices=["all", "subscriber", "console"],
        default="all",
        help="all: frames, control and events (cameras, tools); subscriber: events only (gates); "
        "console: events and the preview frames and crops (operator consoles)",
    )
    k.set_defaults(func=cmd_keys)

    p = sub.add_parser("console", help="the operator console: a web page of every gate (console.listen)")
    p.add_argument(
        "--open-crop",
        metavar="FILE",
        help="write the JPEG in a sealed decision crop of "
        "console.crops_dir to standard output (needs the template key)",
    )
    p.add_argument(
        "--hash-password",
        action="store_true",
        help="print the hash line of a password read from stdin, for console.password_file, and exit",
    )
    p.set_defaults(func=cmd_console)

    p = sub.add_parser("demo", help="the whole pipeline on a video made from the shipped sample photos")
    p.add_argument("--out", default="var/demo", help="folder for the demo gallery, video and preview")
    p.set_defaults(func=cmd_demo)

    from kiosk.boarding.commands import add_board_commands

    add_board_commands(sub, add_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
