"""`kiosk-enroll`: build and inspect the gallery from ID photos.

Every write is all-or-nothing: a refused photo leaves the gallery as it was
and exits 2 with the reason. `import` refuses bad rows one by one and
enrolls the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from enrollment.csvfile import read_rows
from enrollment.evaluate import Report, read_pairs
from enrollment.flight_commands import add_flight_commands, prepare_flight
from enrollment.photos import (
    Refused,
    Template,
    largest_face_embedding,
    photo_digest,
    read_reference,
    reference_template,
)
from kiosk.boarding.model import flight_arg
from kiosk.cli_support import Parser, add_commands, add_common, run_command
from kiosk.config import KioskConfig, load_config
from kiosk.errors import EXIT_OK, EXIT_USAGE, UsageError
from kiosk.store.flights import SqliteBoardingStore
from kiosk.store.gallery import Gallery, GalleryMatrix, GalleryQueries, open_gallery
from kiosk.store.sealing import key_source
from kiosk.vision.engine import FaceEngine

log = logging.getLogger("kiosk-enroll")
PROG = "kiosk-enroll"


@dataclass
class Context:
    cfg: KioskConfig
    engine: FaceEngine


def _context(args: argparse.Namespace) -> Context:
    cfg = load_config(args.config)
    return Context(cfg, FaceEngine.from_config(cfg))


def _gallery(cfg: KioskConfig, *, create: bool = True, keys: bool = True) -> GalleryQueries:
    return open_gallery(cfg, create=create, keys=keys)


def _parse_expiry(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(
            f"--expires: expected an ISO date or date-time (2026-12-01 or 2026-12-01T18:00), found {value!r}"
        ) from None
    if len(value.strip()) <= 10:  # a bare date: valid through that whole day
        dt = dt.replace(hour=23, minute=59, second=59)
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time, as an operator types it
    if dt.timestamp() <= time.time():
        raise UsageError(f"--expires {value}: that is already in the past")
    return dt.timestamp()


def check_enrollment(
    subject_id: str, templates: list[Template], matrices: list[GalleryMatrix], cfg: KioskConfig, *, force: bool
) -> None:
    """Refuse an enrollment that would make a gate open for the wrong booking.

    - photos of one subject that do not match each other;
    - new photos that do not match the subject's existing templates;
    - a face that already matches another subject above the accept threshold
      (two ids for one person), unless forced.
    """
    threshold = cfg.policy.accept_threshold
    emb = np.stack([t.embedding for t in templates])
    if len(templates) > 1:
        sims = emb @ emb.T
        i, j = np.unravel_index(np.argmin(sims), sims.shape)
        if sims[i, j] < threshold and not force:
            raise Refused(
                "inconsistent",
                f"{templates[i].source} and {templates[j].source} do not look like the "
                f"same person (score {sims[i, j]:.3f} < {threshold:.2f}); "
                "pass --force if they are",
            )
    matrices = [m for m in matrices if len(m)]
    if not matrices:
        return
    scores = np.hstack([m.subject_scores(emb) for m in matrices])  # (T, S), a subject may have a column in each
    ids = [sid for m in matrices for sid in m.subject_ids]
    own_cols = [k for k, sid in enumerate(ids) if sid == subject_id]
    if own_cols and not force:
        own = scores[:, own_cols].max(axis=1)  # each photo against the subject's best template
        worst = int(np.argmin(own))
        if own[worst] < threshold:
            raise Refused(
                "inconsistent",
                f"{templates[worst].source} does not match the templates already "
                f"enrolled for {subject_id} (score {own[worst]:.3f} < {threshold:.2f}); "
                "pass --force if it is the same person",
            )
    others = [k for k, s in enumerate(ids) if s != subject_id]
    if not others or force or not cfg.enrollment.duplicate_check:
        return
    sub = scores[:, others]
    t, k = np.unravel_index(np.argmax(sub), sub.shape)
    if sub[t, k] >= threshold:
        other = ids[others[k]]
        raise Refused(
            "duplicate",
            f"{templates[t].source} matches the already enrolled subject {other} "
            f"(score {sub[t, k]:.3f} >= {threshold:.2f}); one person with two ids would "
            "open a gate for the wrong booking. Pass --force if they really are two people",
        )


def _flight_of(args: argparse.Namespace, cfg: KioskConfig) -> str | None:
    """The checked `--flight` (None without one); `--departs` alone is a usage error."""
    if args.flight is None:
        if args.departs is not None:
            raise UsageError("--departs needs --flight")
        return None
    return flight_arg(args.flight)


def cmd_add(args: argparse.Namespace) -> int:
    ctx = _context(args)
    expires = _parse_expiry(args.expires)
    flight = _flight_of(args, ctx.cfg)
    t0 = time.perf_counter()
    if flight is not None:
        with _gallery(ctx.cfg) as gallery:
            store = SqliteBoardingStore(gallery)
            prepare_flight(store, flight, args.departs, ctx.cfg)
            if gallery.has_templates(args.id, ctx.engine.model_id):  # enrolled once, listed on each flight
                added = store.add_passengers(flight, [args.id])
                print(
                    f"{args.id} is already enrolled; "
                    + (f"added to flight {flight}" if added else f"already on flight {flight}")
                )
                return EXIT_OK
    templates = [reference_template(ctx.engine, p, ctx.cfg.enrollment, largest=args.largest) for p in args.images]
    with _gallery(ctx.cfg) as gallery:
        known = [t for t in templates if gallery.has_photo(args.id, ctx.engine.model_id, t.photo_sha256)]
        if len(known) == len(templates) and expires is None and not args.name:
            print(
                f"{args.id} is already enrolled from {'this photo' if len(known) == 1 else 'these photos'}; "
                "nothing changed"
            )
            return EXIT_OK
        with gallery.writing():  # the check and the insert see the same gallery: no enrollment in between
            matrix = gallery.matrix(ctx.engine.model_id, ctx.engine.dim)
            check_enrollment(args.id, templates, [matrix], ctx.cfg, force=args.force)
            count = gallery.enroll(
                args.id,
                args.name or "",
                np.stack([t.embedding for t in templates]),
                ctx.engine.model_id,
                expires=expires,
                qualities=[t.quality for t in templates],
                photo_hashes=[t.photo_sha256 for t in templates],
            )
            if flight is not None:
                SqliteBoardingStore(gallery).add_passengers(flight, [args.id])
    log.info(
        "enrollment of %s took %.0f ms for %d photo(s)", args.id, (time.perf_counter() - t0) * 1000, len(templates)
    )
    print(
        f"enrolled {args.id}"
        + (f" ({args.name})" if args.name else "")
        + f": {count} template(s)"
        + (f", on flight {flight}" if flight else "")
    )
    return EXIT_OK


@dataclass
class ManifestRow:
    line: int
    subject_id: str
    name: str
    photo: Path


def read_manifest(path: Path) -> list[ManifestRow]:
    return [
        ManifestRow(line, row.get("id", ""), row.get("name", ""), path.parent / row.get("photo", ""))
        for line, row in read_rows(path, {"id", "photo"}, "id,name,photo")
    ]


def cmd_import(args: argparse.Namespace) -> int:
    manifest = Path(args.manifest)
    rows = read_manifest(manifest)
    ctx = _context(args)
    flight = _flight_of(args, ctx.cfg)
    refused: list[tuple[ManifestRow, str, str]] = []
    enrolled = unchanged = listed = known = 0
    t0 = time.perf_counter()
    with _gallery(ctx.cfg) as gallery:
        store = SqliteBoardingStore(gallery)
        if flight is not None:
            prepare_flight(store, flight, args.departs, ctx.cfg)
        # The gallery as it was, plus what this import adds: no reload of the whole gallery per row.
        before = gallery.matrix(ctx.engine.model_id, ctx.engine.dim)
        ours = before.revision  # the gallery's revision after our last write: nobody else wrote since
        added: list[tuple[str, str, np.ndarray]] = []
        for row in tqdm(rows, desc="enrolling", unit="photo", file=sys.stderr, disable=args.no_progress):
            if not row.subject_id:
                refused.append((row, "bad_row", "empty id"))
                continue
            if not row.photo.name:
                refused.append((row, "bad_row", "empty photo path"))
                continue
            if flight is not None and gallery.has_templates(row.subject_id, ctx.engine.model_id):
                with gallery.writing():  # enrolled once, listed on each flight
                    current = gallery.revision() == ours  # nobody else wrote: our matrix stays good
                    listed += store.add_passengers(flight, [row.subject_id])
                    if current:
                        ours = gallery.revision()
                known += 1
                continue
            try:
                data = read_reference(row.photo)
                if gallery.has_photo(row.subject_id, ctx.engine.model_id, photo_digest(data)):
                    unchanged += 1  # the same import run again: this photo is enrolled for this subject
                    continue
                template = reference_template(
                    ctx.engine, row.photo, ctx.cfg.enrollment, largest=args.largest, data=data
                )
                with gallery.writing():  # check and insert in one write transaction
                    if gallery.revision() != ours:  # someone else enrolled meanwhile: check against that too
                        before, added = gallery.matrix(ctx.engine.model_id, ctx.engine.dim), []
                    so_far = GalleryMatrix.from_templates(ctx.engine.model_id, ctx.engine.dim, added)
                    check_enrollment(row.subject_id, [template], [before, so_far], ctx.cfg, force=args.force)
                    gallery.enroll(
                        row.subject_id,
                        row.name,
                        template.embedding[None, :],
                        ctx.engine.model_id,
                        qualities=[template.quality],
                        photo_hashes=[template.photo_sha256],
                    )
                    if flight is not None:
                        listed += store.add_passengers(flight, [row.subject_id])
                    ours = gallery.revision()
                added.append((row.subject_id, row.name, template.embedding))
                enrolled += 1
            except Refused as exc:
                refused.append((row, exc.reason, str(exc)))
    seconds = time.perf_counter() - t0
    print(
        f"import {manifest}: {len(rows)} row(s), {enrolled} enrolled, {unchanged} already enrolled from the "
        f"same photo, {len(refused)} refused ({seconds:.1f} s)"
        + (f"; {known} enrolled before (photo not used); {listed} added to flight {flight}" if flight else "")
    )
    for row, reason, message in refused:
        print(f"  line {row.line} id={row.subject_id or '?'}: refused ({reason}): {message}")
    return EXIT_USAGE if refused else EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with _gallery(cfg, create=False, keys=False) as gallery:
        subjects = gallery.subjects()
    if args.json:
        print(
            json.dumps(
                {
                    "subjects": [
                        {
                            "id": s.id,
                            "name": s.name,
                            "templates": sum(s.templates.values()),
                            "templates_by_model": s.templates,
                            "created": s.created,
                            "expires": s.expires,
                        }
                        for s in subjects
                    ]
                }
            )
        )
        return EXIT_OK
    if not subjects:
        print("gallery is empty")
    for s in subjects:
        exp = "" if s.expires is None else "  expires " + datetime.fromtimestamp(s.expires, timezone.utc).isoformat()
        print(f"{s.id}\t{s.name}\t{sum(s.templates.values())} template(s){exp}")
    return EXIT_OK


def cmd_remove(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with _gallery(cfg, create=False, keys=False) as gallery:
        if not gallery.remove(args.id):
            raise UsageError(f"no subject {args.id!r} in gallery {gallery.name}")
    print(f"removed {args.id}")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if cfg.gallery.url:  # the database exists already; its schema is created or migrated
        with open_gallery(cfg, create=True) as gallery:
            revision = gallery.revision()
        print(f"gallery {gallery.name} ready (revision {revision})")
        return EXIT_OK
    path = cfg.gallery.path
    existed = path.exists()
    with open_gallery(cfg, create=True) as gallery:
        revision = gallery.revision()
    print(f"gallery {path} " + (f"already exists (revision {revision})" if existed else "created, empty"))
    return EXIT_OK


def cmd_seal(args: argparse.Namespace) -> int:
    """Seal in place the clear templates of a gallery from before schema version 5 (the only way it is
    upgraded: opening it otherwise is refused), under the configured template key."""
    cfg = load_config(args.config)
    path = Path(args.file) if args.file else None
    if path is not None and not path.is_file():
        raise UsageError(f"{args.file}: no such gallery file")
    with open_gallery(cfg, seal=True, path=path) as gallery:
        keys = gallery.key_ids()
    held = sum(keys.values())
    print(f"gallery {gallery.name}: {held} template(s), all sealed" + (f" (key {', '.join(keys)})" if keys else ""))
    return EXIT_OK


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Re-seal every template under a new key while verifiers keep deciding (kiosk.store.queries.rotate_key)."""
    from kiosk.store.sealing import read_key_file, write_key_file

    cfg = load_config(args.config)
    if args.batch < 1:
        raise UsageError(f"--batch: expected at least 1, found {args.batch}")
    if not 0 <= args.settle_s <= 3600:
        raise UsageError(f"--settle-s: expected 0 to 3600 seconds, found {args.settle_s}")
    new_file = Path(args.new)
    with _gallery(cfg, create=False) as gallery:
        old = gallery.codec.where if gallery.codec else "?"
        if new_file.exists():
            new = read_key_file(new_file)
        else:
            new = write_key_file(new_file)
            print(f"wrote a new template key to {new_file}")
        done = gallery.rotate_key(new, batch=args.batch, settle_s=args.settle_s)
        dropped = gallery.rotation_dropped
    print(
        f"gallery {gallery.name}: {done} template(s) re-sealed under key {new.key_id.hex()}"
        + (f"; {dropped} that did not open (tampered or damaged) deleted: re-enroll their subjects" if dropped else "")
    )
    print(
        f"running verifiers hold the new key already. Before any process restarts, put {new_file} in place of "
        f"{old} (or name it in security.template_key_file) on every host: the old key opens nothing here now"
    )
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    with _gallery(cfg, create=False, keys=False) as gallery:
        revision = gallery.backup(Path(args.file))
    print(f"backed up {gallery.name} (revision {revision}) to {args.file}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if not Path(args.file).is_file():
        raise UsageError(f"{args.file}: no such backup file")
    if cfg.gallery.url:
        raise UsageError("gallery.url: restore a PostgreSQL gallery with the server's own tools (pg_restore)")
    path = cfg.gallery.path
    revision, moved = Gallery.restore_file(path, Path(args.file), key_source(cfg).load())
    if moved is not None:
        print(f"{path} was not a usable database; moved it aside to {moved}")
    print(f"restored {path} from {args.file} (revision {revision}); running verifiers reload it")
    return EXIT_OK


def cmd_migrate(args: argparse.Namespace) -> int:
    from kiosk.store.gallery import copy_gallery
    from kiosk.store.postgres import PgGallery, target

    cfg = load_config(args.config)
    url = args.to or cfg.gallery.url
    if not url:
        raise UsageError("migrate: name the database with --to postgresql://USER@HOST:PORT/DATABASE (or gallery.url)")
    password_file = (
        Path(args.password_file) if args.password_file else (cfg.gallery.password_file if not args.to else None)
    )
    where = target(url, password_file, key="--to")
    codec = key_source(cfg).load()  # the source's templates stay sealed under it: copied as they are
    with (
        Gallery(Path(args.source), create=False, codec=codec) as source,
        PgGallery(where, create=True, codec=codec) as dest,
    ):
        counts = copy_gallery(source, dest)
        revision = dest.revision()
    print(
        f"copied {args.source} into {dest.name}: {counts['subjects']} subjects, {counts['templates']} templates, "
        f"{counts['flights']} flights, {counts['boardings']} boarded marks (revision {revision})"
    )
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    ctx = _context(args)
    t0 = time.perf_counter()
    a = largest_face_embedding(ctx.engine, args.image_a)
    b = largest_face_embedding(ctx.engine, args.image_b)
    score = float(a @ b)
    ms = (time.perf_counter() - t0) * 1000
    threshold = ctx.cfg.policy.accept_threshold
    result = {
        "score": round(score, 6),
        "threshold": threshold,
        "match": score >= threshold,
        "image_a": str(args.image_a),
        "image_b": str(args.image_b),
        "ms": round(ms, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        verdict = "MATCH" if result["match"] else "no match"
        print(f"{verdict}: score {score:.3f} (threshold {threshold:.2f})")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    pairs = read_pairs(Path(args.pairs))
    ctx = _context(args)
    cache: dict[Path, np.ndarray | str] = {}

    def embedding(path: Path) -> np.ndarray | str:
        if path not in cache:
            try:
                cache[path] = largest_face_embedding(ctx.engine, path)
            except UsageError as exc:
                cache[path] = str(exc)
        return cache[path]

    genuine: list[float] = []
    impostor: list[float] = []
    skipped: list[dict[str, str]] = []
    for pair in tqdm(pairs, desc="scoring", unit="pair", file=sys.stderr, disable=args.no_progress):
        a, b = embedding(pair.image_a), embedding(pair.image_b)
        if isinstance(a, str) or isinstance(b, str):
            skipped.append({"line": str(pair.line), "reason": a if isinstance(a, str) else str(b)})
            continue
        (genuine if pair.same else impostor).append(float(a @ b))
    report = Report(ctx.cfg.policy.accept_threshold, np.array(genuine), np.array(impostor), skipped)
    data = report.as_dict()
    if args.json:
        print(json.dumps(data))
        return EXIT_OK

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * float(v):.3f}%"

    def num(v: float | None) -> str:
        return "n/a" if v is None else f"{float(v):.3f}"

    print(
        f"pairs: {data['pairs']} ({data['genuine_pairs']} genuine, {data['impostor_pairs']} impostor, "
        f"{len(skipped)} skipped)"
    )
    print(f"threshold {report.threshold:.3f}: FMR {pct(data['fmr'])}, FNMR {pct(data['fnmr'])}")
    print(f"EER {pct(data['eer'])} at threshold {num(data['eer_threshold'])}")
    for target, t in data["threshold_at_fmr"].items():
        print(
            f"threshold for FMR {target}: "
            + (num(t) if t is not None else f"n/a (needs at least {round(1 / float(target))} impostor pairs)")
        )
    print(
        f"genuine scores: min {num(data['genuine_min'])}, mean {num(data['genuine_mean'])}; "
        f"impostor scores: max {num(data['impostor_max'])}, mean {num(data['impostor_mean'])}"
    )
    for s in skipped:
        print(f"  skipped line {s['line']}: {s['reason']}")
    return EXIT_OK


def cmd_evaluate_pad(args: argparse.Namespace) -> int:
    from enrollment.pad_eval import PadReport, check_files, judge, read_labels, samples, text
    from kiosk.vision.liveness import PadEngine
    from kiosk.vision.models import runtime

    if not 1 <= args.still_hold <= 300:
        raise UsageError(f"--still-hold: expected 1 to 300 frames, found {args.still_hold}")
    if not 0.0 <= args.margin <= 0.99:
        raise UsageError(f"--margin: expected 0 to 0.99, found {args.margin:g}")
    rows = read_labels(Path(args.labels))
    ctx = _context(args)
    pad = ctx.engine.pad or PadEngine.from_config(ctx.cfg, runtime.plan_providers(ctx.cfg.models.providers))
    try:
        check_files(rows)  # a missing file is named before the long part (after the config's own errors)
    except UsageError as exc:
        raise UsageError(f"{args.labels}: {exc}") from None
    items = samples(rows)
    report = PadReport(
        ctx.cfg, [m.name for m in pad.models], list(pad.checks), hold=args.still_hold, margin=args.margin
    )
    for item in tqdm(items, desc="judging", unit="clip", file=sys.stderr, disable=args.no_progress):
        try:
            presentations = judge(ctx.engine, pad, ctx.cfg, item, args.still_hold)
        except UsageError as exc:  # 'line N: ...'
            raise UsageError(f"{args.labels}: {exc}") from None
        report.add(item, presentations)
    data = report.as_dict(sweep=args.sweep)
    print(json.dumps(data) if args.json else "\n".join(text(data)))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROG, description="Enroll passengers into the gate gallery and inspect it.")
    add_common(parser)
    sub = add_commands(parser, "command")

    p = sub.add_parser("add", help="enroll one subject from one or more photos")
    p.add_argument("--id", required=True, help="subject id (e.g. booking reference)")
    p.add_argument("--name", help="display name")
    p.add_argument("--expires", help="ISO date or date-time after which the subject is not matched")
    p.add_argument("--largest", action="store_true", help="take the largest face when a photo shows several")
    p.add_argument(
        "--force", action="store_true", help="enroll even if the face matches another subject or the photos disagree"
    )
    p.add_argument("--flight", help="also list the subject on this flight's manifest (e.g. LH123)")
    p.add_argument("--departs", metavar="ISO_TIME", help="the flight's scheduled departure (needed for a new flight)")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("import", help="enroll from a CSV manifest (columns id,name,photo)")
    p.add_argument("manifest", metavar="MANIFEST.csv")
    p.add_argument("--largest", action="store_true", help="take the largest face when a photo shows several")
    p.add_argument("--force", action="store_true", help="skip the duplicate-identity check")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--flight",
        help="the flight this manifest lists (e.g. LH123): every row enrolled, or already "
        "enrolled, is put on its manifest",
    )
    p.add_argument("--departs", metavar="ISO_TIME", help="the flight's scheduled departure (needed for a new flight)")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("list", help="list enrolled subjects")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("remove", help="remove a subject and its templates")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("init", help="create the configured gallery, empty (a verifier never creates one)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser(
        "seal",
        help="seal in place the clear templates of a gallery from before schema version 5, "
        "under the template key (back it up first)",
    )
    p.add_argument("file", metavar="FILE", nargs="?", help="a SQLite gallery file (default: the configured gallery)")
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser(
        "rotate-key",
        help="re-seal every template under a new template key, in batches, while "
        "verifiers keep deciding (they follow it); then the old key opens nothing",
    )
    p.add_argument("--new", required=True, metavar="FILE", help="the new key file (made 0600 if missing)")
    p.add_argument("--batch", type=int, default=500, metavar="N", help="templates per transaction (default 500)")
    p.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds for running verifiers to take the new key before any template is sealed under it "
        "(each looks at the gallery every second; default 5)",
    )
    p.set_defaults(func=cmd_rotate_key)

    p = sub.add_parser("backup", help="a consistent copy of the gallery in a new FILE (while verifiers run)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="replace the gallery's content with a backup; running verifiers reload it")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser(
        "migrate", help="copy a SQLite gallery (templates, flights, boarding state) into an empty PostgreSQL gallery"
    )
    p.add_argument("--from", dest="source", required=True, metavar="FILE", help="the SQLite gallery file")
    p.add_argument("--to", metavar="URL", help="postgresql://USER@HOST:PORT/DATABASE (default: gallery.url)")
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="the database password (default: gallery.password_file with gallery.url, else $KIOSK_PG_PASSWORD)",
    )
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("compare", help="score the largest faces of two photos")
    p.add_argument("image_a", metavar="IMAGE_A")
    p.add_argument("image_b", metavar="IMAGE_B")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("evaluate", help="FMR/FNMR/EER over labelled pairs (columns image_a,image_b,same)")
    p.add_argument("pairs", metavar="PAIRS.csv")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "evaluate-pad",
        help="APCER per attack type and BPCER of the liveness checks, with their "
        "one-sided 95%% upper bounds (Clopper-Pearson), in all, per source and "
        "leaving one source out; each face track of labelled videos and still "
        "clips judged as the gate would (columns video,label or file,label: "
        "bona_fide or an attack type; optional subject, source)",
    )
    p.add_argument("labels", metavar="LABELS.csv")
    p.add_argument("--json", action="store_true")
    p.add_argument(
        "--still-hold",
        type=int,
        default=6,
        metavar="N",
        help="stills (.jpg .jpeg .png .bmp .webp) are "
        "scored as a still clip: those of one source, label and subject (or a still alone without a "
        "subject) in file-name order, each held N frames at 30 fps (default 6)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=0.1,
        metavar="M",
        help="leave-one-source-out: the texture "
        "threshold fitted on the other sources is the lowest that accepts none of their attack "
        "presentations plus M, at most 0.99 (default 0.1)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also replay every presentation at texture thresholds "
        "0.05-0.95 and fit the thresholds for BPCER 1%% and 5%% where the data allows",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate_pad)

    add_flight_commands(sub, add_commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
