"""`deepmri models list|info|fetch|import|verify` on real models, with DEEPMRI_HOME in tmp.

Fetch runs against a real http.server on 127.0.0.1; import uses a TorchScript file traced here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from deepmri.cli import main
from deepmri.models import CARD_FILE, ModelCard, ModelStore, example_card, save_model
from deepmri.nets import build_network
from deepmri.settings import BUNDLED_MODELS_DIR


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty DEEPMRI_HOME so the user's real cache never leaks into (or out of) a test."""
    monkeypatch.setenv("DEEPMRI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DEEPMRI_MODEL_PATH", raising=False)
    return tmp_path / "home"


def cached_model(home: Path, model_id: str = "cli-tiny"):
    card = example_card(id=model_id, version="1.2.3", license="CC-BY-4.0")
    card["metrics"] = [
        {"name": "Dice brain", "value": 0.93, "dataset": "MNI152", "command": "deepmri eval"},
        {
            "name": "leak",
            "value": 21.9,
            "dataset": "Colin27",
            "command": "deepmri eval",
            "baseline": 0.06,
            "peers": {"deepbet": 20.8, "robex": 16.9},
        },
    ]
    torch.manual_seed(0)
    network = build_network(card["architecture"]["name"], card["architecture"]["config"])
    return save_model(network, card, home / "models" / model_id)


def run_cli(capsys, *arguments: str) -> tuple[int, str, str]:
    code = main(["models", *arguments])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def bundled_cards() -> list[ModelCard]:
    return [ModelCard.from_file(p) for p in sorted(BUNDLED_MODELS_DIR.glob(f"*/{CARD_FILE}"))]


def test_list_shows_every_bundled_and_cached_model(home, capsys):
    cached_model(home)
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TASK", "VERSION", "LICENCE", "SOURCE", "STATUS"]
    rows = {line.split()[0]: re.split(r"\s{2,}", line) for line in lines[1:]}  # 2-space columns
    expected = [(c.id, c.task_text, c.version, c.license, "bundled") for c in bundled_cards()]
    expected.append(("cli-tiny", "segmentation", "1.2.3", "CC-BY-4.0", "cache"))
    for model_id, task, version, licence, source in expected:
        row = rows[model_id]
        assert row[1:3] == [task, version] and row[3].startswith(licence.split()[0])
        assert source in row and row[-1] == "ok"
    code, out, _ = run_cli(capsys, "list", "--json")
    listed = {row["id"]: row for row in json.loads(out)}
    assert {model_id for model_id, *_ in expected} <= set(listed)
    for card in bundled_cards():
        assert listed[card.id]["license"] == card.license
        assert listed[card.id]["version"] == card.version
        assert listed[card.id]["part_of"] == card.part_of


def test_list_marks_bundled_models_and_lets_them_win(home, capsys, tmp_path, monkeypatch):
    """A stand-in bundled folder (the real one may still be empty) goes through the same code."""
    import deepmri.models.store as store_module

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    cached_model(tmp_path / "b", "cli-bundled").path.rename(bundled / "cli-bundled")
    cached_model(home, "cli-bundled")  # same id in the cache: the bundled one wins
    monkeypatch.setattr(store_module, "BUNDLED_MODELS_DIR", bundled)
    code, out, _ = run_cli(capsys, "list")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row for row in rows if row[0] == "cli-bundled"] == [
        ["cli-bundled", "segmentation", "1.2.3", "CC-BY-4.0", "bundled", "ok"]
    ]


def test_list_on_an_empty_store_says_how_to_add_models(home, capsys, monkeypatch):
    if bundled_cards():
        pytest.skip("bundled models are present")
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "deepmri models fetch" in out


def test_info_prints_the_card_with_its_metrics(home, capsys):
    model = cached_model(home)
    code, out, _ = run_cli(capsys, "info", "cli-tiny")
    assert code == 0
    assert "cli-tiny 1.2.3 (segmentation)" in out
    assert "Dice brain = 0.93 on MNI152" in out
    # Each figure beside the tools a user could pick instead; the command once, not per figure.
    assert "leak = 21.9 on Colin27  (beside: baseline 0.06, deepbet 20.8, robex 16.9)" in out
    assert out.count("measured by: deepmri eval") == 1
    assert model.card.weights["sha256"] in out and "CC-BY-4.0" in out
    code, out, _ = run_cli(capsys, "info", "cli-tiny", "--json")
    assert json.loads(out) == model.card.to_dict()
    code, _, err = run_cli(capsys, "info", "no-such-model")
    assert code == 2 and "No model 'no-such-model'" in err and "Traceback" not in err


def test_verify_accepts_a_good_model_and_refuses_a_tampered_one(home, capsys):
    model = cached_model(home)
    code, out, _ = run_cli(capsys, "verify", "cli-tiny")
    assert code == 0 and "OK" in out
    raw = bytearray(model.weights_path.read_bytes())
    raw[100] ^= 0x01
    model.weights_path.write_bytes(bytes(raw))
    for target in ("cli-tiny", str(model.path)):  # by id and by folder
        code, out, err = run_cli(capsys, "verify", target)
        assert code == 2
        assert "sha256" in err and "will not be loaded" in err


def test_verify_exit_status_from_the_installed_command(home, tmp_path):
    model = cached_model(home)
    model.weights_path.write_bytes(model.weights_path.read_bytes()[:-1])
    result = subprocess.run(
        [sys.executable, "-m", "deepmri", "models", "verify", str(model.path)],
        capture_output=True,
        text=True,
        env={**os.environ, "DEEPMRI_HOME": str(home)},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "bytes but the card says" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture
def web_folder(tmp_path):
    """A plain http.server on 127.0.0.1 serving `tmp_path/www`."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_fetch_installs_into_the_cache_and_rejects_a_wrong_checksum(home, capsys, web_folder):
    root, base = web_folder
    source = cached_model(root.parent / "src-home", "cli-fetched")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for item in source.path.iterdir():
            archive.write(item, f"cli-fetched/{item.name}")
    (root / "cli-fetched.zip").write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    url = f"{base}/cli-fetched.zip"
    code, _, err = run_cli(capsys, "fetch", url, "--sha256", "f" * 64, "--id", "other")
    assert code == 2 and "deleted" in err
    assert not (home / "models" / "other").exists()
    code, out, err = run_cli(capsys, "fetch", url, "--sha256", digest, "--id", "other")
    assert code == 0, err
    assert "Installed 'other'" in out and "%]" in err  # progress lines on stderr
    assert ModelStore().get("other").card.id == "other"
    code, out, _ = run_cli(capsys, "list")
    assert any(line.split()[:1] == ["other"] and "cache" in line for line in out.splitlines())
    code, _, err = run_cli(capsys, "fetch", f"{base}/missing.zip", "--sha256", digest)
    assert code == 2 and "404" in err


def test_import_completes_the_card_from_options(home, capsys, tmp_path):
    torch.manual_seed(0)
    network = build_network("monai.UNet", example_card()["architecture"]["config"]).eval()
    traced = torch.jit.trace(network, torch.rand(1, 1, 16, 16, 16))
    source = tmp_path / "my-net.pt"
    traced.save(str(source))

    code, _, err = run_cli(capsys, "import", str(source))
    assert code == 2
    for option in ("--labels", "--spacing", "--patch", "--license"):
        assert option in err

    code, out, err = run_cli(
        capsys,
        "import",
        str(source),
        "--id",
        "my-tumour",
        "--labels",
        "1:Tumour core:1,0,0",
        "--spacing",
        "1",
        "1",
        "1.5",
        "--patch",
        "16",
        "16",
        "16",
        "--contrasts",
        "T1w",
        "--license",
        "MIT",
    )
    assert code == 0, err
    model = ModelStore().get("my-tumour")
    card = model.card
    assert [(label.value, label.name, label.color) for label in card.labels] == [
        (1, "Tumour core", [1.0, 0.0, 0.0])
    ]
    assert card.spacing == [1.0, 1.0, 1.5] and card.patch_size == [16, 16, 16]
    assert card.weights_format == "torchscript" and card.input["contrasts"] == ["T1w"]
    code, out, _ = run_cli(capsys, "verify", "my-tumour")
    assert code == 0
    inputs = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.load_network()(inputs), network(inputs), atol=1e-5)

    code, _, err = run_cli(capsys, "import", str(source), "--labels", "Tumour")
    assert code == 2 and "VALUE:NAME" in err


def test_the_models_panel_card_shows_each_figure_beside_the_peers(home):
    models = pytest.importorskip("DeepMRILib.models")
    page = models.card_html(cached_model(home).card.to_dict())
    assert "leak = 21.9 (Colin27)<br/>beside: baseline 0.06, deepbet 20.8, robex 16.9" in page
    assert page.count("<code>deepmri eval</code>") == 1
