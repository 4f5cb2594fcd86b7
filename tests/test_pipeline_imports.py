"""The verifier's rules (kiosk.pipeline) import no store, no service, no socket library and no database or
crypto module, directly or through what they import: they run on plain values, so their tests need none."""

import json
import subprocess
import sys

FORBIDDEN = ("kiosk.store", "kiosk.services", "zmq", "sqlite3", "_sqlite3", "cryptography", "psycopg")

PROBE = """
import json, sys
import kiosk.pipeline.core, kiosk.pipeline.gatekeeper
print(json.dumps(sorted(sys.modules)))
"""


def test_pipeline_imports_no_store_services_or_sockets():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == []
    assert "kiosk.pipeline.core" in loaded  # the probe imported what it names
