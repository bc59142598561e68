"""Local disk in, local disk out, no stack running: the CLI ingest starts Ray in its own process."""

import json
import os
import subprocess

from ingest.synthetic import make_slides
from tests.integration.commands import ingest_wsi_cmd


def test_cli_ingest_to_local_disk_without_a_stack(tmp_path):
    slides = tmp_path / "slides"
    _, labels = make_slides(slides, n=2, size=1024, seed=9)
    env = dict(os.environ)
    env.update(
        {
            "TESSERA_STATE_DIR": str(tmp_path / "nostack"),
            "TESSERA_RAY_DASHBOARD_PORT": "3",
            "TESSERA_PSEUDONYM_KEY": "local-test-key",
        }
    )
    env.pop("RAY_ADDRESS", None)
    out = tmp_path / "dataset"
    cmd = ingest_wsi_cmd(slides, out, "--labels", str(labels))
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"manifest: {out}/manifest.json" in run.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [r["status"] for r in manifest["inputs"]] == ["ingested", "ingested"]
    assert manifest["classes"] == ["CE", "LAA"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.idx", "shard-000000.tar"]
