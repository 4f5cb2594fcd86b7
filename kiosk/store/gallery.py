"""The enrolled gallery: `open_gallery(cfg)` picks the configured backend, `Gallery`, a SQLite file (the embedded
default, kiosk.store.sqlite_file), or `kiosk.store.postgres.PgGallery`, one PostgreSQL database shared by many
hosts. Both run the same SQL (kiosk.store.queries) on the same tables (kiosk.store.schema); searches run on
an in-memory matrix (kiosk.boarding.matrix). The names the rest of the project uses are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from kiosk.boarding.matrix import PREFILTER_MIN, GalleryMatrix, Match
from kiosk.config import KioskConfig
from kiosk.store.queries import GalleryQueries, Subject, copy_gallery
from kiosk.store.schema import BUMP, SCHEMA_VERSION, prune_changes
from kiosk.store.sealing import MissingKey, TemplateCodec, key_source
from kiosk.store.sqlite_file import SQLITE_MAGIC, Gallery

__all__ = [
    "BUMP",
    "PREFILTER_MIN",
    "SCHEMA_VERSION",
    "SQLITE_MAGIC",
    "Gallery",
    "GalleryMatrix",
    "GalleryQueries",
    "Match",
    "Subject",
    "copy_gallery",
    "open_gallery",
    "prune_changes",
]


def open_gallery(
    cfg: KioskConfig,
    *,
    create: bool = False,
    seal: bool = False,
    path: Path | None = None,
    keys: bool = True,
    codec: TemplateCodec | None = None,
) -> GalleryQueries:
    """The configured gallery: `gallery.url` (PostgreSQL) if set, else the SQLite file `gallery.path` (or
    `path`), with the template key (kiosk.store.sealing.key_source) checked against it.

    `create`: make the gallery (or its schema) if missing, and a key at the default place where there is none
    and the gallery holds no template yet; otherwise a missing gallery or key is a usage error. `seal`: a
    gallery from before version 5 is upgraded, its templates sealed in place (`kiosk-enroll seal`). `keys`
    False: for what never opens a template (listing, removing, flights and boarding, a backup of the sealed
    file): no key is read, so a host that only runs those needs none. `codec`: keys from elsewhere (a
    site's own kiosk.store.sealing.KeyProvider, e.g. a KMS) instead of the configured key file."""
    source = key_source(cfg)
    try:
        if codec is None and (keys or seal):  # first: a missing or bad key stops before anything is written
            codec = source.load()
    except MissingKey:
        if seal or not (create and source.default):
            raise
    if cfg.gallery.url and path is None:
        from kiosk.store.postgres import PgGallery, target

        password = cfg.gallery.password_file
        gallery: GalleryQueries = PgGallery(target(cfg.gallery.url, password), create=create, codec=codec, seal=seal)
    else:
        gallery = Gallery(path or cfg.gallery.path, create=create, codec=codec, seal=seal)
    if codec is None and (keys or seal):
        held = gallery.template_count()
        if held:
            gallery.close()
            raise MissingKey(
                f"{source.where}: no template key there, and gallery {gallery.name} holds {held} "
                "sealed templates: copy the site's template key there"
            )
        gallery.use_codec(source.make())
    return gallery
